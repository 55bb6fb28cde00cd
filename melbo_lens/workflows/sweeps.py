"""Sweeps over a grid: prompt sets x (source, target) sites x radii x seeds x methods.

A *cell* is one point of the grid: train (or draw) the vectors of one method at one
radius, seed, site pair and prompt set, then measure them: MELBO objective, diversity
(mean |cos| between the members' target deltas: lower is more diverse), fluency (median
perplexity of the steered completions over the unsteered ones) and behaviour counts
(the grid's named regular expressions, matched against the completions).

`run_sweep(grid, out_dir)` writes, atomically, one artifact per cell
(`OUT/cells/ID.safetensors`) and its measurements (`OUT/cells/ID.json`, written last, so
a cell counts as finished only when both exist), a manifest of the grid and its cells
(`OUT/manifest.json`), and the table of every finished cell (`OUT/results.json`,
`OUT/results.csv`). A rerun with the same grid skips finished cells, so a killed sweep
loses only the cells in flight; a manifest of another grid is refused.

Executors: `"local"` (default) runs the cells one after another in this process with one
model. `"ray"` runs each cell as a task on a Ray cluster (`address="auto"` joins a running
one; None starts a local instance): one actor per worker loads the model once and runs
cells, a worker that dies mid-cell is restarted and the cell retried (`max_retries`),
and the driver writes every file, so workers need no shared filesystem.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from melbo_lens.core.io import atomic_write_text
from melbo_lens.core.prompts import PromptSet, parse_positions
from melbo_lens.core.sites import parse_site
from melbo_lens.perturbations.vectors import SteeringVectors
from melbo_lens.workflows.saved import load_unit, save_unit

__all__ = ["Cell", "SweepGrid", "SweepResult", "run_cell", "run_sweep"]

METHODS = ("melbo", "random", "jacobian")


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep and what every cell shares.

    `prompts`: named prompt sets (name -> list of prompts); `sites`: (source, target)
    pairs as layer numbers or hook names; `methods`: dicts with a `method` ("melbo",
    "random", "jacobian") and, for melbo, any `MelboConfig` field (e.g. `solver`);
    `config`: fields every cell's `MelboConfig` shares (n_vectors, steps, ...);
    `behaviors`: name -> regular expression counted in the completions.
    """

    model: str
    prompts: dict[str, list[Any]]
    sites: list[tuple[str, str]]
    radii: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[dict[str, Any]] = field(default_factory=lambda: [{"method": "melbo"}])
    config: dict[str, Any] = field(default_factory=dict)
    behaviors: dict[str, str] = field(default_factory=dict)
    chat: bool = True
    target_positions: str = "auto"
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        problems = []
        if not self.prompts or not all(self.prompts.values()):
            problems.append("prompts must name at least one non-empty prompt set")
        if not self.sites:
            problems.append("sites must hold at least one [source, target] pair")
        if not self.radii or not all(
            isinstance(r, int | float) and 0 < r < math.inf for r in self.radii
        ):
            problems.append(f"radii must be finite numbers > 0, got {self.radii}")
        for m in self.methods:
            if m.get("method") not in METHODS:
                problems.append(f"method must be one of {METHODS}, got {m.get('method')!r}")
        try:
            parse_positions(self.target_positions)
        except ValueError as err:
            problems.append(f"target_positions {err}")
        for name, pattern in self.behaviors.items():
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"behaviour {name!r}: bad regular expression ({err})")
        if problems:
            raise ValueError("invalid sweep grid: " + "; ".join(problems))
        object.__setattr__(self, "sites", [tuple(map(str, s)) for s in self.sites])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepGrid:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sweep grid fields {sorted(unknown)}; known: {sorted(known)}")
        missing = [k for k in ("model", "prompts", "sites", "radii") if k not in data]
        if missing:
            raise ValueError(f"a sweep grid needs the fields {missing} (missing)")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepGrid:
        """A grid from a .yaml/.yml or .json file."""
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sweep grid is a mapping of fields, got {type(data)}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [list(s) for s in self.sites]
        return data

    def cells(self) -> list[Cell]:
        """Every point of the grid, in a fixed order."""
        axes = itertools.product(
            sorted(self.prompts), self.sites, self.radii, self.seeds, self.methods
        )
        return [
            Cell(prompt_set, src, tgt, float(radius), int(seed), dict(method))
            for prompt_set, (src, tgt), radius, seed, method in axes
        ]


@dataclass(frozen=True)
class Cell:
    """One point of a sweep grid."""

    prompt_set: str
    source: str
    target: str
    radius: float
    seed: int
    method: dict[str, Any]

    @property
    def id(self) -> str:
        """A readable, filesystem-safe name that is unique within a grid."""
        label = "-".join(f"{k}={v}" for k, v in sorted(self.method.items()) if k != "method")
        text = (
            f"{self.prompt_set}_{self.method['method']}{('-' + label) if label else ''}_"
            f"s{self.source}_t{self.target}_R{self.radius:g}_seed{self.seed}"
        )
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{safe[:100]}_{digest[:8]}"


# ---------------------------------------------------------------------- one cell
def run_cell(model: Any, grid: SweepGrid, cell: Cell) -> tuple[SteeringVectors, dict[str, Any]]:
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


def _manifest(out: Path, grid: SweepGrid, cells: list[Cell]) -> None:
    path = out / "manifest.json"
    data = {"grid": grid.to_dict(), "cells": [c.id for c in cells]}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("grid") != data["grid"]:
            differing = sorted(
                k for k in data["grid"] if saved.get("grid", {}).get(k) != data["grid"][k]
            )
            raise ValueError(
                f"{out} holds a sweep of another grid (differs in {', '.join(differing)}); "
                "resume it with its own grid, or choose another output directory"
            )
        return
    atomic_write_text(path, json.dumps(data, indent=2))


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
) -> SweepResult:
    """Run every unfinished cell of `grid` and return the table of all finished ones.

    `model_loader()` returns the model (default: `load_model(grid.model)`); under Ray it
    runs once per worker actor. `workers` (Ray) is the number of actors (default: as many
    as the cluster's resources fit, at most the number of pending cells), each reserving
    `num_cpus` / `num_gpus`.

    Examples:
        >>> result = run_sweep("grid.yaml", "sweep_out")          # doctest: +SKIP
        >>> result.to_pandas().sort_values("objective_mean")       # doctest: +SKIP
    """
    if not isinstance(grid, SweepGrid):
        grid = SweepGrid.from_dict(grid) if isinstance(grid, dict) else SweepGrid.load(grid)
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = grid.cells()
    _manifest(out, grid, cells)
    pending = [c for c in cells if _finished(out, c) is None]
    loader = model_loader or partial(_load_model, grid.model)
    _say(progress, f"sweep: {len(cells)} cells, {len(cells) - len(pending)} finished already")
    if pending and executor == "local":
        model = loader()
        for i, cell in enumerate(pending):
            _say(progress, f"cell {i + 1} of {len(pending)}: {cell.id}")
            save_unit(out / "cells", cell.id, *run_cell(model, grid, cell))
    elif pending:
        from melbo_lens.workflows.sweeps_ray import run_on_ray

        for i, (cell, vectors, measured) in enumerate(
            run_on_ray(grid, pending, loader, address, workers, num_cpus, num_gpus, max_retries)
        ):
            save_unit(out / "cells", cell.id, vectors, measured)
            _say(progress, f"cell {i + 1} of {len(pending)} done: {cell.id}")
    rows = [row for c in cells if (row := _finished(out, c)) is not None]
    result = SweepResult(out, rows, [c.id for c in pending])
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "results.csv", result.to_csv())
    return result


def _load_model(name: str) -> Any:
    from melbo_lens.models.zoo import load_model

    return load_model(name)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)
