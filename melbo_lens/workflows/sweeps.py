"""Sweeps over a grid: prompt sets x (source, target) sites x radii x seeds x methods.

A *cell* is one point of the grid: train (or draw) the vectors of one method at one
radius, seed, site pair and prompt set, then measure them: MELBO objective, diversity
(mean |cos| between the members' target deltas: lower is more diverse), fluency (median
perplexity of the steered completions over the unsteered ones) and behaviour counts
(the grid's named regular expressions, matched against the completions).

`run_sweep(grid, out_dir)` validates the whole grid first (`workflows.sweep_grid`), locks
`out_dir`, checks the grid against the model, and only then writes, atomically, one
artifact per cell (`OUT/cells/ID.safetensors`) and its measurements (`OUT/cells/ID.json`,
written last, so a cell counts as finished only when both exist), a manifest of the grid
and its cells (`OUT/manifest.json`, with the first finished cell), and the table of every
finished cell (`OUT/results.json`, valid JSON with undefined values as null, and
`OUT/results.csv`). A rerun with the same grid skips finished cells, so a killed sweep
loses only the cells in flight; a manifest of another grid is refused unless
`overwrite=True`. A cell that raises is reported as that cell's error in one line, the
other cells run and are saved, and `SweepFailed` names the failed cells at the end.

Executors: `"local"` (default) runs the cells one after another in this process with one
model. `"ray"` runs each cell as a task on a Ray cluster (`address="auto"` joins a running
one; None starts a local instance): one actor per worker loads the model once and runs
cells, a worker that dies mid-cell is restarted and the cell retried (`max_retries`),
and the driver writes every file, so workers need no shared filesystem.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from melbo_lens.core.checks import one_line
from melbo_lens.core.host import Host
from melbo_lens.core.io import LockHeld, atomic_write_text, exclusive_lock
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet, parse_positions
from melbo_lens.core.sites import parse_site
from melbo_lens.perturbations.vectors import SteeringVectors
from melbo_lens.workflows.saved import json_safe, load_unit, save_unit
from melbo_lens.workflows.sweep_grid import Cell, GridError, SweepGrid, check_against_model

__all__ = [
    "Cell",
    "GridError",
    "SweepFailed",
    "SweepGrid",
    "SweepResult",
    "run_cell",
    "run_sweep",
]


# ---------------------------------------------------------------------- one cell
def run_cell(model: Host, grid: SweepGrid, cell: Cell) -> tuple[SteeringVectors, dict[str, Any]]:
    """Train (or draw) the cell's vectors and measure them; (artifact, measurements)."""
    from melbo_lens.analysis.deltas import perturbation_objectives
    from melbo_lens.analysis.diversity import fluency
    from melbo_lens.analysis.similarity import delta_similarity
    from melbo_lens.generation import generate
    from melbo_lens.methods import baselines
    from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors

    start = time.perf_counter()
    source, target = parse_site(cell.source, "resid_post"), parse_site(cell.target, "resid_post")
    prompts = PromptSet.coerce(
        model,
        grid.prompts[cell.prompt_set],
        chat=grid.chat,
        target_positions=parse_positions(grid.target_positions),
    )
    options = {k: v for k, v in cell.method.items() if k != "method"}
    shared = dict(grid.config)
    n = int(shared.get("n_vectors", MelboConfig.n_vectors))
    kind = cell.method["method"]
    if kind == "melbo":
        config = MelboConfig(
            source, target, radius=cell.radius, seed=cell.seed, **{**shared, **options}
        )
        vectors = train_steering_vectors(model, prompts, config, progress=False)
    elif kind == "random":
        vectors = baselines.random_vectors(model, source, n=n, radius=cell.radius, seed=cell.seed)
    else:
        vectors = baselines.jacobian_vectors(
            model, prompts, source, target, k=n, radius=cell.radius, seed=cell.seed
        )
    objective = perturbation_objectives(model, vectors, prompts, target).float()
    diversity = (
        delta_similarity(model, prompts, vectors, target=target).summary()["mean_abs"]
        if len(vectors) > 1
        else math.nan
    )
    gens = generate(model, vectors, prompts, max_new_tokens=grid.max_new_tokens)
    steered = [t for per_member in gens.steered for t in per_member]
    base = _median(fluency(model, prompts, gens.unsteered or []))
    flu = _median(fluency(model, prompts, steered))
    counts = {
        name: sum(bool(re.search(pattern, t)) for t in steered)
        for name, pattern in grid.behaviors.items()
    }
    measured = {
        "cell": cell.id,
        **{k: v for k, v in asdict(cell).items() if k != "method"},
        "method": kind,
        "options": options,
        "objective_mean": float(objective.mean()),
        "objective_max": float(objective.max()),
        "diversity_mean_abs_cos": float(diversity),
        "fluency_ratio": flu / base if base and not math.isnan(base) else math.nan,
        "behaviors": counts,
        "completions": gens.steered,
        "seconds": time.perf_counter() - start,
    }
    return vectors, measured


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


# ---------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """The measurements of every finished cell, in grid order (`rows`), and where the
    artifacts are."""

    out_dir: Path
    rows: list[dict[str, Any]]
    ran: list[str]  # cells run by this call (the others were finished already)

    COLUMNS = (
        "cell",
        "prompt_set",
        "source",
        "target",
        "radius",
        "seed",
        "method",
        "options",
        "objective_mean",
        "objective_max",
        "diversity_mean_abs_cos",
        "fluency_ratio",
        "behaviors",
        "seconds",
    )

    def to_csv(self) -> str:
        buf = io.StringIO()
        columns: list[str] = list(self.COLUMNS)
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            flat: dict[str, Any] = {k: row.get(k) for k in columns}
            flat["options"] = json.dumps(row.get("options", {}), sort_keys=True)
            flat["behaviors"] = json.dumps(row.get("behaviors", {}), sort_keys=True)
            writer.writerow(flat)
        return buf.getvalue()

    def to_pandas(self) -> Any:
        """One row per cell (pandas DataFrame), behaviour counts as their own columns."""
        import pandas as pd

        records = []
        for row in self.rows:
            flat = {k: row.get(k) for k in self.COLUMNS if k != "behaviors"}
            flat.update({f"behavior:{k}": v for k, v in row.get("behaviors", {}).items()})
            records.append(flat)
        return pd.DataFrame.from_records(records)

    def artifact(self, cell_id: str) -> SteeringVectors:
        return SteeringVectors.load(self.out_dir / "cells" / f"{cell_id}.safetensors")


def _finished(out: Path, cell: Cell) -> dict[str, Any] | None:
    saved = load_unit(out / "cells", cell.id)
    return None if saved is None else saved[0]


class SweepFailed(RuntimeError):
    """Some cells failed; the others finished and are saved. `failures`: cell id -> error."""

    def __init__(self, out: Path, failures: dict[str, str], result: SweepResult) -> None:
        self.failures, self.result = failures, result
        lines = "; ".join(f"{cell}: {err}" for cell, err in failures.items())
        super().__init__(
            f"{len(failures)} of {len(failures) + len(result.rows)} cells failed ({lines}); "
            f"the {len(result.rows)} finished cells are saved in {out}, and a rerun with a "
            "fixed grid runs only the failed ones"
        )


MANIFEST = "manifest.json"


def _check_manifest(out: Path, grid: SweepGrid) -> bool:
    """Whether `out` holds this grid's manifest already; another grid's is refused."""
    path = out / MANIFEST
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("grid", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise GridError(
            f"{path} is not a sweep manifest ({err}); delete it, or pass "
            "overwrite=True (CLI: --overwrite)"
        ) from None
    now = grid.to_dict()
    if saved != now:
        differing = sorted(k for k in now if saved.get(k) != now[k])
        raise GridError(
            f"{out} holds a sweep of another grid (differs in {', '.join(differing)}); rerun "
            "it with its own grid, pass overwrite=True (CLI: --overwrite) to discard its "
            "cells and start this one, or choose another output directory"
        )
    return True


def _clear(out: Path) -> None:
    """Remove what a sweep wrote in `out` (overwrite=True)."""
    for name in (MANIFEST, "results.json", "results.csv", "report.html"):
        (out / name).unlink(missing_ok=True)
    cells = out / "cells"
    if cells.is_dir():
        for f in cells.iterdir():
            if f.suffix in (".json", ".safetensors"):
                f.unlink()


def run_sweep(
    grid: SweepGrid | dict[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    executor: str = "local",
    address: str | None = None,
    model_loader: Callable[[], Any] | None = None,
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_retries: int = 3,
    progress: bool = True,
    overwrite: bool = False,
) -> SweepResult:
    """Run every unfinished cell of `grid` and return the table of all finished ones.

    The grid is validated completely first (`SweepGrid`), `out_dir` is locked for the
    call, and nothing is written until the model has been checked against the grid (local)
    or a first cell has finished (Ray). `model_loader()` returns the model (default:
    `load_model(grid.model)`); under Ray it runs once per worker actor. `workers` (Ray) is
    the number of actors (default: as many as the cluster's resources fit, at most the
    number of pending cells), each reserving `num_cpus` / `num_gpus`. A cell that raises
    is reported and the others go on; `SweepFailed` then names the failed cells, with
    the finished ones saved. `overwrite=True` discards an earlier sweep in `out_dir`.

    Examples:
        >>> result = run_sweep("grid.yaml", "sweep_out")          # doctest: +SKIP
        >>> result.to_pandas().sort_values("objective_mean")       # doctest: +SKIP
    """
    if not isinstance(grid, SweepGrid):
        grid = SweepGrid.from_dict(grid) if isinstance(grid, dict) else SweepGrid.load(grid)
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file; give a directory")
    try:
        with exclusive_lock(out):
            ray_args = (address, workers, num_cpus, num_gpus, max_retries)
            return _sweep(grid, out, executor, model_loader, ray_args, progress, overwrite)
    except LockHeld as err:
        raise LockHeld(f"{out}: {err}") from None


def _sweep(
    grid: SweepGrid,
    out: Path,
    executor: str,
    model_loader: Callable[[], Any] | None,
    ray_args: tuple[str | None, int | None, float, float, int],
    progress: bool,
    overwrite: bool,
) -> SweepResult:
    if overwrite:
        _clear(out)
    has_manifest = _check_manifest(out, grid)
    cells = grid.cells()
    pending = [c for c in cells if _finished(out, c) is None]
    loader = model_loader or partial(_load_model, grid.model)
    say(progress, f"sweep: {len(cells)} cells, {len(cells) - len(pending)} finished already")
    failures: dict[str, str] = {}

    def save(cell: Cell, vectors: SteeringVectors, measured: dict[str, Any]) -> None:
        nonlocal has_manifest
        if not has_manifest:  # written once something is worth protecting
            (out / "cells").mkdir(parents=True, exist_ok=True)
            data = {"grid": grid.to_dict(), "cells": [c.id for c in cells]}
            atomic_write_text(out / MANIFEST, json.dumps(data, indent=2))
            has_manifest = True
        save_unit(out / "cells", cell.id, vectors, measured)

    if pending and executor == "local":
        model = loader()
        check_against_model(grid, model)
        for i, cell in enumerate(pending):
            say(progress, f"cell {i + 1} of {len(pending)}: {cell.id}")
            try:
                save(cell, *run_cell(model, grid, cell))
            except Exception as err:  # noqa: BLE001 - reported per cell, the rest go on
                failures[cell.id] = one_line(err)
                say(progress, f"cell {cell.id} failed: {failures[cell.id]}")
    elif pending:
        from melbo_lens.workflows.sweeps_ray import run_on_ray

        for i, (cell, got) in enumerate(run_on_ray(run_cell, grid, pending, loader, *ray_args)):
            if isinstance(got, str):
                failures[cell.id] = got
                say(progress, f"cell {cell.id} failed: {got}")
            else:
                save(cell, *got)
                say(progress, f"cell {i + 1} of {len(pending)} done: {cell.id}")
    rows = [row for c in cells if (row := _finished(out, c)) is not None]
    result = SweepResult(out, rows, [c.id for c in pending if c.id not in failures])
    if has_manifest:
        atomic_write_text(out / "results.json", json.dumps(json_safe(rows), indent=1))
        atomic_write_text(out / "results.csv", result.to_csv())
    if failures:
        raise SweepFailed(out, failures, result)
    return result


def _load_model(name: str) -> Any:
    from melbo_lens.models.zoo import load_model

    return load_model(name)
