# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Vector arithmetic: sums and differences of steering vectors, and strength sweeps.

`add_vectors` / `subtract_vectors` combine steering vectors (or a vector and a raw
tensor) into a new `SteeringVectors` whose provenance records the operation.
`scale_sweep` measures how the next-token distribution moves as a vector's strength
grows (KL to the unsteered distribution, top-token changes), one batch per scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, as_site
from melbo_lens.perturbations.vectors import SteeringVectors, steer

SiteLike = HookSite | str | int

__all__ = ["ScaleSweep", "add_vectors", "scale_sweep", "subtract_vectors"]


# ---------------------------------------------------------------------- arithmetic
def _combine(a: SteeringVectors, b: SteeringVectors | Tensor, alpha: float, op: str):
    if isinstance(b, SteeringVectors):
        if b.site != a.site:
            raise ValueError(
                f"cannot {op} vectors from different sites: {a.site.name} and {b.site.name}; "
                "a vector only means something at the site it was made for"
            )
        bv, b_method = b.vectors, b.method
    else:
        bv, b_method = torch.as_tensor(b), "tensor"
        bv = bv[None] if bv.ndim == 1 else bv
    if (
        bv.ndim != 2
        or bv.shape[-1] != a.d_model
        or not (len(a) == len(bv) or len(a) == 1 or len(bv) == 1)
    ):
        raise ValueError(
            f"cannot {op} {tuple(bv.shape)} and {tuple(a.vectors.shape)}: need the same "
            "d_model and the same number of vectors (or a single vector on one side)"
        )
    same = isinstance(b, SteeringVectors)
    return SteeringVectors(
        vectors=a.vectors + alpha * bv.to(a.vectors),
        site=a.site,
        target=a.target if same and b.target == a.target else None,
        method="arithmetic",
        config={
            "op": op,
            "alpha": abs(alpha),
            "a": a.method,
            "b": b_method,
            "n_a": len(a),
            "n_b": len(bv),
        },
        model_name=a.model_name if same and b.model_name == a.model_name else None,
    )


def add_vectors(
    a: SteeringVectors, b: SteeringVectors | Float[Tensor, "*n d_model"], *, alpha: float = 1.0
) -> SteeringVectors:
    """`a + alpha·b` row by row; a single vector on either side broadcasts.

    Args:
        a: the vectors (`SteeringVectors`).
        b: vectors of the same site and width, one vector, or a tensor.
        alpha: the weight of `b`.

    Returns:
        `SteeringVectors` a + alpha·b, with the provenance of the operation.

    Raises:
        ValueError: sites, widths or counts that do not match.

    Examples:
        >>> a = SteeringVectors(torch.eye(3)[:2], HookSite(1))
        >>> add_vectors(a, torch.tensor([0.0, 0.0, 2.0])).vectors.tolist()
        [[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]]
    """
    return _combine(a, b, float(alpha), "add")


def subtract_vectors(
    a: SteeringVectors, b: SteeringVectors | Float[Tensor, "*n d_model"], *, alpha: float = 1.0
) -> SteeringVectors:
    """`a - alpha·b` row by row; a single vector on either side broadcasts.

    Args:
        a: the vectors (`SteeringVectors`).
        b: vectors of the same site and width, one vector, or a tensor.
        alpha: the weight of `b`.

    Returns:
        `SteeringVectors` a - alpha·b, with the provenance of the operation.

    Raises:
        ValueError: sites, widths or counts that do not match.

    Examples:
        >>> a = SteeringVectors(torch.eye(2), HookSite(1))
        >>> subtract_vectors(a, a[0]).vectors.tolist()
        [[0.0, 0.0], [-1.0, 1.0]]
    """
    return _combine(a, b, -float(alpha), "subtract")


# ---------------------------------------------------------------------- scale sweeps
@dataclass
class ScaleSweep:
    """How far each vector moves the next-token distribution at each scale.

    `kl[v, s]`: mean KL(unsteered ‖ steered) in nats over the prompts' target positions,
    for vector `indices[v]` at `scales[s]`. `top1_changed[v, s]`: fraction of those
    positions whose most likely next token changed. `logprob_change[v, s]` (when tokens
    were given): mean change of log P(next token ∈ tokens).

    Attributes:
        scales: The multipliers swept.
        indices: The vectors swept.
        site: Where they were added.
        kl: [vectors, scales] mean KL(unsteered ‖ steered), nats.
        top1_changed: [vectors, scales] fraction of positions whose top token changed.
        logprob_change: [vectors, scales] mean change of log P(next ∈ tokens).
        tokens: The token ids `logprob_change` is about.
    """

    scales: list[float]
    indices: list[int]
    site: HookSite
    kl: Float[Tensor, "n_vectors n_scales"]
    top1_changed: Float[Tensor, "n_vectors n_scales"]
    logprob_change: Float[Tensor, "n_vectors n_scales"] | None = None
    tokens: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scales": self.scales,
            "indices": self.indices,
            "site": self.site.to_dict(),
            "kl": self.kl.tolist(),
            "top1_changed": self.top1_changed.tolist(),
            "logprob_change": None if self.logprob_change is None else self.logprob_change.tolist(),
            "tokens": self.tokens,
        }

    def table(self, metric: str = "kl") -> str:
        """One row per vector, one column per scale."""
        values = getattr(self, metric)
        if values is None:
            raise ValueError(f"this sweep has no {metric!r} (pass tokens= to scale_sweep)")
        head = f"{metric:>14} " + " ".join(f"{s:>8g}" for s in self.scales)
        rows = [
            f"{'vector ' + str(i):>14} " + " ".join(f"{float(x):8.4f}" for x in row)
            for i, row in zip(self.indices, values, strict=True)
        ]
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        parts = [f"scale sweep at {self.site.name}", self.table("kl"), self.table("top1_changed")]
        if self.logprob_change is not None:
            parts.append(self.table("logprob_change"))
        return "\n".join(parts)


def scale_sweep(
    model: Host,
    vectors: SteeringVectors | Float[Tensor, "*n d_model"],
    prompts: PromptSet,
    scales: Sequence[float],
    *,
    indices: Sequence[int] | None = None,
    site: SiteLike | None = None,
    tokens: Sequence[int] | None = None,
    max_rows: int = 16,
) -> ScaleSweep:
    """Steer with each vector at each scale; measure the next-token change vs unsteered.

    All chosen vectors run together on the batch axis (at most `max_rows` rows per
    forward). A plain tensor needs `site`.

    Args:
        model: the model to steer.
        vectors: `SteeringVectors`, or a tensor of vectors with `site`.
        prompts: the prompts; the change is measured at their target positions.
        scales: the multipliers of each vector.
        indices: the vectors to sweep (default: all).
        site: where a plain tensor is added.
        tokens: token ids whose next-token log-probability change is also measured.
        max_rows: rows per forward pass.

    Returns:
        `ScaleSweep`: KL, top-1 change and (with `tokens`) log-probability change per
        vector and scale, with `table()`.

    Raises:
        ValueError: a site that differs from the vectors', or a tensor without one.

    Examples:
        >>> sweep = scale_sweep(model, vectors, prompts, [0.5, 1, 2])
        >>> tuple(sweep.kl.shape), bool((sweep.kl[:, 2] >= sweep.kl[:, 0]).all())
        ((4, 3), True)
    """
    if isinstance(vectors, SteeringVectors):
        if site is not None and as_site(site) != vectors.site:
            raise ValueError(
                f"the vectors were made at {vectors.site.name}, not {as_site(site).name}; "
                "leave site=None, or wrap the tensor in SteeringVectors at the site you want"
            )
        sv = vectors
    else:
        if site is None:
            raise ValueError("a plain tensor of vectors needs site=HookSite(...)")
        v = torch.as_tensor(vectors)
        sv = SteeringVectors(v[None] if v.ndim == 1 else v, as_site(site), method="tensor")
    chosen = list(range(len(sv))) if indices is None else [int(i) for i in indices]
    vecs = sv.vectors[chosen]
    if not scales:
        raise ValueError("no scales given; pass e.g. [0.5, 1.0, 2.0]")
    n, pos = prompts.tokens.shape
    mask = prompts.target_mask
    attn = prompts.attention_mask.long()
    ids = None if tokens is None else torch.as_tensor(list(tokens), device=prompts.tokens.device)
    per_forward = max(1, max_rows // n)
    kl = torch.zeros(len(chosen), len(scales))
    top1 = torch.zeros_like(kl)
    dlogp = torch.zeros_like(kl) if ids is not None else None
    with torch.no_grad():
        base = model(prompts.tokens, attention_mask=attn)[mask].float().log_softmax(-1)
        base_top = base.argmax(-1)
        base_set = None if ids is None else base[:, ids].logsumexp(-1)
        for j, scale in enumerate(scales):
            for start in range(0, len(chosen), per_forward):
                chunk = vecs[start : start + per_forward]
                c = len(chunk)
                with steer(model, sv.site, chunk.repeat_interleave(n, 0), scale=float(scale)):
                    logits = model(prompts.tokens.repeat(c, 1), attention_mask=attn.repeat(c, 1))
                lp = logits.view(c, n, pos, -1)[:, mask].float().log_softmax(-1)  # [c, m, V]
                rows = slice(start, start + c)
                kl[rows, j] = (base.exp() * (base - lp)).sum(-1).clamp_min(0).mean(-1).cpu()
                top1[rows, j] = (lp.argmax(-1) != base_top).float().mean(-1).cpu()
                if dlogp is not None:
                    dlogp[rows, j] = (lp[..., ids].logsumexp(-1) - base_set).mean(-1).cpu()
    return ScaleSweep(
        scales=[float(s) for s in scales],
        indices=chosen,
        site=sv.site,
        kl=kl,
        top1_changed=top1,
        logprob_change=dlogp,
        tokens=None if tokens is None else [int(t) for t in tokens],
    )
