# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Atomic I/O: every file melbo_lens writes appears whole or not at all.

A write goes to a temporary file in the target's folder, is flushed to disk, and is then
renamed over the target, so a crash or Ctrl-C leaves either the old file or the new one.
Every temporary is named `.NAME.PID.RANDOM.tmp` beside its target `NAME`; one left by a
process that no longer runs (kill -9 mid-save) is removed by the next save to that path.
`exclusive_lock` keeps two runs from writing one output at once. Reading a melbo_lens
safetensors file checks its format tag and never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "ArtifactError",
    "LockHeld",
    "OutputExists",
    "exclusive_lock",
    "temporary_beside",
    "remove_stale_temporaries",
    "atomic_write",
    "atomic_write_text",
    "atomic_save_tensors",
    "read_artifact",
    "read_metadata",
]


class ArtifactError(ValueError):
    """A file is not a readable melbo_lens artifact."""


def _readable(tmp: str | os.PathLike[str]) -> None:
    """Give a mkstemp file (0600) the permissions a plain open() would: 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of `path` (`.NAME.PID.*.tmp`) whose writing process is gone."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def temporary_beside(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """A new empty temporary file (or folder) `.NAME.PID.RANDOM.tmp` beside `path`, after
    removing the stale temporaries of `path` that dead processes left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix, where = f".{path.name}.{os.getpid()}.", path.parent
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=where))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=where)
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, give it ordinary
    permissions and rename it over `path`; on any error the temporary file is removed."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OutputExists(FileExistsError):
    """An output already holds a result that would be overwritten without being asked.

    `what` describes the result in words; `finished` tells a finished run from one that
    can be resumed."""

    def __init__(self, path: str | os.PathLike[str], what: str, finished: bool) -> None:
        self.path, self.what, self.finished = Path(path), what, finished
        fix = "pass overwrite=True to replace it" + (
            "" if finished else ", resume=path to continue it"
        )
        super().__init__(f"{path} already holds {what}; {fix}, or write elsewhere")


class LockHeld(RuntimeError):
    """Another live process holds the lock on an output."""


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Generator[Path, None, None]:
    """Hold an exclusive lock on output `path` (a file or folder) while the block runs.

    The lock is a file `.NAME.lock` beside `path`, created atomically (O_EXCL) with the
    holder's pid, host, start time and command; it is removed on exit, even on error. A
    lock left by a dead process on this host is taken over; a live holder raises
    `LockHeld` naming it.
    """
    path = Path(path)
    lock = _lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            stale = isinstance(pid, int) and host == me["host"] and not _alive(pid)
            if not stale:
                raise LockHeld(
                    f"{path} is being written by another run (pid {pid} on {host}, since "
                    f"{holder.get('started')}: {holder.get('command')!r}); wait for it to "
                    f"finish or write elsewhere. If that run is gone, delete {lock}"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise LockHeld(f"could not take the lock {lock} on {path}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same folder and a rename, so a
    crash or Ctrl-C leaves either the old file or the new one, never half of one."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_tensors(
    tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> Path:
    """Save tensors to `path` via a temporary file in the same folder and a rename."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors.

    Refuses pickles (never unpickled) and unreadable or truncated files, with a message
    that says which."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        raise ArtifactError(
            f"{path} is a directory, not an artifact file; "
            + (
                f"pass one of its artifact files: {', '.join(str(path / n) for n in inside)}"
                if inside
                else "it holds no .safetensors file (a run directory holds "
                "vectors.safetensors or adapters.safetensors)"
            )
        )
    if not path.is_file():
        raise FileNotFoundError(f"no artifact at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    looks_safetensors = head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8
    if not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise ArtifactError(
            f"{path} looks like a pickle / torch.save file; melbo_lens never unpickles. "
            "Load it yourself if you trust it, then wrap the tensor in SteeringVectors(...) "
            "and save() it as safetensors"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "of another format"
        ) from err


def read_artifact(
    path: str | os.PathLike[str], fmt: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a melbo_lens safetensors file of format `fmt`."""
    meta = read_metadata(path)
    if meta.get("format") != fmt:
        raise ArtifactError(
            f"{path} is a safetensors file but not a melbo_lens artifact of format {fmt!r} "
            f"(found format {meta.get('format')!r}); was it written by another tool?"
        )
    try:
        json.loads(meta["json"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} has corrupt melbo_lens metadata: {err}") from err
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated"
        ) from err
    return tensors, meta
