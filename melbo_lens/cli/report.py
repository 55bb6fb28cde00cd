"""`melbo-lens report`: one self-contained HTML report of a run directory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from melbo_lens.cli.options import DEFAULT_MODEL, CliError, add_corpus_arg, resolve_corpus
from melbo_lens.cli.output import claimed_file, locked

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory from `train` or `demo` (vectors.safetensors)")
    p.add_argument("--model", default=None, help="default: the vectors' provenance")
    p.add_argument(
        "--out", default=None, help="an HTML file, or a folder for report.html (default: RUN_DIR)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    p.add_argument("--recompute", action="store_true", help="redo a saved analysis")
    p.add_argument("--sae", default="auto", help="'auto' (packaged, if one fits), 'none', a path")
    p.add_argument("--n-random", type=int, default=32, help="random vectors for the baseline")
    add_corpus_arg(p)
    p.add_argument(
        "--attribution",
        default="exact",
        choices=["exact", "attribution_patching", "integrated_gradients"],
        help="exact split of Δ (default), or node estimates verified by patching (slower)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CliError(f"no run directory {run_dir}; give a folder that `train` or `demo` wrote")
    out = Path(args.out) if args.out else run_dir
    if out.is_dir() or (args.out and args.out.endswith(("/", "\\"))):
        out = out / "report.html"
    with claimed_file(out, "--out", overwrite=args.overwrite) as path, locked(run_dir, "RUN_DIR"):
        return _report(args, run_dir, path)


def _report(args: argparse.Namespace, run_dir: Path, out: Path) -> int:
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.runs import ANALYSIS_JSON, VECTORS_FILE, RunAnalysis, analyze_run

    if (run_dir / ANALYSIS_JSON).is_file() and not args.recompute:
        run = RunAnalysis.load(run_dir)
    else:
        from melbo_lens.generation import SteeredGenerations
        from melbo_lens.models.zoo import load_model
        from melbo_lens.perturbations.vectors import SteeringVectors

        if not (run_dir / VECTORS_FILE).is_file():
            raise CliError(
                f"RUN_DIR {run_dir} holds neither a saved analysis ({ANALYSIS_JSON}) nor vectors "
                f"({VECTORS_FILE}); train some with `melbo-lens train --out {run_dir}`"
            )
        vectors = SteeringVectors.load(run_dir / VECTORS_FILE)
        name = args.model or vectors.metadata.get("load_name") or vectors.model_name
        model = load_model(name or DEFAULT_MODEL)
        _check_fits(vectors, model, args.model)
        gens = None
        saved = run_dir / "completions.json"
        if saved.is_file():
            gens = SteeredGenerations(**json.loads(saved.read_text()))
            if gens.indices != list(range(len(vectors))):
                gens = None  # made for other vectors: generate afresh
        sae = None if args.sae == "none" else args.sae
        start = time.perf_counter()
        run = analyze_run(
            model,
            vectors,
            generations=gens,
            sae=sae,
            n_random=args.n_random,
            max_new_tokens=args.max_new_tokens,
            attribution=args.attribution,
            corpus=resolve_corpus(args, model.tokenizer),
            dashboard_tokens=args.dashboard_tokens,
            progress=not args.quiet,
        )
        run.save(run_dir)
        print(f"analysed in {time.perf_counter() - start:.1f} s -> {run_dir / ANALYSIS_JSON}")
    path = write_report(run, out)
    print(f"report -> {path}")
    return 0


def _check_fits(vectors, model, flag_model: str | None) -> None:
    """Vectors made for another model (width or depth) are refused before any analysis."""
    d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
    site = vectors.site
    if vectors.d_model == d_model and site.layer < n_layers:
        return
    made_for = vectors.metadata.get("load_name") or vectors.model_name
    given = f"--model {flag_model}" if flag_model else "the model"
    fix = f"pass --model {made_for}" if made_for else "pass the model they were trained on"
    raise CliError(
        f"{given} ({model.cfg.model_name}: d_model={d_model}, {n_layers} layers) does not fit "
        f"the vectors (d_model={vectors.d_model}, site {site.name}, made for "
        f"{made_for or 'an unrecorded model'}); {fix}"
    )
