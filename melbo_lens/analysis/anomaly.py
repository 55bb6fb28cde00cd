"""Mechanistic anomaly detection with learned perturbations.

The MELBO write-up proposes flagging an input "if the model's activations look similar to
one of the previously learned perturbations". Here that is a score:

    s_k   = mean over clean prompts x of  Z_T(x; member k) − Z_T(x)       (signature)
    δ(x)  = Z_T(x) − mean over clean prompts of Z_T                       (deviation)
    score(x) = max_k cos(δ(x), s_k)

with Z_T the target activation at each prompt's last token (where a chat model decides
its answer). The members are learned on clean prompts only (no knowledge of any trigger);
an input whose own deviation from the clean distribution points the way a learned
perturbation pushes scores high. Any perturbation works (vectors, adapters: their hooks).

Baselines measured the same way: random members of the same size, and the Mahalanobis
distance of Z_T(x) to the clean prompts' Z_T (Ledoit–Wolf shrinkage towards a scaled
identity, since there are fewer clean prompts than dimensions). `auroc` is the
Mann–Whitney statistic (ties count half): the probability that a random anomalous input
scores above a random clean one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.base import Perturbation

__all__ = [
    "PerturbationDetector",
    "auroc",
    "fit_detector",
    "last_token_targets",
    "mahalanobis_scores",
    "seed_interval",
]


@torch.no_grad()
def last_token_targets(
    model: Host,
    prompts: PromptSet,
    target: HookSite,
    perturbation: Perturbation | None = None,
    member: int = 0,
) -> Float[Tensor, "n d_model"]:
    """Z_T at each prompt's last real token (float32), with `member` of `perturbation`
    applied to every row when one is given."""
    hooks = [] if perturbation is None else perturbation.hooks(model, member)
    z = run_to_site(model, prompts.tokens, prompts.attention_mask, target.name, hooks).float()
    last = prompts.attention_mask.sum(-1).to(z.device) - 1
    return z[torch.arange(z.shape[0], device=z.device), last]


@dataclass
class PerturbationDetector:
    """Signatures of learned perturbations and the clean reference (see the module)."""

    target: HookSite
    reference_mean: Float[Tensor, " d_model"]
    signatures: Float[Tensor, "k d_model"]

    @torch.no_grad()
    def score(self, model: Host, prompts: PromptSet) -> Float[Tensor, " n"]:
        """max_k cos(δ(x), s_k) for each prompt x."""
        deviation = last_token_targets(model, prompts, self.target) - self.reference_mean
        return self.score_deviations(deviation)

    def score_deviations(self, deviation: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        """The score of given deviations δ (rows) against the signatures.

        Examples:
            >>> det = PerturbationDetector(HookSite(1), torch.zeros(2), torch.eye(2))
            >>> det.score_deviations(torch.tensor([[0.0, 3.0], [-1.0, -1.0]])).tolist()
            [1.0, -0.7071067690849304]
        """
        unit_d = torch.nn.functional.normalize(deviation.float(), dim=-1)
        unit_s = torch.nn.functional.normalize(self.signatures.float(), dim=-1)
        return (unit_d @ unit_s.T.to(unit_d.device)).max(-1).values


@torch.no_grad()
def fit_detector(
    model: Host,
    perturbation: Perturbation,
    clean: PromptSet,
    target: HookSite,
    members: Sequence[int] | None = None,
) -> PerturbationDetector:
    """The detector of `perturbation`'s members (all by default), fitted on clean prompts."""
    base = last_token_targets(model, clean, target)
    chosen = range(len(perturbation)) if members is None else members
    signatures = torch.stack(
        [(last_token_targets(model, clean, target, perturbation, k) - base).mean(0) for k in chosen]
    )
    return PerturbationDetector(target, base.mean(0), signatures)


def mahalanobis_scores(
    reference: Float[Tensor, "m d"], x: Float[Tensor, "n d"]
) -> Float[Tensor, " n"]:
    """Mahalanobis distance of each row of x to the rows of `reference`, with the
    Ledoit–Wolf shrunk covariance (the well-conditioned estimate when m < d).

    Examples:
        >>> ref = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
        >>> d = mahalanobis_scores(ref, torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
        >>> bool(d[1] > 4 * d[0])
        True
    """
    ref = reference.double()
    m, d = ref.shape
    mean = ref.mean(0)
    centred = ref - mean
    s = centred.T @ centred / m
    mu = torch.trace(s) / d
    target = mu * torch.eye(d, dtype=s.dtype)
    delta2 = (s - target).pow(2).sum() / d
    # Ledoit–Wolf: β = (mean_i ||x_i||⁴ − ||S||²_F) / (m d), the variance of S's entries
    beta2 = (centred.pow(2).sum(-1).pow(2).mean() - (s * s).sum()) / (m * d)
    shrink = float(torch.clamp(beta2 / delta2, 0.0, 1.0)) if float(delta2) > 0 else 1.0
    cov = (1 - shrink) * s + shrink * target
    diff = x.double() - mean
    solved = torch.linalg.solve(cov, diff.T).T
    return (diff * solved).sum(-1).clamp_min(0).sqrt().float()


def auroc(positive: Sequence[float] | Tensor, negative: Sequence[float] | Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half.

    Examples:
        >>> auroc([3.0, 4.0], [1.0, 2.0]), auroc([1.0], [1.0]), auroc([0.0, 2.0], [1.0])
        (1.0, 0.5, 0.5)
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).double()
    ties = (pos[:, None] == neg[None, :]).double()
    return float((greater + 0.5 * ties).mean())


# two-sided 95% Student t quantiles by degrees of freedom (1..10; normal beyond)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean over seeds with its 95% Student t interval (and min/max).

    Examples:
        >>> r = seed_interval([0.9, 1.0, 0.95])
        >>> round(r["mean"], 3), round(r["low"], 3), round(r["high"], 3)
        (0.95, 0.826, 1.074)
    """
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "min": mean, "max": mean, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(n)
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "min": min(v),
        "max": max(v),
        "n": n,
    }
