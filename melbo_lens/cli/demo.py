"""`melbo-lens demo`: the main job: train on SmolLM2 and show steered text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from melbo_lens.cli.options import (
    add_corpus_arg,
    add_training_args,
    print_vectors,
    read_prompts,
    resolve_corpus,
    train_vectors,
)
from melbo_lens.cli.output import claimed_output
from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_args(p, n_vectors=6)
    p.add_argument("--width", type=int, default=110, help="completions table width")
    add_corpus_arg(p)
    # Sites, target positions and R are the defaults (`methods.defaults`): chosen for
    # the model and prompt before training, printed, and kept in the artifact.
    p.set_defaults(out="demo_out")


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "vectors.safetensors") as (path, resume):
        return _demo(args, path, resume)


def _demo(args: argparse.Namespace, path: Path, resume: str | None) -> int:
    from melbo_lens.generation import generate_steered

    prompts = read_prompts(args)
    print(f"melbo-lens demo: {args.model}, {args.n_vectors} vectors, prompt: {prompts[0]!r}")
    model, ps, vectors, path, seconds = train_vectors(args, prompts, path, resume)
    print_vectors(vectors)
    gens = generate_steered(model, vectors, ps, max_new_tokens=args.max_new_tokens)
    print()
    print(gens.table(width=args.width))
    completions = Path(args.out) / "completions.json"
    atomic_write_text(completions, json.dumps(gens.to_dict(), indent=2))
    print(f"\ntrained in {seconds:.1f} s; vectors -> {path}; completions -> {completions}")
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.runs import analyze_run

    start = time.perf_counter()
    corpus = resolve_corpus(args, model.tokenizer)
    run = analyze_run(
        model,
        vectors,
        ps,
        generations=gens,
        corpus=corpus,
        dashboard_tokens=args.dashboard_tokens,
        progress=not args.quiet,
    )
    run.save(args.out)
    report = write_report(run, Path(args.out) / "report.html")
    print(f"analysed and reported in {time.perf_counter() - start:.1f} s")
    print(f"report -> {report}")
    return 0
