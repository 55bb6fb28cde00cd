"""The Ray executor of `run_sweep`: each cell a task on an actor that holds the model.

One actor per worker loads the model once (`model_loader`, shipped to the worker) and
runs cells on it; cells go to idle actors as they free up (`ray.util.ActorPool`). An
actor that dies mid-cell (its process killed, its node lost) is restarted by Ray and the
cell is retried on it, up to `max_retries` times. Results (the vectors and the
measurements) come back to the driver, which writes every file, so workers need no
shared filesystem. `address=None` starts a local Ray instance; `"auto"` joins the
cluster this machine belongs to; `"ray://HOST:10001"` connects a remote client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util import ActorPool

__all__ = ["run_on_ray"]


class _CellWorker:
    """A Ray actor: the model, loaded once, and the cells run on it."""

    def __init__(self, model_loader: Callable[[], Any]) -> None:
        import torch

        torch.set_num_threads(
            max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        )
        self.model = model_loader()

    def run(self, grid: Any, cell: Any) -> tuple[Any, Any, dict[str, Any]]:
        from melbo_lens.workflows.sweeps import run_cell

        vectors, measured = run_cell(self.model, grid, cell)
        return cell, vectors, measured


def run_on_ray(
    grid: Any,
    cells: list[Any],
    model_loader: Callable[[], Any],
    address: str | None,
    workers: int | None,
    num_cpus: float,
    num_gpus: float,
    max_retries: int,
) -> Iterator[Any]:
    """(cell, vectors, measurements) of each cell, in the order they finish."""
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    if workers is None:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        fit = int(cpus // num_cpus) if num_cpus else len(cells)
        if num_gpus:
            fit = min(fit, int(gpus // num_gpus))
        workers = max(1, min(fit, len(cells)))
    actor = ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )(_CellWorker)
    pool = ActorPool([actor.remote(model_loader) for _ in range(workers)])
    yield from pool.map_unordered(lambda a, cell: a.run.remote(grid, cell), cells)
