"""The Ray executor (of `run_sweep` and of sharded dashboards): each unit of work a task
on an actor that holds the model.

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
from functools import partial
from typing import Any

import ray
from ray.util import ActorPool

from melbo_lens.core.host import Host

__all__ = ["ResourcesUnavailable", "map_on_ray", "run_on_ray"]


CellFn = Callable[[Any, Any, Any], Any]  # (model, grid, cell) -> (vectors, measurements)


class ResourcesUnavailable(RuntimeError):
    """A worker asks for more CPU or GPU than the whole Ray cluster has."""


class _Worker:
    """A Ray actor: the model, loaded once, and the units of work run on it."""

    def __init__(self, model_loader: Callable[[], Any]) -> None:
        import torch

        torch.set_num_threads(
            max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        )
        self.model = model_loader()

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        return fn(self.model, item)


def _cell(run_cell: CellFn, grid: Any, model: Host, cell: Any) -> tuple[Any, Any]:
    """(cell, (vectors, measurements)), or (cell, the error as one line) if it raised:
    one cell's error is that cell's, and the other cells go on."""
    from melbo_lens.core.checks import one_line

    try:
        return cell, run_cell(model, grid, cell)
    except Exception as err:  # noqa: BLE001 - returned to the driver, which reports it
        return cell, one_line(err)


def run_on_ray(
    run_cell: CellFn,
    grid: Any,
    cells: list[Any],
    model_loader: Callable[[], Any],
    address: str | None,
    workers: int | None,
    num_cpus: float,
    num_gpus: float,
    max_retries: int,
) -> Iterator[Any]:
    """(cell, run_cell(model, grid, cell) or its error as a line), in the order they
    finish. The driver passes `run_cell` in (this module never imports the driver)."""
    yield from map_on_ray(
        partial(_cell, run_cell, grid),
        cells,
        model_loader,
        address,
        workers,
        num_cpus,
        num_gpus,
        max_retries,
    )


def map_on_ray(
    fn: Callable[[Any, Any], Any],
    items: list[Any],
    model_loader: Callable[[], Any],
    address: str | None,
    workers: int | None,
    num_cpus: float,
    num_gpus: float,
    max_retries: int,
) -> Iterator[Any]:
    """`fn(model, item)` for each item on actors holding `model_loader()`, as they finish."""
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if num_cpus > cpus or num_gpus > gpus:  # Ray would wait for them forever, silently
        raise ResourcesUnavailable(
            f"each worker asks for {num_cpus:g} CPU and {num_gpus:g} GPU, but the Ray "
            f"cluster has {cpus:g} CPU and {gpus:g} GPU in all; ask for at most that "
            "(CLI: --cpus-per-cell / --gpus-per-cell), or join a cluster that has them"
        )
    if workers is None:
        fit = int(cpus // num_cpus) if num_cpus else len(items)
        if num_gpus:
            fit = min(fit, int(gpus // num_gpus))
        workers = max(1, min(fit, len(items)))
    actor = ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )(_Worker)
    actors = [actor.remote(model_loader) for _ in range(workers)]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, item: a.run.remote(fn, item), items)
    finally:  # the actors (and the model each holds) go when the work is done
        for a in actors:
            ray.kill(a)  # type: ignore[arg-type]  # an actor handle (ray's stubs say proxy)
