# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Vectors in and out of other tools: steering-vectors, repeng and llama.cpp.

Layer indexing. steering-vectors (`layer_type="decoder_block"`), repeng
(`ControlModel` layer ids) and llama.cpp control vectors (`direction.{layer}`) all add
a vector to the *output* of decoder block `layer` (0-based): TransformerLens's
`blocks.{layer}.hook_resid_post`. A vector at `blocks.{L}.hook_resid_pre` is the same
activation as `blocks.{L-1}.hook_resid_post`, so it exports as layer L - 1; one at
`blocks.0.hook_resid_pre` (the embeddings) or at any other hook point (`mlp_out`,
`attn_out`, ...) has no decoder-block equivalent and is refused. llama.cpp does not
accept `direction.0` (it never steers block 0's output), so that layer is refused for
GGUF export.

TransformerLens's weight processing. `fold_ln` folds the normalisation weights into
the next layer's weights and leaves the residual stream as it is. For models with
RMSNorm (Llama, SmolLM2, Gemma, Qwen) `center_writing_weights` is skipped, so the
residual stream is the transformers model's, number for number: an exported vector acts
the same there (tested on SmolLM2 with steering-vectors). For LayerNorm models (GPT-2)
TransformerLens centres the residual stream (it subtracts the mean over d_model); every
LayerNorm removes that mean too, so a vector acts the same up to its own mean, which
LayerNorm removes as well.

The GGUF file follows repeng's `ControlVector.export_gguf`: architecture
`controlvector`, the string `controlvector.model_hint` (the transformers `model_type`,
which repeng's reader requires) and `controlvector.layer_count`, one float32 tensor
`direction.{layer}` of d_model values per layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melbo_lens.core.io import OutputExists, atomic_write
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.layer_vectors import LayerVectors
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "block_output_layer",
    "export_control_vector",
    "from_steering_vector",
    "import_control_vector",
    "to_steering_vector",
]

ARCH = "controlvector"


def block_output_layer(site: HookSite) -> int:
    """The decoder block whose output `site` is (the layer other tools index by).

    Examples:
        >>> block_output_layer(HookSite(7)), block_output_layer(HookSite(22, "resid_pre"))
        (7, 21)
    """
    if site.point == "resid_post":
        return site.layer
    if site.point == "resid_pre" and site.layer > 0:
        return site.layer - 1
    raise ValueError(
        f"{site.name} is not the output of a decoder block, which is where steering-vectors, "
        "repeng and llama.cpp add their vectors; export vectors trained at a resid_post site "
        "(or at resid_pre of block 1 or later)"
    )


def _one(vectors: SteeringVectors | LayerVectors, index: int | None) -> tuple[list[int], Any]:
    """(layers, [layers, d_model] tensor) of member `index` (optional for one member)."""
    if index is None:
        if len(vectors) != 1:
            raise ValueError(
                f"the artifact holds {len(vectors)} vectors and other tools hold one per "
                f"layer; pick one with index=0..{len(vectors) - 1}"
            )
        index = 0
    if not 0 <= index < len(vectors):
        raise IndexError(f"index {index} out of range for {len(vectors)} vectors")
    if isinstance(vectors, LayerVectors):
        return list(vectors.layers), vectors.vectors[index].detach().float().cpu()
    layer = block_output_layer(vectors.site)
    return [layer], vectors.vectors[index : index + 1].detach().float().cpu()


def to_steering_vector(vectors: SteeringVectors | LayerVectors, index: int | None = None) -> Any:
    """Member `index` as a steering-vectors `SteeringVector` (decoder-block layers).

    Needs the `steering-vectors` package (`pip install --no-deps steering-vectors`).

    Args:
        vectors: The vectors to convert (one site, or one vector per layer).
        index: The member to convert; may be None only when there is one member.

    Returns:
        A `steering_vectors.SteeringVector` with the member's vector per decoder layer.

    Raises:
        ValueError: The vectors' site is not a decoder block's output, or `index` is None
            with several members.
        IndexError: `index` is out of range.
        ImportError: The `steering-vectors` package is not installed.
    """
    from steering_vectors import SteeringVector  # pyright: ignore[reportMissingTypeStubs]

    layers, stack = _one(vectors, index)
    acts = {layer: stack[i].clone() for i, layer in enumerate(layers)}
    return SteeringVector(layer_activations=acts, layer_type="decoder_block")


def from_steering_vector(steering_vector: Any) -> LayerVectors:
    """A steering-vectors `SteeringVector` (decoder-block layers) as one `LayerVectors`
    member (`.at(layer)` gives `SteeringVectors` at one layer).

    Args:
        steering_vector: A `steering_vectors.SteeringVector` (its `layer_activations`
            map decoder-block layers to vectors).

    Returns:
        One `LayerVectors` member with a vector per layer of `steering_vector`.

    Raises:
        ValueError: The vector acts on layers other than decoder blocks.
    """
    layer_type = getattr(steering_vector, "layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise ValueError(
            f"the SteeringVector acts on {layer_type!r} layers; only 'decoder_block' vectors "
            "map onto TransformerLens's blocks.{layer}.hook_resid_post"
        )
    acts = steering_vector.layer_activations
    layers = sorted(int(k) for k in acts)
    stack = torch.stack([torch.as_tensor(acts[k]).float().cpu() for k in layers])
    return LayerVectors(stack[None], tuple(layers), method="steering_vectors")


def export_control_vector(
    vectors: SteeringVectors | LayerVectors,
    path: str | os.PathLike[str],
    *,
    model_hint: str,
    index: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write member `index` as a llama.cpp control vector (GGUF, repeng's layout).

    `model_hint` is the transformers `model_type` of the model (`"llama"` for SmolLM2).
    An existing file is only replaced with `overwrite=True`.

    Args:
        vectors: The vectors to export; `LayerVectors` keep their layers, `SteeringVectors`
            are written at their site's block.
        path: The `.gguf` file to write.
        model_hint: The transformers `model_type` of the model (`"llama"` for SmolLM2).
        index: The member to write; may be None only when there is one member.
        overwrite: Replace an existing file (otherwise an existing file is an error).

    Returns:
        The path written.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError: The vectors' site is not a decoder block's output (llama.cpp's layers),
            or `model_hint` is not a model type.
        ImportError: The `gguf` package is not installed.
    """
    import gguf

    layers, stack = _one(vectors, index)
    if 0 in layers:
        raise ValueError(
            "llama.cpp does not accept a control vector for layer 0 (the output of block 0, "
            "blocks.0.hook_resid_post); train at a later site, or export with "
            "to_steering_vector instead"
        )
    if not model_hint or not isinstance(model_hint, str):
        raise ValueError(
            f"model_hint must be the model's transformers model_type, got {model_hint!r}"
        )
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExists(out, "a file", True)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        for i, layer in enumerate(layers):
            writer.add_tensor(f"direction.{layer}", stack[i].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(out, write)


def import_control_vector(source: str | os.PathLike[str] | Any) -> LayerVectors:
    """A llama.cpp / repeng control vector (a GGUF path, or a repeng `ControlVector`) as
    one `LayerVectors` member. `metadata["model_hint"]` keeps the file's model hint.

    Args:
        source: A `.gguf` control-vector path, or a repeng `ControlVector` (its
            `directions` map layers to vectors).

    Returns:
        One `LayerVectors` member, a vector per layer of the file.

    Raises:
        FileNotFoundError: No file at the path.
        ValueError: The file is not a control vector (wrong architecture, no direction
            tensors).
        ImportError: A path was given and the `gguf` package is not installed.
    """
    if isinstance(source, str | os.PathLike):
        directions, hint = _read_gguf(Path(source))
    else:  # a repeng ControlVector
        directions = {int(k): np.asarray(v) for k, v in source.directions.items()}
        hint = getattr(source, "model_type", None)
    if not directions:
        raise ValueError(f"{source} holds no direction.{{layer}} tensors")
    layers = sorted(directions)
    stack = torch.stack([torch.from_numpy(np.array(directions[k], np.float32)) for k in layers])
    return LayerVectors(
        stack[None], tuple(layers), method="control_vector", metadata={"model_hint": hint}
    )


def _read_gguf(path: Path) -> tuple[dict[int, Any], str | None]:
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"no control vector at {path}")
    reader = gguf.GGUFReader(str(path))
    arch = _string_field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path} is a GGUF file of architecture {arch!r}, not a {ARCH!r}")
    directions = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        try:
            layer = int(tensor.name.split(".")[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path} has an invalid tensor name {tensor.name!r}") from None
        directions[layer] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return directions, _string_field(reader, f"{ARCH}.model_hint")


def _string_field(reader: Any, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")
