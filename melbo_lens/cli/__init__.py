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
import importlib
import sys

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


# subcommand -> help; each lives in melbo_lens/cli/<name>.py with add_arguments and run
SUBCOMMANDS = {
    "train": "train MELBO steering vectors",
    "demo": "the main job: train on SmolLM2 and show steered text",
    "report": "one self-contained HTML report of a run directory",
    "generate": "steered completions from a saved vectors file",
    "bench": "time melbo_lens against a naive reference",
    "compare": "cosines, nearest matches, principal angles of two files",
    "explain": "decompose saved vectors onto an SAE's features",
    "sweep": "train at a grid of radii; recommend R at the cusp",
    "evaluate": "benchmarks: `evaluate planted` (the planted toy)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melbo-lens", description=(__doc__ or "melbo-lens").splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"melbo_lens.cli.{name}")
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
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
