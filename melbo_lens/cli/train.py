"""`melbo-lens train`: train MELBO steering vectors."""

from __future__ import annotations

import argparse

from melbo_lens.cli.options import (
    BASELINES,
    SUPERVISED,
    CliError,
    add_training_args,
    positive_float,
    positive_int,
    print_vectors,
    read_prompts,
    train_vectors,
)
from melbo_lens.cli.output import claimed_output

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_args(p, n_vectors=8)
    p.add_argument(
        "--method",
        "--family",
        dest="method",
        default="melbo",
        choices=["melbo", "adapters", "soft-prompt", *SUPERVISED, *BASELINES],
        help="melbo vectors, adapters (MELBO adapters on the source block's MLP), "
        "soft-prompt (learned input embeddings), mean-diff|pca|probe (contrast pairs), "
        "random|jacobian|hessian (baselines)",
    )
    a = p.add_argument_group("--method adapters")
    a.add_argument("--rank", type=positive_int, default=1, help="rank r of each adapter")
    a.add_argument(
        "--normalization",
        choices=["columns", "frobenius", "spectral"],
        default="columns",
        help="what fixes an adapter's size: unit columns of both factors (the write-up's), or "
        "the weight edit's Frobenius or spectral norm = --radius",
    )
    a.add_argument(
        "--position-quantile",
        type=float,
        default=None,
        metavar="Q",
        help="sparse positions: each adapter acts only where its read-out exceeds its "
        "Q-quantile over the training tokens (e.g. 0.9: about 10%% of tokens)",
    )
    sp = p.add_argument_group("--method soft-prompt")
    sp.add_argument("--n-tokens", type=positive_int, default=1, help="soft tokens per prompt (m)")
    s = p.add_argument_group("--method mean-diff | pca | probe (contrast pairs)")
    s.add_argument("--positive-file", help="positive prompts (.txt or .json), paired by line")
    s.add_argument("--negative-file", help="negative prompts, paired with --positive-file")
    s.add_argument(
        "--position",
        default="last",
        help="where activations are read: last | mean | answer | an index",
    )
    s.add_argument("--answer-tokens", help="--position answer: comma-separated tokens or ids")
    s.add_argument("--center", action="store_true", help="pca: centre the differences")
    s.add_argument("--l2", type=positive_float, default=1e-2, help="probe: L2 strength")
    s.add_argument("--stability", action="store_true", help="print the pairs-stability curve")
    b = p.add_argument_group("--method jacobian | hessian (baselines)")
    b.add_argument("--iterations", type=positive_int, default=40, help="eigensolver blocks at most")
    b.add_argument("--tol", type=positive_float, default=1e-5, help="eigensolver residual tol")
    b.add_argument("--at", help="hessian: FILE.safetensors:INDEX, the point (p != 2)")
    p.set_defaults(radius=None)  # each method's own default (see the help)
    for action in p._actions:
        if action.dest == "radius":
            action.help = (
                "R, the norm of each vector (default: melbo 'auto', searched before training; "
                "adapters, random, jacobian, hessian: 4; mean-diff|pca|probe: the contrast's "
                "own norm)"
            )


def run(args: argparse.Namespace) -> int:
    adapter_only = args.rank != 1 or args.normalization != "columns"
    if args.method != "adapters" and (adapter_only or args.position_quantile is not None):
        raise CliError(
            "--rank, --normalization and --position-quantile shape adapters; drop them for "
            f"--method {args.method}"
        )
    if args.method != "soft-prompt" and args.n_tokens != 1:
        raise CliError(f"--n-tokens sizes soft prompts; drop it for --method {args.method}")
    if args.method == "soft-prompt":
        from melbo_lens.cli.methods import train_soft_prompt

        return train_soft_prompt(args)
    if args.method == "adapters":
        from melbo_lens.cli.methods import train_adapters

        return train_adapters(args)
    if args.method != "melbo":
        from melbo_lens.cli.methods import train_other

        return train_other(args)
    if args.radius is None:
        args.radius = "auto"
    with claimed_output(args, "vectors.safetensors") as (path, resume):
        _, _, vectors, path, seconds = train_vectors(args, read_prompts(args), path, resume)
    print_vectors(vectors)
    state = "complete" if vectors.complete else "INTERRUPTED (resume with --resume)"
    print(f"\n{len(vectors)} vectors ({state}) in {seconds:.1f} s -> {path}")
    return 0 if vectors.complete else 130
