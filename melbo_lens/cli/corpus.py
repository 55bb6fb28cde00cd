"""`melbo-lens corpus`: build the offline explanation corpus, or describe one.

    melbo-lens corpus build                      # ~1.2M tokens, prose + chat, cached
    melbo-lens corpus info [NAME_OR_FILE]        # counts, tokens, provenance

The corpus is built from text that installed packages ship (no network) and cached under
the melbo_lens cache; every command that takes `--corpus` reads it by name.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from melbo_lens.analysis.corpus import DEFAULT_CORPUS

    p.add_argument("action", choices=["build", "info"], help="build a corpus or describe one")
    p.add_argument("corpus", nargs="?", default=DEFAULT_CORPUS, help="name or file (info)")
    p.add_argument("--name", default=DEFAULT_CORPUS, help="name of the corpus to build")
    p.add_argument("--out", help="folder to write (default: the melbo_lens cache)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer counts")
    p.add_argument("--tokens", type=int, default=1_200_000, help="tokens to reach")
    p.add_argument("--chat-fraction", type=float, default=0.4, help="documents made chat")
    p.add_argument("--seed", type=int, default=0, help="seed of the chat/prose choice")
    p.add_argument("--overwrite", action="store_true", help="replace a built corpus")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from melbo_lens.analysis.corpus import MANIFEST_FILE, corpus_dir, load_corpus

    if args.action == "info":
        corpus = load_corpus(args.corpus)
        print(repr(corpus))
        print(json.dumps(corpus.provenance, indent=2)[:4000])
        return 0
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if not 0.0 <= args.chat_fraction <= 1.0:
        raise ValueError(f"--chat-fraction must be in [0, 1], got {args.chat_fraction}")
    out = Path(args.out) if args.out else corpus_dir(args.name)
    if (out / MANIFEST_FILE).is_file() and not args.overwrite:
        raise FileExistsError(
            f"{out} already holds a built corpus; pass --overwrite to rebuild it, or --out "
            "another folder"
        )
    from melbo_lens.analysis.corpus_build import build_corpus
    from melbo_lens.models.zoo import load_tokenizer

    corpus = build_corpus(
        args.name,
        out=out,
        tokenizer=load_tokenizer(args.model),
        target_tokens=args.tokens,
        chat_fraction=args.chat_fraction,
        seed=args.seed,
    )
    print(f"corpus -> {out} ({corpus.provenance['n_tokens']:,} tokens)")
    return 0
