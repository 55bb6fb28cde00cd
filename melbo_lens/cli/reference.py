"""The command line's reference page (Markdown), generated from the parser itself, so the
docs cannot drift from the flags: `python -m melbo_lens.cli.reference > docs/reference/cli.md`
(a test fails when the committed page differs)."""

from __future__ import annotations

import argparse

__all__ = ["cli_reference"]


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    return ", ".join(f"`{flag}`" for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.required or not action.option_strings:
        return "required"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "off" if action.default is False else "on"
    if action.default in (None, argparse.SUPPRESS):
        return "—"
    return f"`{action.default}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def cli_reference() -> str:
    """Every subcommand of `melbo-lens` with its description and a table of its options
    (flag, default, help), in the parser's order.

    Examples:
        >>> page = cli_reference()
        >>> "## melbo-lens train" in page and "| `--radius` |" in page
        True
    """
    from melbo_lens.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command line reference",
        "",
        "Generated from the parser (`python -m melbo_lens.cli.reference`). "
        "`melbo-lens COMMAND --help` shows the same.",
    ]
    for name in SUBCOMMANDS:
        p = sub.choices[name]
        lines += ["", f"## melbo-lens {name}", "", (p.description or "").strip(), ""]
        lines += ["| option | default | help |", "|---|---|---|"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            lines.append(
                f"| {_flags(action)} | {_default(action)} | {_cell(action.help)}{choices} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cli_reference(), end="")
