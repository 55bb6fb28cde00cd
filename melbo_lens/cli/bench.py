"""`melbo-lens bench`: time melbo_lens against a naive reference."""

from __future__ import annotations

import argparse

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
        "--reference-slots",
        type=int,
        default=None,
        help="slots of the previous default actually run (default: all; its time for "
        "--slots is then per-slot time x slots)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--out", default="bench_out", help="directory for bench.json")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    p.add_argument("--adapters", action="store_true", help="adapters: K together vs one by one")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the model's dtype (θ and the objective stay fp32)",
    )


def run(args: argparse.Namespace) -> int:
    from melbo_lens.workflows.bench import adapters_benchmark, run_benchmark

    if args.adapters:
        adapters_benchmark(args.model, args.n_vectors, args.timed_steps, args.threads)
    else:
        run_benchmark(args)
    return 0
