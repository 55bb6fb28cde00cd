# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Weight orthogonalisation: a copy of a model whose residual-stream writes are projected
off a direction (`orthogonalize_weights`), the weight version of `ablate_direction`.

Every matrix that writes into the stream (W_E, W_pos, each W_O and b_O, each W_out and
b_out) has its output projected off r, so nothing writes r in the first place.

Why the hook and weight versions agree. Write P = I - r̂r̂ᵀ. With hooks, block 0 reads
P·embed; a block's write a is added and the sum projected, resid_mid = P(x + a) = x + Pa
since Px = x. With orthogonalised weights the block reads the same x and writes Pa
directly. By induction every residual value, and so every norm input (LayerNorm,
RMSNorm, the centring-only LNPre of folded models) and the logits, is the same up to
float rounding: norms only read the stream. What differs is what the *writes* look
like: `hook_embed`, `hook_attn_out` and `hook_mlp_out` carry r under the hooks and not
under the weights. The weights cannot express the edit when a norm sits between a
sublayer and its residual add (Gemma 2/3 `ln*_post`, OLMo 2 post-norm: the write
w ⊙ y / rms(y) has an r component whatever W_O is), nor for mixture-of-experts MLPs;
`orthogonalize_weights` refuses those models, and `ablate_direction` stays exact on them.
Folded models (`center_writing_weights`) lose the zero-mean property of their writes
unless r itself has zero mean; LNPre centres its input anyway, so outputs are unaffected.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from melbo_lens.core.host import Host, post_norm
from melbo_lens.perturbations.directional import Directions, direction_basis

__all__ = ["orthogonalize_weights"]


def _residual_writers(model: Host) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight whose output is added to the stream."""
    cfg = model.cfg
    if post_norm(model):
        raise NotImplementedError(
            "this model normalises each sublayer's output before adding it to the residual "
            "stream (Gemma 2/3, OLMo 2), so no weight edit removes the direction from what "
            "is written; use ablate_direction(model, direction), which is exact here"
        )
    if getattr(cfg, "num_experts", None):
        raise NotImplementedError(
            "mixture-of-experts MLPs are not handled by orthogonalize_weights; "
            "use ablate_direction(model, direction)"
        )
    hooked: Any = model  # its modules: a HookedTransformer (checked by the caller)
    writers: list[tuple[nn.Module, str]] = [(hooked.embed, "W_E")]
    if cfg.positional_embedding_type == "standard":  # shortformer W_pos never enters the stream
        writers.append((hooked.pos_embed, "W_pos"))
    for block in hooked.blocks:
        writers += [(block.attn, "W_O"), (block.attn, "b_O")]
        if not cfg.attn_only:
            writers += [(block.mlp, "W_out"), (block.mlp, "b_out")]
    for module, name in writers:
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.shape[-1] != cfg.d_model:
            raise NotImplementedError(
                f"expected a parameter {name} [..., d_model={cfg.d_model}] on "
                f"{type(module).__name__}, found {type(param).__name__}; this architecture "
                "is not supported by orthogonalize_weights, use ablate_direction instead"
            )
    return writers


def orthogonalize_weights(model: Host, direction: Directions) -> Any:
    """A copy of `model` whose residual-stream writes are projected off `direction`.

    The same function as running under `ablate_direction(model, direction)` (see the
    module docstring for why, and for the architectures it refuses). The original model
    is not touched. HookedTransformer only.

    Args:
        model: A HookedTransformer (not modified).
        direction: A [d_model] direction or [m, d_model] directions.

    Returns:
        The edited copy.

    Raises:
        TypeError: `model` is not a HookedTransformer.
        NotImplementedError: The model normalises sublayer outputs before adding them
            (Gemma 2/3, OLMo 2) or has mixture-of-experts MLPs; `ablate_direction` is exact
            there.

    Examples:
        >>> edited = orthogonalize_weights(model, refusal_dir)
        >>> with ablate_direction(model, refusal_dir):
        ...     hooked = model(tokens)
        >>> torch.allclose(edited(tokens), hooked, atol=1e-4)
        True
    """
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"orthogonalize_weights edits HookedTransformer weights, got {type(model).__name__}; "
            "for other hosts use ablate_direction(model, direction)"
        )
    basis = direction_basis(direction, int(model.cfg.d_model))
    _residual_writers(model)  # refuse before paying for the copy
    new = copy.deepcopy(model)
    # A copy made inside a `model.hooks(...)` block carries its temporary hooks; the copy
    # has no context that would remove them.
    new.reset_hooks(including_permanent=False)
    for module, name in _residual_writers(new):
        param = getattr(module, name)
        w = param.detach().to(torch.float64)
        q = basis.to(w.device)
        edited = (w - (w @ q) @ q.T).to(param.dtype)
        # A fresh Parameter also unties anything that shared this tensor.
        setattr(module, name, nn.Parameter(edited, requires_grad=param.requires_grad))
    return new
