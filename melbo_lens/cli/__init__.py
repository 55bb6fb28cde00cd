"""The `melbo-lens` command: train, generate, demo and bench from a shell.

melbo-lens demo --out demo_out            # the main job, offline, SmolLM2-135M-Instruct
melbo-lens train --prompt "Hi" --source 7 --target blocks.22.hook_resid_pre --out run
melbo-lens generate run/vectors.safetensors --prompt "Tell me a story"
melbo-lens bench                           # speed against a naive reference
melbo-lens report run                      # RUN/report.html: one self-contained page
melbo-lens evaluate planted                # does MELBO find the toy's planted backdoors?
melbo-lens sweep --radii 4,8,16,32 --prompt "How can I tame a wolf?"   # choose R

Every error exits non-zero with one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


# subcommand -> help; each lives in melbo_lens/cli/<name>.py with add_arguments and run
SUBCOMMANDS = {
    "train": "train steering vectors or adapters (MELBO, supervised, baselines)",
    "demo": "the main job: train on SmolLM2, show steered text, write a report",
    "report": "one self-contained HTML report of a run directory",
    "generate": "completions under a saved perturbation (or plain, without one)",
    "bench": "time melbo_lens against a naive reference",
    "compare": "cosines, nearest matches, principal angles of two files",
    "explain": "what vectors mean: SAE decomposition, feature dashboards, vector cards",
    "corpus": "build the offline explanation corpus, or describe one",
    "sweep": "train at a grid of radii; recommend R at the cusp",
    "evaluate": "benchmarks: `evaluate planted` (the planted toy)",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in every option's help (unless there is none to show: None, off,
    or a help text that already says it); descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        hidden = action.default is None or action.default is False
        if hidden or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def _description() -> str:
    width = max(map(len, SUBCOMMANDS))
    listed = "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items())
    first = (__doc__ or "melbo-lens").splitlines()[0]
    return f"{first}\n\ncommands:\n{listed}\n\nrun `melbo-lens COMMAND --help` for its options"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melbo-lens", description=_description(), formatter_class=_Formatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from melbo_lens import __version__

    parser.add_argument("--version", action="version", version=f"melbo-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"melbo_lens.cli.{name}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=_Formatter,
        )
        module.add_arguments(p)
        if "--threads" not in p._option_string_actions:
            p.add_argument(
                "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
            )
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            print(f"melbo-lens {args.command}: error: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every error: one line, non-zero exit (traceback on --debug)
        if args.debug:
            raise
        print(f"melbo-lens {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The error as one line; its type named unless it is a plain bad-input error."""
    text = " ".join(str(err).split()) or type(err).__name__
    plain = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)
    if type(err) in plain or type(err).__module__.startswith("melbo_lens"):
        return text
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
