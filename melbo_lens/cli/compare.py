"""`melbo-lens compare`: cosines, nearest matches, principal angles of two files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from melbo_lens.cli.options import (
    add_prompt_args,
    parse_site_option,
    prompt_set,
    read_prompts,
)
from melbo_lens.cli.output import claimed_file
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="first vectors file (.safetensors)")
    p.add_argument("b", help="second vectors file (.safetensors)")
    p.add_argument("--model", help="also compare target-layer deltas on this model")
    add_prompt_args(p)
    p.add_argument("--target", help="target site for deltas (default: the artifacts' target)")
    p.add_argument("--json", help="also write the comparison as JSON")
    p.add_argument("--overwrite", action="store_true", help="--json: replace an existing file")


def run(args: argparse.Namespace) -> int:
    if not args.json:
        return _compare(args, None)
    with claimed_file(args.json, "--json", overwrite=args.overwrite) as path:  # before any work
        return _compare(args, path)


def _compare(args: argparse.Namespace, json_path: Path | None) -> int:
    from melbo_lens.analysis.similarity import compare_vectors
    from melbo_lens.perturbations.vectors import SteeringVectors

    a, b = SteeringVectors.load(args.a), SteeringVectors.load(args.b)
    model = prompts = None
    if args.model:
        from melbo_lens.models.zoo import load_model

        model = load_model(args.model)
        prompts = prompt_set(model, read_prompts(args), not args.no_chat, args.target_positions)
    result = compare_vectors(
        a,
        b,
        model=model,
        prompts=prompts,
        target=parse_site_option(args.target, "resid_pre") if args.target else None,
        labels=_labels(Path(args.a), Path(args.b)),
    )
    print(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2))
    return 0


def _labels(a: Path, b: Path) -> tuple[str, str]:
    """Names that tell the two files apart: their stems, else their run directories,
    else their paths (two default runs are both `vectors.safetensors`)."""
    if a.stem != b.stem:
        return a.stem, b.stem
    ra, rb = a.resolve().parent, b.resolve().parent
    if ra.name != rb.name:
        return ra.name, rb.name
    return str(a), str(b)
