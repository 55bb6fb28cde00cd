"""`melbo-lens bench`: time melbo_lens against a naive reference."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to time on")
    p.add_argument("--source", default="7", help="source layer or hook name")
    p.add_argument("--target", default="blocks.22.hook_resid_pre", help="target layer or hook name")
    p.add_argument("--radius", type=float, default=4.0, help="R")
    p.add_argument("--n-vectors", type=int, default=32, help="K for the batched timing")
    p.add_argument("--naive-steps", type=int, default=300, help="steps of the naive reference run")
    p.add_argument("--timed-steps", type=int, default=3, help="steps timed for K vectors")
    p.add_argument(
        "--diversity-vectors", type=int, default=4, help="vectors for the diversity timing"
    )
    p.add_argument("--power-steps", type=int, default=10, help="steps of the power-solver timing")
    p.add_argument(
        "--slots", type=int, default=32, help="orthogonal vectors for the time-to-N timing"
    )
    p.add_argument(
        "--noise-seed",
        type=int,
        default=None,
        help="with --vectors: also run the fixed-step window from this seed, to show the "
        "rank-by-rank spread a change of seed alone causes",
    )
    p.add_argument(
        "--reference-slots",
        type=int,
        default=None,
        help="slots of the previous default actually run (default: all; its time for "
        "--slots is then per-slot time x slots)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--out", default="bench_out", help="directory for bench.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    p.add_argument("--adapters", action="store_true", help="adapters: K together vs one by one")
    p.add_argument(
        "--vectors",
        action="store_true",
        help="only (f) time to --slots orthogonal vectors (the default vs fixed steps per slot "
        "and the previous default) and (g) the planted vector 0; writes OUT/bench_vectors.json",
    )
    p.add_argument(
        "--families",
        action="store_true",
        help="per-step cost of every family and objective (adapters, soft prompts, "
        "on-manifold, consistency, logprob) against vectors; writes OUT/bench_families.json",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="explanations: dashboards of every latent of a packaged SAE over the corpus, "
        "and cards for --n-vectors vectors (default 8 here)",
    )
    p.add_argument(
        "--explain-tokens", type=int, default=1_000_000, help="corpus tokens the dashboards read"
    )
    p.add_argument("--sae", default="smollm2-135m-instruct-res7", help="SAE for --explain")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the model's dtype (θ and the objective stay fp32)",
    )


def run(args: argparse.Namespace) -> int:
    from melbo_lens.cli.options import CliError
    from melbo_lens.cli.output import claimed_file
    from melbo_lens.workflows.bench import adapters_benchmark, run_benchmark, vectors_benchmark

    if args.adapters:  # prints its table; writes nothing
        adapters_benchmark(args.model, args.n_vectors, args.timed_steps, args.threads)
        return 0
    if args.explain and args.explain_tokens < 128:
        raise CliError(f"--explain-tokens must be >= 128, got {args.explain_tokens}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a directory")
    name = (
        "bench_families.json"
        if args.families
        else "bench_explain.json"
        if args.explain
        else "bench_vectors.json"
        if args.vectors
        else "bench.json"
    )
    with claimed_file(out / name, "--out", overwrite=args.overwrite) as path:  # before the work
        if args.families:
            from melbo_lens.workflows.bench_families import families_benchmark

            families_benchmark(args)  # writes OUT/bench_families.{json,txt}
            return 0
        if args.explain:
            return _explain(args, path)
        if args.vectors:
            vectors_benchmark(args)  # writes OUT/bench_vectors.json
        else:
            run_benchmark(args)  # writes OUT/bench.json
    return 0


def _explain(args: argparse.Namespace, path: Path) -> int:
    import json

    from melbo_lens.core.io import atomic_write_text
    from melbo_lens.workflows.bench_explain import explain_benchmark

    n = 8 if args.n_vectors == 32 else args.n_vectors  # 32 is the training default
    result = explain_benchmark(
        args.model, sae_name=args.sae, tokens=args.explain_tokens, n_vectors=n
    )
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")
    return 0
