"""An output directory claimed by one command: locked, and never overwritten unasked.

`claimed_output(args, filename)` takes an exclusive lock on `--out` for the command's
life, then looks at `OUT/filename`: a finished result there is only replaced with
`--overwrite`; an interrupted one is continued with `--resume` (or replaced with
`--overwrite`); `--resume` with nothing to resume says so and starts fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from melbo_lens.cli.options import FLAG_OF, CliError
from melbo_lens.core.io import LockHeld, exclusive_lock

__all__ = [
    "saved_study",
    "checked_directory",
    "claimed_file",
    "claimed_output",
    "locked",
    "resume_mismatch_message",
]


@contextmanager
def claimed_output(args: argparse.Namespace, filename: str) -> Iterator[tuple[Path, str | None]]:
    """(the output file, the checkpoint to resume from or None) under a lock on --out."""
    from melbo_lens.methods.training import ResumeMismatch
    from melbo_lens.perturbations.artifact import describe_artifact

    out = checked_directory(args.out, "--out")
    with locked(out):
        path = out / filename
        resume = _check_existing(args, out, path, describe_artifact)
        try:
            yield path, resume
        except ResumeMismatch as err:
            raise CliError(resume_mismatch_message(err, path)) from None


@contextmanager
def locked(out: Path, flag: str = "--out") -> Iterator[None]:
    """An exclusive lock on an output for the block; a live holder is a CliError naming it."""
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(out))
        except LockHeld as err:
            raise CliError(f"{flag} {out}: {err}") from None
        yield


def checked_directory(path: str | Path, flag: str) -> Path:
    """An output folder that exists (created if needed) and can be written, checked before
    any work: a file in its place, or a folder that cannot be written, is a CliError."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {out} is a file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"{flag} {out}: cannot create it ({err.strerror}); choose another") from None
    _probe_writable(out, flag)
    return out


def _probe_writable(folder: Path, flag: str) -> None:
    """Create and remove a file in `folder`: os.access alone is wrong for root and ACLs."""
    from melbo_lens.core.io import temporary_beside

    try:
        temporary_beside(folder / ".write-check").unlink()
    except OSError as err:
        raise CliError(
            f"{flag} {folder}: cannot write there ({err.strerror}); choose another"
        ) from None


@contextmanager
def claimed_file(path: str | Path, flag: str, *, overwrite: bool) -> Iterator[Path]:
    """One output file, claimed before any work: not a folder, its folder writable, locked
    for the block, and an existing file only replaced with --overwrite."""
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{flag} {target} is a directory; give a file name (e.g. {target}/out.json)")
    parent = target.parent if str(target.parent) else Path(".")
    checked_directory(parent, flag)
    with locked(target, flag):
        if target.exists() and not overwrite:
            raise CliError(
                f"{flag} {target} already exists; pass --overwrite to replace it, or give "
                "another file"
            )
        yield target


def _check_existing(args: argparse.Namespace, out: Path, path: Path, describe) -> str | None:
    """The checkpoint to resume from (or None), after refusing to overwrite unasked."""
    resume = getattr(args, "resume", False)
    overwrite = getattr(args, "overwrite", False)
    if resume and overwrite:
        raise CliError("--resume and --overwrite contradict each other; pass one")
    if path.exists() and not (resume or overwrite):
        what, finished = describe(path)
        fix = (
            "--overwrite to replace it"
            if finished
            else "--resume to continue it or --overwrite to replace it"
        )
        raise CliError(
            f"--out {out} already holds {what} in {path.name}; pass {fix}, or choose another --out"
        )
    if resume and not path.exists():
        print(f"--resume: no checkpoint at {path}; starting a fresh run", file=sys.stderr)
        return None
    return str(path) if resume else None


def resume_mismatch_message(err, path: Path) -> str:
    """A resume refusal in flag terms: which flags differ, and their saved values."""
    parts = []
    for field, (saved, now) in err.differing.items():
        flag = FLAG_OF.get(field, field)
        parts.append(f"{flag} (saved {_show(saved)}, now {_show(now)})")
    return (
        f"--resume: {path} was trained with other settings: {', '.join(parts)}; rerun with "
        "the saved values to continue it, or drop --resume and pass --overwrite to start over"
    )


def _show(value) -> str:
    if isinstance(value, dict) and "layer" in value:
        from melbo_lens.core.sites import HookSite

        return HookSite.from_dict(value).name
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def saved_study(
    path: Path,
    args: argparse.Namespace,
    settings: dict[str, Any],
    study: str,
    keeps: str,
    *,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What an earlier run of a study command saved at `path`, when `--resume` keeps it
    (None: nothing there, or `--overwrite`). A saved result is refused without `--resume`
    or `--overwrite`, and resumed only when every setting but "command" matches, naming
    those that differ; `defaults` fill settings that files from before a flag lack."""
    if not path.exists():
        return None
    if not (args.resume or args.overwrite):
        raise CliError(
            f"--out already holds {study} ({path}); pass --resume to keep {keeps} and run "
            "the rest, --overwrite to replace it, or another --out"
        )
    if args.overwrite:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        saved = {**(defaults or {}), **data["settings"]}
    except (ValueError, KeyError, TypeError) as err:
        raise CliError(f"--resume: {path} is not a readable {study} ({err})") from None
    differing = sorted(k for k in settings if k != "command" and saved.get(k) != settings[k])
    if differing:
        raise CliError(
            f"--resume: {path} was run with other settings ({', '.join(differing)}); rerun "
            "with the saved values, or pass --overwrite or another --out"
        )
    return data
