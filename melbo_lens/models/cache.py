"""The on-disk cache of converted models: where it lives, the key that says whether an
entry is still valid (file sizes, mtimes, library versions), building an entry
atomically and reading it back (a damaged entry is rebuilt, never trusted).

Integrity: the manifest records each file's size and sha256 when the entry is built. A
load checks sizes always, and re-hashes every file whose (size, mtime) differs from the
last successful check (recorded in ``verified.json``), so a file written to after it was
checked, even one that kept its size, is caught, while an untouched entry loads without
reading 0.6 GB (SmolLM2) to 28 GB (a 14B model in bf16) through sha256 each time (about
1 GB/s on one core). ``MELBO_LENS_VERIFY_CACHE=always`` re-hashes on every load, for media
that may rot without a write. A mismatch is a damaged entry: it is rebuilt, with a warning
that names the file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from melbo_lens.core.host import hooked_transformer_is_the_host
from melbo_lens.core.io import temporary_beside
from melbo_lens.core.progress import say

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase
from melbo_lens.models.convert import atomic_write_json, convert_into, remove_tree
from melbo_lens.models.names import PROCESSING, CorruptCacheError, PackagedModel

__all__ = ["CACHE_FORMAT_VERSION", "default_cache_dir"]


logger = logging.getLogger(__name__)


CACHE_FORMAT_VERSION = 2  # 2: sha256 of every file in the manifest


def default_cache_dir() -> Path:
    """The cache root: ``$MELBO_LENS_CACHE``, else ``$XDG_CACHE_HOME/melbo_lens``, else
    ``~/.cache/melbo_lens``.

    Examples:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/melbo_lens')
    """
    if os.environ.get("MELBO_LENS_CACHE"):
        return Path(os.environ["MELBO_LENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "melbo_lens"


def cache_key(spec: PackagedModel, sources: list[Path]) -> tuple[str, dict[str, Any]]:
    identity = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": spec.name,
        "sources": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources],
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "transformers": importlib.metadata.version("transformers"),
        "processing": dict(PROCESSING),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest[:16], identity


def build_entry(
    spec: PackagedModel, sources: list[Path], entry: Path, identity: dict[str, Any]
) -> None:
    """Convert the GGUF and write a complete cache entry at ``entry``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():  # a directory without a manifest is an interrupted or damaged entry
        remove_tree(entry)
    say(  # the conversion's progress bars follow; say why they appear only once
        True,
        f"melbo_lens: first use of {spec.name}: converting it to a HookedTransformer once "
        f"(about a minute); later loads read the cache at {entry}",
    )
    work = temporary_beside(entry, directory=True)
    try:
        convert_into(spec, sources, work)
        paths = [p for p in sorted(work.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(work)): p.stat().st_size for p in paths}
        sha256 = {str(p.relative_to(work)): file_sha256(p) for p in paths}
        manifest = {**identity, "hf_name": spec.hf_name, "files": files, "sha256": sha256}
        atomic_write_json(work / "manifest.json", manifest)
        atomic_write_json(work / VERIFIED, cache_stamps(work, files))
        work.chmod(0o755)  # mkdtemp made it private; the entry is an ordinary cache directory
        try:
            os.replace(work, entry)
        except OSError:
            if not (entry / "manifest.json").is_file():  # not a concurrent build that won
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    _remove_stale_siblings(entry)


def _remove_stale_siblings(entry: Path) -> None:
    """Delete conversions made from an older source or library, and abandoned temporaries."""
    for sibling in entry.parent.iterdir():
        try:
            stale = (sibling / "manifest.json").is_file() or (
                sibling.name.startswith(".")
                and sibling.name.endswith(".tmp")
                and time.time() - sibling.stat().st_mtime > 86400
            )
        except OSError:  # removed meanwhile by another process
            continue
        if sibling != entry and stale:
            shutil.rmtree(sibling, ignore_errors=True)


def load_entry(
    entry: Path,
    spec: PackagedModel,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    bridge: bool,
) -> HookedTransformer | TransformerBridge:
    """Read a cache entry; a damaged one raises ``CorruptCacheError``."""
    check_manifest(entry)
    tokenizer = _read_tokenizer(entry)
    if bridge:
        return _bridge_from_entry(entry, spec, tokenizer, device=device, dtype=dtype)
    try:
        cfg_dict = json.loads((entry / "hooked_transformer" / "config.json").read_text())
        cfg_dict.update(
            dtype=dtype,
            device=str(device),
            tokenizer_name=str(entry / "tokenizer"),
            model_name=spec.model_name,
        )
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        params = load_file(entry / "hooked_transformer" / "model.safetensors")
    except (OSError, ValueError, TypeError, AssertionError, SafetensorError) as error:
        raise CorruptCacheError(f"{type(error).__name__}: {error}") from error
    with hooked_transformer_is_the_host():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    buffers = {name for name, _ in model.named_buffers()}
    try:
        params = {key: value.to(dtype) for key, value in params.items()}
        result = model.load_state_dict(params, strict=False, assign=True)
    except RuntimeError as error:  # a shape mismatch
        raise CorruptCacheError(str(error).splitlines()[0]) from error
    if result.unexpected_keys or set(result.missing_keys) - buffers:
        raise CorruptCacheError(
            f"weights do not fit the model: missing {sorted(set(result.missing_keys) - buffers)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.move_model_modules_to_device()
    return model.eval()


VERIFIED = "verified.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cache_stamps(entry: Path, files: dict[str, int]) -> dict[str, list[int]]:
    """(size, mtime_ns) of each file: what a later load compares to skip re-hashing."""
    stats = {rel: (entry / rel).stat() for rel in files}
    return {rel: [st.st_size, st.st_mtime_ns] for rel, st in stats.items()}


def check_manifest(entry: Path) -> None:
    """Sizes always; the sha256 of each file changed since its last check (or of every
    file with MELBO_LENS_VERIFY_CACHE=always). Raises `CorruptCacheError` naming a file."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        version = manifest.get("format_version")
        files, hashes = manifest["files"], manifest["sha256"]
        stamps = cache_stamps(entry, files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCacheError(f"manifest: {type(error).__name__}: {error}") from error
    if version != CACHE_FORMAT_VERSION:
        raise CorruptCacheError(f"cache format version {version!r}")
    for relative, (size, _) in stamps.items():
        if size != files[relative]:
            raise CorruptCacheError(f"{relative} has the wrong size")
    try:
        verified = json.loads((entry / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    always = os.environ.get("MELBO_LENS_VERIFY_CACHE", "").lower() == "always"
    changed = [rel for rel in files if always or verified.get(rel) != stamps[rel]]
    for relative in changed:
        if file_sha256(entry / relative) != hashes.get(relative):
            raise CorruptCacheError(
                f"{relative} was changed after the conversion (its sha256 differs from the "
                "manifest's)"
            )
    if changed:
        try:
            atomic_write_json(entry / VERIFIED, stamps)
        except OSError:  # a read-only cache: checked again next time, which is only slower
            pass


def _read_tokenizer(entry: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:  # the BOS-adding variant, which TransformerLens would otherwise load again
        return AutoTokenizer.from_pretrained(entry / "tokenizer", add_bos_token=True)
    except Exception as error:  # tokenizers reports a malformed file as a bare Exception
        raise CorruptCacheError(f"tokenizer: {type(error).__name__}: {error}") from error


def _bridge_from_entry(
    entry: Path,
    spec: PackagedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            entry / "hf", dtype=dtype, attn_implementation="eager"
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise CorruptCacheError(f"transformers model: {type(error).__name__}: {error}") from error
    hf_model = hf_model.to(device).eval()  # pyright: ignore[reportArgumentType]
    model = TransformerBridge.boot_transformers(
        spec.hf_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
    model.cfg.default_prepend_bos = spec.default_prepend_bos
    model.cfg.model_name = spec.model_name
    return model
