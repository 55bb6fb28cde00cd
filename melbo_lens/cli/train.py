"""`melbo-lens train`: train MELBO steering vectors."""

from __future__ import annotations

import argparse

from melbo_lens.cli.options import (
    BASELINES,
    SUPERVISED,
    _add_training_args,
    _print_vectors,
    _read_prompts,
    _train,
)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.set_defaults(radius=None)


def run(args: argparse.Namespace) -> int:
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
