"""`melbo-lens generate`: steered completions from a saved vectors file."""

from __future__ import annotations

import argparse
import json

from melbo_lens.cli.options import (
    DEFAULT_MODEL,
    _read_prompts,
)
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
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
