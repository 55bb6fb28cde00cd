"""`melbo-lens generate`: completions under each member of a saved perturbation file
(vectors, adapters, ...), beside the unsteered ones; without a file, plain completions."""

from __future__ import annotations

import argparse
import json

from melbo_lens.cli.options import (
    DEFAULT_MODEL,
    CliError,
    add_prompt_args,
    finite_float,
    nonnegative_int,
    positive_float,
    positive_int,
    prompt_set,
    read_prompts,
    seed_int,
)
from melbo_lens.cli.output import claimed_file
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "vectors",
        nargs="?",
        help="a saved artifact (vectors.safetensors, adapters.safetensors, ...); leave out "
        "for plain unsteered completions",
    )
    p.add_argument("--model", default=None, help=f"default: the file's model, else {DEFAULT_MODEL}")
    add_prompt_args(p, positions=False)
    g = p.add_argument_group("steering")
    g.add_argument("--indices", help="comma-separated member indices (default: all)")
    g.add_argument("--scale", type=finite_float, default=1.0, help="multiply each member by")
    d = p.add_argument_group("decoding")
    d.add_argument(
        "--max-new-tokens", type=nonnegative_int, default=40, help="tokens per completion"
    )
    d.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    d.add_argument("--temperature", type=positive_float, default=1.0, help="--sample: temperature")
    d.add_argument("--seed", type=seed_int, default=0, help="--sample: seed")
    o = p.add_argument_group("output")
    o.add_argument("--width", type=positive_int, default=110, help="table width (characters)")
    o.add_argument("--json", help="also write the completions as JSON to this file")
    o.add_argument("--overwrite", action="store_true", help="--json: replace an existing file")


def _indices(spec: str | None, n: int) -> list[int] | None:
    if spec is None:
        return None
    try:
        indices = [int(i) for i in spec.split(",")]
    except ValueError:
        raise CliError(f"--indices must be comma-separated ints, got {spec!r}") from None
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise CliError(
            f"--indices {spec}: {bad} out of range; the file has {n} members, indices "
            f"0..{n - 1} (or -{n}..-1 from the end)"
        )
    return indices


def run(args: argparse.Namespace) -> int:
    if not args.json:
        return _generate(args, None)
    with claimed_file(args.json, "--json", overwrite=args.overwrite) as path:  # before any work
        return _generate(args, path)


def _generate(args: argparse.Namespace, json_path) -> int:
    from melbo_lens.generation import generate
    from melbo_lens.models.zoo import load_model
    from melbo_lens.perturbations.artifact import load_artifact
    from melbo_lens.perturbations.base import prompts_for

    perturbation = load_artifact(args.vectors) if args.vectors else None
    if perturbation is None and args.indices:
        raise CliError("--indices needs a perturbation file")
    indices = _indices(args.indices, len(perturbation)) if perturbation is not None else None
    saved_name = perturbation.metadata.get("load_name") if perturbation is not None else None
    model = load_model(args.model or saved_name or DEFAULT_MODEL)
    texts = read_prompts(args)
    if hasattr(perturbation, "prepare"):  # soft prompts place their tokens in the texts
        prompts = prompts_for(perturbation, model, texts, chat=not args.no_chat)
    else:
        prompts = prompt_set(model, texts, not args.no_chat, "all")
    gens = generate(
        model,
        perturbation,
        prompts,
        indices=indices,
        scale=args.scale,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(gens.table(width=args.width))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(gens.to_dict(), indent=2))
        print(f"\ncompletions -> {json_path}")
    return 0
