"""Atomic I/O: every file melbo_lens writes appears whole or not at all.

A write goes to a temporary file in the target's folder, is flushed to disk, and is then
renamed over the target, so a crash or Ctrl-C leaves either the old file or the new one.
Reading a melbo_lens safetensors file checks its format tag and never unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "ArtifactError",
    "atomic_write",
    "atomic_write_text",
    "atomic_save_tensors",
    "read_artifact",
    "read_metadata",
]


class ArtifactError(ValueError):
    """A file is not a readable melbo_lens artifact."""


def _readable(tmp: str) -> None:
    """Give a mkstemp file (0600) the permissions a plain open() would: 0666 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, give it ordinary
    permissions and rename it over `path`; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
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
        raise ArtifactError(f"{path} is a directory, not an artifact file")
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
