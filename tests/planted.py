"""A tiny model with planted directions: pushing the residual along u_k after block 0
switches on two ReLU neurons of block 1 with gain g_k, which write a large vector that
reaches the target. The MELBO optimum is then (close to) ±R·u_k, known in advance."""

from __future__ import annotations

import torch
from conftest import make_tiny
from transformer_lens import HookedTransformer


def planted_model(
    gains: tuple[float, ...] = (12.0,), d_model: int = 64, seed: int = 0, quiet: float = 0.1
) -> tuple[HookedTransformer, torch.Tensor]:
    """Return (model, U) with U [len(gains), d_model] orthonormal planted directions."""
    model = make_tiny(
        n_layers=3,
        d_model=d_model,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=64,
        act_fn="relu",
        normalization_type=None,
        init_seed=seed,
    )
    gen = torch.Generator().manual_seed(seed + 99)
    u, _ = torch.linalg.qr(torch.randn(d_model, 2 * len(gains), generator=gen))
    planted, writes = u[:, : len(gains)].T, u[:, len(gains) :].T
    with torch.no_grad():
        # quiet the rest of the segment so the planted neurons dominate downstream
        for block in model.blocks[1:]:
            block.attn.W_O.mul_(quiet)
            block.mlp.W_out.mul_(quiet)
        mlp = model.blocks[1].mlp
        for k, g in enumerate(gains):
            for j, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
                mlp.W_in[:, j] = sign * g * planted[k]
                mlp.b_in[j] = 0.0
                mlp.W_out[j, :] = g * writes[k]
        # other neurons must not read the planted directions
        others = slice(2 * len(gains), None)
        mlp.W_in[:, others] -= planted.T @ (planted @ mlp.W_in[:, others])
    return model, planted
