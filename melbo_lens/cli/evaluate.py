"""`melbo-lens evaluate planted`: the planted-behaviour benchmark from a shell.

Loads a planted model offline (the planted-arithmetic toy, or ``--model
smollm2-135m-backdoored``: SmolLM2 with LoRA-planted backdoors), runs `evaluate_planted`
over several seeds, prints the summary table and writes every completion and statistic
to ``OUT/planted.json`` and a figure to ``OUT/planted.html``. On any model but the toy the
run uses the defaults (``--defaults``: sites, positions and R chosen automatically).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from melbo_lens.cli.options import CliError, nonnegative_int, positive_float, positive_int
from melbo_lens.cli.output import checked_directory, locked
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "suite",
        choices=["planted", "anomaly", "fragility", "miss", "finetune", "features"],
        help="planted: which latent behaviours each method elicits; anomaly: triggered inputs "
        "flagged by perturbations learned on clean prompts (smollm2-135m-backdoored); "
        "fragility: soft tokens / vector norm each planted phrase needs, backdoored vs clean; "
        "miss: why the defaults miss 'I love cheese!' and the fix, chosen and confirmed; "
        "finetune: the base -> backdoored change in SAE latents, against MELBO's vectors; "
        "features: an SAE latent clamp against mean-difference and probe vectors at equal KL",
    )
    p.add_argument(
        "--reference",
        type=positive_int,
        default=64,
        help="anomaly: clean prompts the detectors are fitted on",
    )
    p.add_argument(
        "--model",
        default="planted-arithmetic",
        help="planted-arithmetic (the toy, fast) or smollm2-135m-backdoored",
    )
    p.add_argument("--seeds", type=positive_int, default=5, help="number of seeds (0..N-1)")
    p.add_argument(
        "--n-vectors", type=positive_int, default=32, help="K vectors per method and seed"
    )
    p.add_argument("--radius", type=positive_float, default=None, help="R (default: the model's)")
    p.add_argument("--source", type=nonnegative_int, default=1, help="source layer (resid_pre)")
    p.add_argument("--target", type=nonnegative_int, default=3, help="target layer (resid_pre)")
    p.add_argument("--positions", default="last:3", help="objective positions: all | last:N")
    p.add_argument("--steps", type=positive_int, default=300, help="MELBO steps per vector")
    p.add_argument(
        "--methods",
        default="melbo,random,jacobian",
        help="comma-separated, of: melbo, adapters, random, random-2R (random vectors of twice "
        "the radius), jacobian",
    )
    p.add_argument("--adapter-radius", type=positive_float, default=4.0, help="R of the adapters")
    p.add_argument(
        "--adapter-steps", type=positive_int, default=None, help="adapter steps (default 300)"
    )
    p.add_argument(
        "--adapter-solver",
        choices=["amsgrad", "power"],
        default=None,
        help="the adapters' solver (default amsgrad; power: the safeguarded power step, "
        "affordable on CPU with --adapter-steps 20)",
    )
    p.add_argument(
        "--heldout",
        type=nonnegative_int,
        default=None,
        help="held-out prompts for generalisation (default: 16 on the toy, 32 otherwise)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens per completion")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (tiny model: 1)"
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="MELBO on pure defaults (auto sites, positions and R; --radius, --source, "
        "--target, --positions and --steps unused); random and Jacobian at MELBO's R",
    )
    p.add_argument(
        "--first-seed", type=nonnegative_int, default=0, help="seeds run from this one on"
    )
    p.add_argument(
        "--confirm-first-seed",
        type=nonnegative_int,
        default=10,
        help="miss: the fresh confirmation seeds run from this one on (--seeds of them)",
    )
    p.add_argument(
        "--selection-runs",
        action="store_true",
        help="miss: also run the chosen fix on the selection seeds (default: only on the "
        "confirmation seeds; the choice itself is measured on the selection seeds)",
    )
    p.add_argument("--out", default="evaluate_out", help="output directory")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="keep the seeds OUT/planted.json has; run the rest"
    )
    again.add_argument("--overwrite", action="store_true", help="replace OUT/planted.json")


# What defines a planted result: a resumed run must match the saved file on each of these.
RESUME_FIELDS = {
    "model": "--model",
    "n_vectors": "--n-vectors",
    "methods": "--methods",
    "radius": "--radius",
    "adapter_radius": "--adapter-radius",
    "adapter_options": "--adapter-steps / --adapter-solver",
    "source": "--source",
    "target": "--target",
    "target_positions": "--positions",
    "steps": "--steps",
    "defaults": "--defaults",
    "max_new_tokens": "--max-new-tokens",
    "n_heldout": "--heldout",
}


def _previous(path: Path, args: argparse.Namespace, seeds: list[int]) -> tuple[list, Any, float]:
    """(runs, settings, seconds) of the seeds an earlier run saved at `path`, when resuming."""
    from melbo_lens.workflows.planted import PlantedReport

    if not path.exists() or not args.resume:
        return [], None, 0.0
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = PlantedReport.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise CliError(
            f"--resume: {path} is not a readable planted benchmark ({err}); pass --overwrite "
            "to replace it"
        ) from None
    return [r for r in report.runs if r.seed in seeds], report.settings, data.get("seconds", 0.0)


def check_resumable(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse to add seeds run under other settings to a saved benchmark, naming each flag."""
    differing = [
        f"{flag} (saved {saved.get(key)!r}, now {now.get(key)!r})"
        for key, flag in RESUME_FIELDS.items()
        if key in saved and saved.get(key) != now.get(key)
    ]
    if differing:
        raise CliError(
            f"--resume: {path} was run with other settings: {', '.join(differing)}; rerun "
            "with the saved values to add seeds, or pass --overwrite or another --out"
        )


def _uses_defaults(args: argparse.Namespace, toy: bool) -> bool:
    """Whether the run chooses sites, positions, R and steps itself: always, except on the
    toy without `--defaults`."""
    return args.defaults or not toy


def _expected_settings(args: argparse.Namespace, methods: list[str], toy: bool, model_name):
    """The settings `evaluate_planted` will record for this command, before any work."""
    from melbo_lens.models.toy import DEFAULT_RADIUS

    defaults = _uses_defaults(args, toy)
    positions = _positions(args.positions)
    return {
        "model": model_name,
        "n_vectors": args.n_vectors,
        "methods": methods,
        "radius": "auto"
        if defaults
        else args.radius
        if args.radius is not None
        else DEFAULT_RADIUS,
        "adapter_radius": args.adapter_radius,
        "adapter_options": _adapter_options(args),
        "source": f"blocks.{args.source}.hook_resid_pre",
        "target": f"blocks.{args.target}.hook_resid_pre",
        "target_positions": "auto"
        if defaults
        else "all"
        if positions is None
        else f"last {positions}",
        "steps": "auto" if defaults else args.steps,
        "defaults": defaults,
        "max_new_tokens": args.max_new_tokens,
        "n_heldout": _heldout(args, toy),
    }


def _command(args: argparse.Namespace, toy: bool) -> str:
    """The command line that reproduces this run (for the page). On any model but the toy
    the run uses the defaults, so the toy's site, position and step flags are left out."""
    parts = ["melbo-lens evaluate planted", f"--model {args.model}", f"--seeds {args.seeds}",
             f"--first-seed {args.first_seed}", f"--n-vectors {args.n_vectors}",
             f"--methods {args.methods}", f"--max-new-tokens {args.max_new_tokens}"]  # fmt: skip
    if _uses_defaults(args, toy):
        parts.append("--defaults")
    else:
        parts += [f"--source {args.source}", f"--target {args.target}",
                  f"--positions {args.positions}", f"--steps {args.steps}"]  # fmt: skip
        if args.radius is not None:
            parts.append(f"--radius {args.radius:g}")
    parts.append(f"--adapter-radius {args.adapter_radius:g}")
    optional = {
        "--adapter-steps": args.adapter_steps,
        "--adapter-solver": args.adapter_solver,
        "--heldout": args.heldout,
    }
    for flag, value in optional.items():
        if value is not None:
            parts.append(f"{flag} {value}")
    return " ".join([*parts, f"--threads {args.threads}", f"--out {args.out}"])


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    """`AdapterConfig` fields the flags set (none: its defaults)."""
    given = {"steps": args.adapter_steps, "solver": args.adapter_solver}
    return {k: v for k, v in given.items() if v is not None}


def _heldout(args: argparse.Namespace, toy: bool) -> int:
    return args.heldout if args.heldout is not None else 16 if toy else 32


def _positions(spec: str) -> int | None:
    if spec == "all":
        return None
    if spec.startswith("last:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise CliError(f"--positions must be 'all' or 'last:N' with N >= 1, got {spec!r}")


def _methods(spec: str) -> list[str]:
    from melbo_lens.workflows.planted import METHODS

    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise CliError(
            f"--methods {spec!r}: unknown {unknown}; choose from {', '.join(METHODS)}"
            if unknown
            else f"--methods {spec!r}: name at least one of {', '.join(METHODS)}"
        )
    return methods


def run(args: argparse.Namespace) -> int:
    if args.suite == "anomaly":
        from melbo_lens.cli.evaluate_anomaly import run_anomaly

        return run_anomaly(args)
    if args.suite == "fragility":
        from melbo_lens.cli.evaluate_fragility import run_fragility

        return run_fragility(args)
    if args.suite == "features":
        from melbo_lens.cli.evaluate_features import run_features

        return run_features(args)
    if args.suite == "finetune":
        from melbo_lens.cli.evaluate_finetune import run_finetune

        return run_finetune(args)
    if args.suite == "miss":
        from melbo_lens.cli.evaluate_miss import run_miss

        return run_miss(args)
    import torch

    from melbo_lens.models.zoo import load_model

    methods = _methods(args.methods)  # every flag checked before the lock and the model
    positions = _positions(args.positions)
    out = checked_directory(args.out, "--out")
    path = out / "planted.json"
    with locked(out):
        if path.exists() and not (args.resume or args.overwrite):
            raise CliError(
                f"--out {out} already holds a planted benchmark ({path.name}); pass --resume "
                "to keep its seeds and run the rest, --overwrite to replace it, or another --out"
            )
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        model = load_model(args.model)
        toy = model.cfg.model_name == "planted-arithmetic"
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        runs, settings, seconds_before = _previous(path, args, seeds)
        if settings is not None:
            now = _expected_settings(args, methods, toy, model.cfg.model_name)
            check_resumable(settings, now, path)
        return _run_seeds(
            args,
            model,
            toy,
            methods,
            positions,
            out,
            path,
            seeds,
            runs,
            settings,
            seconds_before,
            start,
        )


def _run_seeds(
    args, model, toy, methods, positions, out, path, seeds, runs, settings, seconds_before, start
) -> int:
    from melbo_lens.core.sites import HookSite
    from melbo_lens.models.toy import DEFAULT_RADIUS, TRIGGER_PHRASES
    from melbo_lens.workflows.planted import PlantedReport, evaluate_planted, planted_page

    done = {run.seed for run in runs}
    report = None
    for seed in seeds:
        if seed in done:
            print(f"seed {seed}: kept from {path}")
            continue
        part = evaluate_planted(
            model,
            n_vectors=args.n_vectors,
            radius=args.radius if args.radius is not None else DEFAULT_RADIUS,
            seeds=[seed],
            source=HookSite(args.source, "resid_pre"),
            target=HookSite(args.target, "resid_pre"),
            target_positions=positions,
            steps=args.steps,
            methods=methods,
            max_new_tokens=args.max_new_tokens,
            n_heldout=_heldout(args, toy),
            log=lambda line: print(line, flush=True),
            defaults=_uses_defaults(args, toy),
            adapter_radius=args.adapter_radius,
            adapter_options=_adapter_options(args),
        )
        runs += part.runs
        settings = {
            **part.settings,
            "seeds": sorted({run.seed for run in runs}),
            "radii": {**(settings or {}).get("radii", {}), **part.settings["radii"]},
        }
        report = PlantedReport(runs, settings, part.behaviours)
        elapsed = seconds_before + time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)  # after every seed: a stopped run resumes
        data = report.to_dict() | {"seconds": round(elapsed, 1), "command": _command(args, toy)}
        atomic_write_text(path, json.dumps(data, indent=2))
    if report is None:
        report = PlantedReport(runs, settings or {}, list(TRIGGER_PHRASES))
    seconds = time.perf_counter() - start
    print(report.table())
    print(f"total {seconds:.0f}s")
    from melbo_lens.views.figures import planted_benchmark

    figure = out / "planted.html"  # self-contained: plotly.js inlined, works offline
    planted_benchmark(report).write_html(figure, include_plotlyjs=True)
    saved = report.to_dict() | {"command": _command(args, toy)}
    atomic_write_text(out / "planted.md", planted_page(saved))
    print(f"wrote {out / 'planted.json'}, {out / 'planted.md'} and {figure}")
    return 0
