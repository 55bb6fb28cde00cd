"""GGUF location and conversion: find a packaged model's GGUF file without importing its
package, dequantise it with transformers and convert it into a HookedTransformer's
config and weights with TransformerLens's own converters."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from melbo_lens.core.host import hooked_transformer_is_the_host
from melbo_lens.core.io import atomic_save_tensors, atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from melbo_lens.models.names import PROCESSING, MissingModelPackageError, PackagedModel

__all__: list[str] = []  # internal: used by cache.py and zoo.py


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def source_files(spec: PackagedModel) -> list[Path]:
    paths, missing = [], []
    for package, relative in spec.chunks:
        directory = _package_dir(package)
        if directory is None or not (directory / relative).is_file():
            missing.append(f"{relative} of package {package!r}")
        else:
            paths.append(directory / relative)
    if spec.lora is not None:  # the adapter is package data: its files key the cache too
        folder = Path(str(resources.files("melbo_lens").joinpath(f"data/{spec.lora}")))
        for name in _LORA_FILES:
            if (folder / name).is_file():
                paths.append(folder / name)
            else:
                missing.append(f"{name} in {folder} (reinstall melbo-lens)")
    if missing:
        raise MissingModelPackageError(
            f"the weights of {spec.name!r} ({spec.hf_name}) are not installed: missing "
            f"{', '.join(missing)}. Install them with: {spec.pip_install}"
        )
    return paths


_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _merge_lora(hf_model: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """peft's own merge of a LoRA adapter folder into the model's weights."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(hf_model, str(folder)).merge_and_unload()
    return merged.eval().requires_grad_(False)  # pyright: ignore[reportReturnType]


def convert_into(spec: PackagedModel, sources: list[Path], work: Path) -> None:
    """Write ``tokenizer/``, ``hf/`` and ``hooked_transformer/`` into ``work``."""
    gguf = sources[: len(spec.chunks)]
    hf_model, tokenizer = _dequantise(spec, gguf, work / "source")
    if spec.lora is not None:
        hf_model = _merge_lora(hf_model, sources[-1].parent)
    tokenizer.save_pretrained(work / "tokenizer")
    hf_model.save_pretrained(work / "hf")
    cfg, params = _convert_to_hooked(spec, hf_model)
    del hf_model
    shutil.rmtree(work / "source", ignore_errors=True)
    (work / "hooked_transformer").mkdir()
    atomic_save_tensors(
        params, work / "hooked_transformer" / "model.safetensors", {"format": "melbo_lens"}
    )
    atomic_write_json(work / "hooked_transformer" / "config.json", _config_to_json(cfg))


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


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def remove_tree(path: Path) -> None:
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
