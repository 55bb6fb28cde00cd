"""A tiny model with planted directions, for checking that an optimiser finds them.

Pushing the residual after block 0 along u_k switches on two ReLU neurons of block 1
(one per sign) with gain g_k, which write a large vector that reaches the target; the
rest of the segment is quieted. The MELBO optimum is then (close to) ±R·u_k, known in
advance. With `threshold > 0` the planted neurons fire only past that pre-activation,
so a random start sees no gradient from them: the planted direction sits in a narrow
basin, beside generic local optima a single start can fall into.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = ["planted_direction_model"]


def planted_direction_model(
    gains: tuple[float, ...] = (12.0,),
    d_model: int = 64,
    seed: int = 0,
    quiet: float = 0.1,
    threshold: float = 0.0,
) -> tuple[HookedTransformer, torch.Tensor]:
    """(model, U): a 3-layer attention+ReLU-MLP model (vocabulary 50, no normalisation)
    and U [len(gains), d_model], the orthonormal planted directions.

    Examples:
        >>> model, U = planted_direction_model((12.0, 8.0), d_model=32)
        >>> U.shape, abs(float(U[0] @ U[1])) < 1e-6
        (torch.Size([2, 32]), True)
    """
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=d_model,
        n_ctx=64,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=64,
        d_vocab=50,
        act_fn="relu",
        normalization_type=None,
        positional_embedding_type="rotary",
        seed=0,
        default_prepend_bos=False,
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 99)
    u, _ = torch.linalg.qr(torch.randn(d_model, 2 * len(gains), generator=gen))
    planted, writes = u[:, : len(gains)].T, u[:, len(gains) :].T
    with torch.no_grad():
        # quiet the rest of the segment so the planted neurons dominate downstream
        for block in model.blocks[1:]:
            block.attn.W_O.mul_(quiet)
            block.mlp.W_out.mul_(quiet)
        mlp: Any = model.blocks[1].mlp
        for k, g in enumerate(gains):
            for j, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
                mlp.W_in[:, j] = sign * g * planted[k]
                mlp.b_in[j] = -threshold
                mlp.W_out[j, :] = g * writes[k]
        # other neurons must not read the planted directions
        others = slice(2 * len(gains), None)
        mlp.W_in[:, others] -= planted.T @ (planted @ mlp.W_in[:, others])
    return model, planted
