"""The `melbo-lens` command: train, generate, demo and bench from a shell.

melbo-lens demo --out demo_out            # the main job, offline, SmolLM2-135M-Instruct
melbo-lens train --prompt "Hi" --source 7 --target blocks.22.hook_resid_pre --out run
melbo-lens generate run/vectors.safetensors --prompt "Tell me a story"
melbo-lens bench                           # speed against a naive reference
melbo-lens report run                      # RUN/report.html: one self-contained page
melbo-lens evaluate planted                # does MELBO find the toy's planted backdoors?
melbo-lens sweep --radii 4,8,16,32 --prompt "How can I tame a wolf?"   # choose R
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from melbo_lens.core.io import atomic_write_text

__all__ = ["main"]

from melbo_lens.cli.options import (
    BASELINES,
    DEFAULT_MODEL,
    SUPERVISED,
    _add_training_args,
    _print_vectors,
    _prompt_set,
    _read_prompts,
    _site,
    _train,
)


def cmd_train(args: argparse.Namespace) -> int:
    if args.method == "adapters":
        from melbo_lens.cli.methods import train_adapters

        return train_adapters(args)
    if args.method != "melbo":
        from melbo_lens.cli.methods import train_other

        return train_other(args)
    if args.radius is None:
        args.radius = 4.0
    _, _, vectors, path, seconds = _train(args, _read_prompts(args))
    _print_vectors(vectors)
    state = "complete" if vectors.complete else "INTERRUPTED (resume with --resume)"
    print(f"\n{len(vectors)} vectors ({state}) in {seconds:.1f} s -> {path}")
    return 0 if vectors.complete else 130


def cmd_generate(args: argparse.Namespace) -> int:
    from melbo_lens.generation import generate
    from melbo_lens.models.zoo import load_model
    from melbo_lens.perturbations.artifact import load_artifact

    vectors = load_artifact(args.vectors)
    model = load_model(args.model or vectors.metadata.get("load_name") or DEFAULT_MODEL)
    prompts = _read_prompts(args)
    indices = [int(i) for i in args.indices.split(",")] if args.indices else None
    gens = generate(
        model,
        vectors,
        prompts,
        indices=indices,
        scale=args.scale,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
        chat=not args.no_chat,
    )
    print(gens.table(width=args.width))
    if args.json:
        atomic_write_text(args.json, json.dumps(gens.to_dict(), indent=2))
        print(f"\ncompletions -> {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from melbo_lens.generation import generate_steered

    prompts = _read_prompts(args)
    print(f"melbo-lens demo: {args.model}, {args.n_vectors} vectors, prompt: {prompts[0]!r}")
    model, ps, vectors, path, seconds = _train(args, prompts)
    _print_vectors(vectors)
    gens = generate_steered(model, vectors, ps, max_new_tokens=args.max_new_tokens)
    print()
    print(gens.table(width=args.width))
    completions = Path(args.out) / "completions.json"
    atomic_write_text(completions, json.dumps(gens.to_dict(), indent=2))
    print(f"\ntrained in {seconds:.1f} s; vectors -> {path}; completions -> {completions}")
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.runs import analyze_run

    start = time.perf_counter()
    run = analyze_run(model, vectors, ps, generations=gens, progress=not args.quiet)
    run.save(args.out)
    report = write_report(run, Path(args.out) / "report.html")
    print(f"analysed and reported in {time.perf_counter() - start:.1f} s")
    print(f"report -> {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.runs import ANALYSIS_JSON, VECTORS_FILE, RunAnalysis, analyze_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    if (run_dir / ANALYSIS_JSON).is_file() and not args.recompute:
        run = RunAnalysis.load(run_dir)
    else:
        from melbo_lens.generation import SteeredGenerations
        from melbo_lens.models.zoo import load_model
        from melbo_lens.perturbations.vectors import SteeringVectors

        if not (run_dir / VECTORS_FILE).is_file():
            raise FileNotFoundError(
                f"{run_dir} holds neither a saved analysis ({ANALYSIS_JSON}) nor vectors "
                f"({VECTORS_FILE}); train some with `melbo-lens train --out {run_dir}`"
            )
        vectors = SteeringVectors.load(run_dir / VECTORS_FILE)
        name = args.model or vectors.metadata.get("load_name") or vectors.model_name
        model = load_model(name or DEFAULT_MODEL)
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
            progress=not args.quiet,
        )
        run.save(run_dir)
        print(f"analysed in {time.perf_counter() - start:.1f} s -> {run_dir / ANALYSIS_JSON}")
    path = write_report(run, args.out or run_dir / "report.html")
    print(f"report -> {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from melbo_lens.workflows.bench import adapters_benchmark, run_benchmark

    if args.adapters:
        adapters_benchmark(args.model, args.n_vectors, args.timed_steps, args.threads)
    else:
        run_benchmark(args)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from melbo_lens.analysis.similarity import compare_vectors
    from melbo_lens.perturbations.vectors import SteeringVectors

    a, b = SteeringVectors.load(args.a), SteeringVectors.load(args.b)
    model = prompts = None
    if args.model:
        from melbo_lens.models.zoo import load_model

        model = load_model(args.model)
        prompts = _prompt_set(model, _read_prompts(args), not args.no_chat, args.target_positions)
    result = compare_vectors(
        a,
        b,
        model=model,
        prompts=prompts,
        target=_site(args.target, "resid_pre") if args.target else None,
        labels=(Path(args.a).stem, Path(args.b).stem),
    )
    print(result)
    if args.json:
        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from melbo_lens.cli.explain import explain

    return explain(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from melbo_lens.cli.sweep import sweep

    return sweep(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from melbo_lens.cli.evaluate import evaluate

    return evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melbo-lens", description=(__doc__ or "melbo-lens").splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train MELBO steering vectors")
    _add_training_args(p, n_vectors=8, steps=300)
    p.add_argument("--resume", action="store_true", help="continue OUT/vectors.safetensors")
    p.add_argument(
        "--method",
        default="melbo",
        choices=["melbo", "adapters", *SUPERVISED, *BASELINES],
        help="melbo vectors, adapters (MELBO adapters on the source block's MLP), "
        "mean-diff|pca|probe (contrast pairs), random|jacobian|hessian (baselines)",
    )
    p.add_argument("--rank", type=int, default=1, help="adapters: rank r")
    p.add_argument("--positive-file", help="mean-diff/pca/probe: positive prompts")
    p.add_argument("--negative-file", help="mean-diff/pca/probe: negative prompts (paired)")
    p.add_argument("--position", default="last", help="last | mean | answer | an index")
    p.add_argument("--answer-tokens", help="position=answer: comma-separated tokens or ids")
    p.add_argument("--center", action="store_true", help="pca: centre the differences")
    p.add_argument("--l2", type=float, default=1e-2, help="probe: L2 strength")
    p.add_argument("--stability", action="store_true", help="print the pairs-stability curve")
    p.add_argument("--iterations", type=int, default=40, help="jacobian/hessian: blocks")
    p.add_argument("--tol", type=float, default=1e-5, help="jacobian/hessian: residual tol")
    p.add_argument("--at", help="hessian: FILE.safetensors:INDEX, the point (p != 2)")
    p.set_defaults(func=cmd_train, radius=None)

    p = sub.add_parser("demo", help="the main job: train on SmolLM2 and show steered text")
    _add_training_args(p, n_vectors=6, steps=100)
    p.add_argument("--width", type=int, default=110)
    # The first token (<|im_start|>) has ~6x the residual norm of the others; with all
    # positions its ||Δ_0|| dominates the objective, so the demo leaves it out. Residual
    # norms at SmolLM2's layer 7 are ~100-140 per token: without the first token, R = 16
    # changes behaviour while staying fluent (R = 32 gives gibberish; R = 4, the source's
    # value for Qwen-1.8B, barely changes the completions). `melbo-lens sweep` measures it.
    p.set_defaults(func=cmd_demo, out="demo_out", radius=16.0, target_positions="1:")

    p = sub.add_parser("report", help="one self-contained HTML report of a run directory")
    p.add_argument("run_dir", help="a directory from `train` or `demo` (vectors.safetensors)")
    p.add_argument("--model", default=None, help="default: the vectors' provenance")
    p.add_argument("--out", default=None, help="default: RUN_DIR/report.html")
    p.add_argument("--recompute", action="store_true", help="redo a saved analysis")
    p.add_argument("--sae", default="auto", help="'auto' (packaged, if one fits), 'none', a path")
    p.add_argument("--n-random", type=int, default=32, help="random vectors for the baseline")
    p.add_argument(
        "--attribution",
        default="exact",
        choices=["exact", "attribution_patching", "integrated_gradients"],
        help="exact split of Δ (default), or node estimates verified by patching (slower)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="steered completions from a saved vectors file")
    p.add_argument("vectors")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", action="append")
    p.add_argument("--prompts-file")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--indices", help="comma-separated vector indices (default: all)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=110)
    p.add_argument("--json", help="also write the completions as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time melbo_lens against a naive reference")
    from melbo_lens.workflows.bench import add_arguments

    add_arguments(p)
    p.add_argument("--adapters", action="store_true", help="adapters: K together vs one by one")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="cosines, nearest matches, principal angles of two files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--model", help="also compare target-layer deltas on this model")
    p.add_argument("--prompt", action="append")
    p.add_argument("--prompts-file")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--target", help="target site for deltas (default: the artifacts' target)")
    p.add_argument("--target-positions", default="all")
    p.add_argument("--json", help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("explain", help="decompose saved vectors onto an SAE's features")
    from melbo_lens.cli.explain import add_arguments as add_explain_arguments

    add_explain_arguments(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("sweep", help="train at a grid of radii; recommend R at the cusp")
    from melbo_lens.cli.sweep import add_arguments as add_sweep_arguments

    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="benchmarks: `evaluate planted` (the planted toy)")
    from melbo_lens.cli.evaluate import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"melbo-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
