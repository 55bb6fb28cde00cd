"""`melbo-lens sweep`: train at a grid of radii and recommend R at the cusp.

For each R it trains MELBO vectors, completes the prompts under each, and prints
objective, diversity, fluency (median perplexity under the unsteered model) and
repetition per R with the recommended R (see `methods.radius`). Writes OUT/sweep.json
(a `RadiusSweep`, completions included); each finished radius is saved at once as
OUT/radius_R.json and OUT/radius_R.safetensors, so `--resume` continues a killed sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from melbo_lens.cli.options import (
    CliError,
    add_training_args,
    melbo_config,
    positive_float,
    positive_int,
    prompt_set,
    read_prompts,
)
from melbo_lens.cli.output import checked_directory, claimed_output
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_args(p, n_vectors=4)
    p.add_argument("--radii", default="2,4,8,16,32,64", help="comma-separated radii")
    g = p.add_argument_group("grid sweeps (prompt sets x sites x radii x seeds x methods)")
    g.add_argument(
        "--grid",
        help="a .yaml/.json sweep grid (see melbo_lens.workflows.sweeps.SweepGrid); one "
        "artifact per cell in OUT/cells, the table in OUT/results.csv, resumable",
    )
    g.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="run cells here one by one, or as tasks on a Ray cluster",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster: 'auto' joins the one this machine is in, ray://HOST:10001 a "
        "remote one (default: start a local instance)",
    )
    g.add_argument("--workers", type=positive_int, default=None, help="Ray actors (models)")
    g.add_argument("--cpus-per-cell", type=positive_float, default=1.0, help="Ray num_cpus")
    g.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray num_gpus")
    p.add_argument(
        "--fluency-limit",
        type=float,
        default=3.0,
        help="collapse when median perplexity > this x the unsteered completions'",
    )
    p.add_argument("--repetition-limit", type=float, default=None, help="also collapse above")
    p.add_argument(
        "--save-vectors",
        action="store_true",
        help="keep the vectors in the result (OUT/radius_R.safetensors are always written)",
    )
    p.add_argument("--show", type=int, default=1, help="completions shown per R (prompt 0)")
    p.add_argument("--width", type=int, default=100, help="completions width")
    p.set_defaults(out="sweep_out", max_new_tokens=32)


# what a --grid run reads from the command line; the grid file defines everything else
GRID_FLAGS = {
    "grid",
    "executor",
    "address",
    "workers",
    "cpus_per_cell",
    "gpus_per_cell",
    "out",
    "overwrite",
    "resume",
    "quiet",
    "debug",
    "command",
    "func",
    "threads",
}
RAY_FLAGS = ("executor", "address", "workers", "cpus_per_cell", "gpus_per_cell")


def _given(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line (those that differ from the defaults)."""
    from melbo_lens.cli import build_parser

    defaults = vars(build_parser().parse_args(["sweep"]))
    return [k for k, v in vars(args).items() if k in defaults and v != defaults[k]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args: argparse.Namespace) -> int:
    given = _given(args)
    if args.grid:
        ignored = [_flag(k) for k in given if k not in GRID_FLAGS]
        if ignored:
            raise CliError(
                f"--grid {args.grid} defines the sweep, so {', '.join(ignored)} would be "
                "ignored; set them in the grid file (model, radii, config: {n_vectors: ...}, "
                "...) and drop them here"
            )
        return _grid_sweep(args)
    ray_only = [_flag(k) for k in given if k in RAY_FLAGS]
    if ray_only:
        raise CliError(f"{', '.join(ray_only)} only apply to a --grid sweep; pass --grid FILE")
    try:
        radii = [float(r) for r in args.radii.split(",") if r.strip()]
    except ValueError:
        raise CliError(f"--radii must be comma-separated numbers, got {args.radii!r}") from None
    if not radii or not all(math.isfinite(r) and r > 0 for r in radii):
        raise CliError(f"--radii must be finite numbers > 0, got {args.radii!r}")
    with claimed_output(args, "sweep.json") as (path, _):
        saved = sorted(path.parent.glob("radius_*.json"))
        if saved and not (args.resume or args.overwrite):
            raise CliError(
                f"--out {path.parent} holds {len(saved)} finished radii of an interrupted "
                "sweep; pass --resume to continue it or --overwrite to start over, or choose "
                "another --out"
            )
        if args.overwrite:
            for old in saved:
                old.unlink()
                old.with_suffix(".safetensors").unlink(missing_ok=True)
        return _sweep(args, radii, path)


def _sweep(args: argparse.Namespace, radii: list[float], path: Path) -> int:
    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.radius import select_radius

    model = load_model(args.model, bridge=args.bridge)
    prompts = read_prompts(args)
    ps = prompt_set(model, prompts, not args.no_chat, args.target_positions)
    config = melbo_config(args, radii[0])
    print(
        f"melbo-lens sweep: {args.model}, {args.n_vectors} vectors x {config.loop_steps()} steps, "
        f"radii {radii}; each finished radius is kept in {path.parent} (--resume continues)"
    )
    start = time.perf_counter()
    result = select_radius(
        model,
        ps,
        config,
        radii,
        max_new_tokens=args.max_new_tokens,
        fluency_limit=args.fluency_limit,
        repetition_limit=args.repetition_limit,
        keep_vectors=args.save_vectors,
        progress=not args.quiet,
        save_dir=path.parent,
        max_rows_per_pass=args.max_rows_per_pass,
    )
    seconds = time.perf_counter() - start
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2))
    print()
    if args.show > 0:
        print(f"unsteered  | {_short(result.unsteered[0], args.width)}")
        for r, comps in zip(result.radii, result.completions, strict=True):
            for v in range(min(args.show, len(comps))):
                print(f"R={r:<7g} v{v} | {_short(comps[v][0], args.width)}")
        print()
    print(result.table())
    print(f"\nswept {len(radii)} radii in {seconds:.1f} s -> {path}")
    return 0


def _grid_sweep(args: argparse.Namespace) -> int:
    from melbo_lens.core.io import LockHeld
    from melbo_lens.workflows.sweeps import GridError, SweepFailed, SweepGrid, run_sweep
    from melbo_lens.workflows.sweeps_ray import ResourcesUnavailable

    if not Path(args.grid).is_file():
        raise CliError(f"--grid {args.grid}: no such file")
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other; pass one")
    try:
        grid = SweepGrid.load(args.grid)
    except GridError as err:
        raise CliError(f"--grid {err}") from None
    out = checked_directory(args.out, "--out")
    try:  # finished cells are never redone: a rerun resumes (--resume is the default)
        result = run_sweep(
            grid,
            out,
            executor=args.executor,
            address=args.address,
            workers=args.workers,
            num_cpus=args.cpus_per_cell,
            num_gpus=args.gpus_per_cell,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except LockHeld as err:
        raise CliError(f"--out {err}") from None
    except GridError as err:
        raise CliError(
            f"--grid {args.grid}: {err}".replace("overwrite=True (CLI: --overwrite)", "--overwrite")
        ) from None
    except ResourcesUnavailable as err:
        raise CliError(str(err)) from None
    except SweepFailed as err:
        if err.result.rows:
            _tables(err.result, out)
        raise CliError(str(err)) from None
    _tables(result, out)
    return 0


def _tables(result, out: Path) -> None:
    from melbo_lens.views.sweep_report import write_sweep_report

    report = write_sweep_report(result)
    print(result.to_pandas().drop(columns=["cell", "options"]).to_string(index=False))
    print(f"\n{len(result.rows)} cells ({len(result.ran)} run now) -> {out}/results.csv, {report}")


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"
