"""Supervised estimators as plain callables over contrast-pair activations (P, N), as
steering-vectors' aggregators are: difference of means, principal components of the
paired differences, and a logistic-regression probe. Each returns a direction."""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Method", "logistic_probe", "mean_difference", "pca_directions", "unit_direction"]


Method = Literal["mean_difference", "pca", "probe"]


# ---------------------------------------------------------------------- directions
def mean_difference(
    P: Float[Tensor, "n_pos d_model"], N: Float[Tensor, "n_neg d_model"]
) -> Float[Tensor, " d_model"]:
    """mean_i (P_i − N_i) as a [1, d] float64 direction (ActAdd, CAA).

    Examples:
        >>> mean_difference(torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 1.0]])).tolist()
        [[2.0, 0.0]]
    """
    return (P.double() - N.double()).mean(0, keepdim=True)


def pca_directions(
    P: Float[Tensor, "n d_model"], N: Float[Tensor, "n d_model"], n_components: int, center: bool
) -> tuple[Tensor, Tensor]:
    """Unit principal directions of the paired differences and their variance shares."""
    D = P.double() - N.double()
    if center:
        if D.shape[0] < 2:
            raise ValueError("center=True needs at least 2 pairs (one pair has no variance)")
        X = D - D.mean(0, keepdim=True)
    else:
        X = D
    limit = min(X.shape) - (1 if center else 0)
    if not 1 <= n_components <= limit:
        raise ValueError(
            f"n_components must be in [1, {limit}] for {D.shape[0]} pairs in d_model="
            f"{D.shape[1]} (center={center}), got {n_components}"
        )
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    dirs = Vh[:n_components]
    # sign: the positive side projects higher than the negative side on average
    sign = torch.sign(D.mean(0) @ dirs.T)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    share = S.pow(2) / S.pow(2).sum().clamp_min(1e-300)
    return dirs * sign[:, None], share[:n_components]


def logistic_probe(
    P: Float[Tensor, "n_pos d_model"], N: Float[Tensor, "n_neg d_model"], l2: float, max_iter: int
) -> tuple[Float[Tensor, " d_model"], dict[str, Any]]:
    """Unit weight direction of an L2 logistic-regression probe (positive = label 1)."""
    with torch.inference_mode(False):  # trainable even when called under inference_mode
        return _fit_probe(P.clone(), N.clone(), l2, max_iter)


def _fit_probe(P: Tensor, N: Tensor, l2: float, max_iter: int) -> tuple[Tensor, dict[str, Any]]:
    X = torch.cat([P, N]).double()
    y = torch.cat([torch.ones(len(P)), torch.zeros(len(N))]).double().to(X.device)
    mu = X.mean(0, keepdim=True)
    scale = (X - mu).pow(2).sum(-1).mean().div(X.shape[1]).sqrt().clamp_min(1e-12)
    Xs = (X - mu) / scale  # one scalar: the direction in activation space is unchanged
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros((), dtype=X.dtype, device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss_fn() -> Tensor:
        logits = Xs @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return bce + 0.5 * l2 * w.pow(2).sum()

    evaluations = [0]

    def closure() -> Tensor:
        evaluations[0] += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        loss = loss_fn()
    w, b = w.detach(), b.detach()
    if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
        raise ValueError(
            "the probe did not train (zero or non-finite weights); are the positive and "
            "negative activations identical? Try a larger l2"
        )
    with torch.no_grad():
        acc = ((Xs @ w + b > 0).double() == y).double().mean()
    info = {
        "probe_loss": float(loss),
        "probe_accuracy": float(acc),
        "probe_evaluations": evaluations[0],
        "probe_bias": float(b),
        "feature_scale": float(scale),
    }
    return w / w.norm(), info


def unit_direction(
    method: Method,
    P: Float[Tensor, "n_pos d_model"],
    N: Float[Tensor, "n_neg d_model"],
    options: dict[str, Any],
) -> Tensor:
    if method == "mean_difference":
        v = mean_difference(P, N)[0]
        return v / v.norm().clamp_min(1e-300)
    if method == "pca":
        dirs, _ = pca_directions(P, N, 1, bool(options.get("center", False)))
        return dirs[0]
    if method == "probe":
        w, _ = logistic_probe(
            P, N, float(options.get("l2", 1e-2)), int(options.get("max_iter", 500))
        )
        return w
    raise ValueError(f"method must be 'mean_difference', 'pca' or 'probe', got {method!r}")
