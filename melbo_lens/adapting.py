"""Adapting is editing one MLP's output weights by a low-rank matrix, through hooks.

A steering adapter on block L is a rank-r change of that block's MLP output weights,

    W_out' = W_out + s · Ω_A Ω_Bᵀ        (Ω_A: d_mlp × r, Ω_B: d_model × r)

in the TransformerLens convention, where `W_out` is [d_mlp, d_model] and the MLP writes
h·W_out + b_out for its hidden activation h. (Written the other way round, for weights
that act on column vectors, this is W' = W + s · Ω_B Ω_Aᵀ.) melbo_lens never touches
the weights: one hook reads h at `blocks.L.mlp.hook_post` and a second adds
s · (h Ω_A) Ω_Bᵀ at `blocks.L.hook_mlp_out`, which is the same computation.

Many adapters run in one batch. With g adapters (`omega_a` [g, d_mlp, r]) and a batch of
B rows, B a multiple of g, adapter j acts on the j-th block of B/g consecutive rows:
g = B gives one adapter per row, and K adapters over K × n prompt rows (the layout of
`Segment.run_hooked` and of steered generation) give adapter k to rows k·n .. k·n+n-1.
A single adapter (`omega_a` [d_mlp, r]) acts on every row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .sites import HookSite, mlp_hidden_name

__all__ = ["adapt", "adapter_hooks", "check_adapter_host"]

Hook = tuple[str, Callable[..., Any]]


def check_adapter_host(model: Any, layer: int) -> None:
    """Fail with a clear message unless an adapter on block `layer` is a weight edit.

    The adapter's output is added at `hook_mlp_out`, which must be the raw MLP output
    h·W_out + b_out; models that normalise the MLP output before that hook (Gemma 2/3's
    `ln2_post`, OLMo-2-style post-norm) are refused rather than silently adapted
    differently.
    """
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(
            f"adapter layer must be an int in 0..{n_layers - 1} (the model has {n_layers} "
            f"blocks), got {layer!r}"
        )
    if getattr(cfg, "attn_only", False):
        raise ValueError("the model is attention-only; a steering adapter needs an MLP")
    post_norm = bool(getattr(cfg, "use_normalization_before_and_after", False))
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

        post_norm |= getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES
    except ImportError:  # older TransformerLens: no post-norm architectures known
        pass
    if post_norm:
        raise ValueError(
            f"{getattr(cfg, 'model_name', 'this model')} normalises the MLP output before "
            "hook_mlp_out (ln2_post / post-norm), so adding the adapter's output there is "
            "not an edit of W_out; steering adapters support pre-norm models (GPT-2, "
            "Llama, SmolLM2, Qwen, Mistral, ...)"
        )
    hook_dict = getattr(model, "hook_dict", None)
    for name in (mlp_hidden_name(layer), HookSite(layer, "mlp_out").name):
        if hook_dict is not None and name not in hook_dict:
            raise ValueError(
                f"the model has no hook point {name!r}, which a steering adapter needs "
                "(mixture-of-experts MLPs have none; a TransformerBridge needs "
                "enable_compatibility_mode())"
            )


def _grouped(omega: Tensor, width_name: str) -> Tensor:
    if omega.ndim == 2:
        return omega[None]
    if omega.ndim == 3:
        return omega
    raise ValueError(
        f"adapter factors must be [{width_name}, r] or [g, {width_name}, r], "
        f"got {tuple(omega.shape)}"
    )


def adapter_hooks(
    layer: int,
    omega_a: Float[Tensor, "*g d_mlp r"],
    omega_b: Float[Tensor, "*g d_model r"],
    scale: float | Tensor,
) -> list[Hook]:
    """TransformerLens (name, hook) pairs adding `scale · (h Ω_A) Ω_Bᵀ` to block `layer`'s
    MLP output; per group of batch rows when the factors are 3-D (see the module doc).

    Gradients flow to `omega_a` and `omega_b`; the delta is computed in their dtype.

    Examples:
        >>> hooks = adapter_hooks(1, torch.randn(64, 1), torch.zeros(32, 1), 4.0)
        >>> [name for name, _ in hooks]
        ['blocks.1.mlp.hook_post', 'blocks.1.hook_mlp_out']
    """
    a, b = _grouped(omega_a, "d_mlp"), _grouped(omega_b, "d_model")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"omega_a {tuple(omega_a.shape)} and omega_b {tuple(omega_b.shape)} disagree on "
            "the number of adapters or the rank"
        )
    hidden_name, out_name = mlp_hidden_name(layer), HookSite(layer, "mlp_out").name
    store: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any = None) -> None:
        store["h"] = act

    def write(act: Tensor, hook: Any = None) -> Tensor:
        h = store.pop("h", None)
        if h is None:
            raise RuntimeError(
                f"the adapter hook at {out_name} ran but {hidden_name} did not run before it "
                "in this forward pass; does the host expose TransformerLens MLP hook names?"
            )
        g, rows = a.shape[0], act.shape[0]
        if rows % g:
            raise ValueError(
                f"{g} adapters for a batch of {rows} rows; the batch must hold a whole "
                "number of rows per adapter (rows = adapters × prompts)"
            )
        if h.shape[-1] != a.shape[1] or act.shape[-1] != b.shape[1]:
            raise ValueError(
                f"adapter has d_mlp={a.shape[1]}, d_model={b.shape[1]} but block {layer} "
                f"has d_mlp={h.shape[-1]}, d_model={act.shape[-1]}"
            )
        a_ = a.to(act.device)
        b_ = b.to(act.device)
        coeff = h.to(a_.dtype).reshape(g, -1, h.shape[-1]) @ a_  # [g, rows/g·pos, r]
        delta = (coeff @ b_.transpose(-1, -2)) * scale  # [g, rows/g·pos, d_model]
        return act + delta.reshape(act.shape).to(act.dtype)

    return [(hidden_name, read), (out_name, write)]


@contextmanager
def adapt(
    model: Any,
    layer: int,
    omega_a: Float[Tensor, "*g d_mlp r"],
    omega_b: Float[Tensor, "*g d_model r"],
    *,
    scale: float = 1.0,
) -> Iterator[Any]:
    """Apply an adapter (or one per group of batch rows) inside the block.

    `scale` is the whole multiplier s (an artifact passes radius × its own scale). The
    hooks are removed on exit, also when the body raises.

    Examples:
        >>> unit = torch.nn.functional.normalize  # doctest: +SKIP
        >>> a = unit(torch.randn(model.cfg.d_mlp, 1), dim=0)  # doctest: +SKIP
        >>> b = unit(torch.randn(model.cfg.d_model, 1), dim=0)  # doctest: +SKIP
        >>> with adapt(model, 1, a, b, scale=4.0):  # doctest: +SKIP
        ...     logits = model("Hello")  # doctest: +SKIP
    """
    check_adapter_host(model, layer)
    if not (torch.isfinite(omega_a).all() and torch.isfinite(omega_b).all()):
        raise ValueError("adapter factors contain NaN or inf")
    with model.hooks(fwd_hooks=adapter_hooks(layer, omega_a, omega_b, scale)):
        yield model
