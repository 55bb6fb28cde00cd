"""Attribution of the difference between two models to SAE features at one site of the
second: a loss on their output difference, backpropagated, gradient × activation change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.analysis.attribution.estimators import sae_parts
from melbo_lens.analysis.attribution.exact import capture_hook
from melbo_lens.analysis.attribution.results import Hook
from melbo_lens.core.host import d_model_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import (
    HookSite,
    as_site,
    require_hook,
)

__all__ = ["FeatureChange", "feature_change_attribution"]


# ---------------------------------------------------------------------- model differences
@dataclass
class FeatureChange:
    """Which SAE features at `site` explain the output difference of model B from model A.

    `scores[i]` = Σ over real tokens of ∂loss/∂f_i (in B's run) × (f_i(B) − f_i(A)):
    the first-order drop in the loss if feature i went back to its value under A.
    `grad_x_act[i]` uses f_i(B) instead of the change (importance, not change).

    Attributes:
        site: The SAE's site.
        loss: The loss the attribution differentiates (e.g. `"next_token"`).
        loss_value: Its value in model B's run.
        scores: Per latent, gradient × activation change (B minus A).
        grad_x_act: Per latent, gradient × B's activation.
        activation_change: Per latent, summed f_i(B) − f_i(A).
        error_score: The same score for the SAE's error term.
    """

    site: HookSite
    loss: str
    loss_value: float
    scores: Float[Tensor, " d_sae"]
    grad_x_act: Float[Tensor, " d_sae"]
    activation_change: Float[Tensor, " d_sae"]
    error_score: float

    def ranked(self, top_k: int | None = None) -> list[int]:
        """Feature indices by |score|, largest first."""
        order = self.scores.abs().argsort(descending=True).tolist()
        return order if top_k is None else order[:top_k]

    def to_dict(self, top_k: int = 50) -> dict[str, Any]:
        return {
            "site": self.site.name,
            "loss": self.loss,
            "loss_value": self.loss_value,
            "error_score": self.error_score,
            "features": [
                {
                    "feature": i,
                    "score": float(self.scores[i]),
                    "grad_x_act": float(self.grad_x_act[i]),
                    "activation_change": float(self.activation_change[i]),
                }
                for i in self.ranked(top_k)
            ],
        }

    def table(self, limit: int = 20) -> str:
        lines = [
            f"features at {self.site.name} explaining the {self.loss} "
            f"(= {self.loss_value:.4g}) between two models; SAE error score "
            f"{self.error_score:.4g}",
            f"{'feature':>8}{'grad×Δf':>12}{'grad×f':>12}{'Σ Δf':>12}",
        ]
        for i in self.ranked(limit):
            lines.append(
                f"{i:>8}{float(self.scores[i]):>12.4g}{float(self.grad_x_act[i]):>12.4g}"
                f"{float(self.activation_change[i]):>12.4g}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _kl_loss(logits_b: Tensor, logits_a: Tensor, mask: Tensor) -> Tensor:
    """Σ over real tokens of KL(p_A || p_B)."""
    log_a = logits_a.log_softmax(-1)
    log_b = logits_b.log_softmax(-1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1)
    return (kl * mask).sum()


def _mse_loss(logits_b: Tensor, logits_a: Tensor, mask: Tensor) -> Tensor:
    """Σ over real tokens of ||logits_B − logits_A||²."""
    return ((logits_b - logits_a).pow(2).sum(-1) * mask).sum()


_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "kl": _kl_loss,
    "mse": _mse_loss,
}


def _same_architecture(model_a: Any, model_b: Any) -> None:
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")
    diff = {
        k: (getattr(model_a.cfg, k, None), getattr(model_b.cfg, k, None))
        for k in keys
        if getattr(model_a.cfg, k, None) != getattr(model_b.cfg, k, None)
    }
    if diff:
        raise ValueError(
            f"the two models differ in architecture ({diff}, as (A, B)); feature change "
            "attribution compares models of the same architecture"
        )


def feature_change_attribution(
    model_a: Any,
    model_b: Any,
    prompts: PromptSet | Sequence[str],
    sae: Any,
    site: HookSite | str | int,
    *,
    loss: str | Callable[[Tensor, Tensor, Tensor], Tensor] = "kl",
    hooks_b: Sequence[Hook] = (),
) -> FeatureChange:
    """Rank SAE features at `site` by how much their change explains B's output change.

    `loss(logits_B, logits_A, real_token_mask) -> scalar` measures the output difference
    ("kl": Σ_t KL(p_A || p_B), default; "mse": Σ_t ||logits_B − logits_A||²). It is
    backpropagated, in B's run, into the features f = encode(x) and the error term of
    the SAE at `site` (x = decode(f) + err); each feature scores gradient × (f(B) − f(A)).
    Use it for a model and a fine-tuned copy, a weight edit, or an adapter applied
    through `hooks_b`: (hook name, function) pairs active only in B's run, e.g.
    `adapter_hooks(...)` or a `steering_hook` with `model_b = model_a`. Hooks at `site`
    itself run before the SAE reads it.

    Args:
        model_a: the reference model (the base).
        model_b: the changed model (fine-tuned, edited, or model_a with `hooks_b`).
        prompts: the prompts (a `PromptSet` or texts), with answers when they matter.
        sae: an SAE at `site`, of the models' width.
        site: where the features are read.
        loss: "kl", "mse", or a callable loss(logits_B, logits_A, real_token_mask).
        hooks_b: (hook name, function) pairs active only in model B's run.

    Returns:
        `FeatureChange`: each feature's score, its gradient x activation, its activation
        change, and the SAE error's score; `ranked(k)` and `table()`.

    Raises:
        ValueError: models of different architectures, an SAE of another width, or an
            unknown loss.

    Examples:
        >>> import copy
        >>> tuned = copy.deepcopy(model)
        >>> tuned.blocks[0].mlp.W_out.data += 0.05          # a "fine-tune" before the SAE's site
        >>> fc = feature_change_attribution(model, tuned, prompts, sae, HookSite(1))
        >>> fc.scores.shape, fc.activation_change.abs().sum() > 0
        (torch.Size([64]), tensor(True))
    """
    _same_architecture(model_a, model_b)
    prompts = PromptSet.coerce(model_a, prompts)
    site = require_hook(model_b, require_hook(model_a, as_site(site)))
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    if d_in is not None and int(d_in) != d_model_of(model_a):
        raise ValueError(
            f"the SAE has d_in={d_in} but the models have d_model={d_model_of(model_a)}"
        )
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(_LOSSES)}")
        loss_name, loss_fn = loss, _LOSSES[loss]
    else:
        loss_name, loss_fn = getattr(loss, "__name__", "custom"), loss
    tokens, attn = prompts.tokens, prompts.attention_mask
    store: dict[str, Tensor] = {}
    with torch.no_grad():
        with model_a.hooks(fwd_hooks=[(site.name, capture_hook(store, site.name))]):
            logits_a = model_a(tokens, attention_mask=attn.long())
        f_a, e_a = sae_parts(sae, store[site.name])
    leaves: list[Tensor] = []

    def split(act: Tensor, hook: Any = None) -> Tensor:
        with torch.no_grad():
            f, e = sae_parts(sae, act)
        leaves.extend([f.requires_grad_(True), e.requires_grad_(True)])
        return (sae.decode(leaves[0]) + leaves[1]).to(act.dtype)

    with torch.enable_grad(), model_b.hooks(fwd_hooks=[*hooks_b, (site.name, split)]):
        logits_b = model_b(tokens, attention_mask=attn.long())
        value = loss_fn(logits_b, logits_a, attn.to(logits_b.dtype))
        g_f, g_e = torch.autograd.grad(value, leaves)
    f_b, e_b = leaves[0].detach(), leaves[1].detach()
    real = attn[..., None].to(f_b.dtype)
    flat = f_b.shape[-1]
    return FeatureChange(
        site=site,
        loss=loss_name,
        loss_value=float(value.detach()),
        scores=(g_f * (f_b - f_a) * real).reshape(-1, flat).sum(0),
        grad_x_act=(g_f * f_b * real).reshape(-1, flat).sum(0),
        activation_change=((f_b - f_a) * real).reshape(-1, flat).sum(0),
        error_score=float((g_e * (e_b - e_a) * real).sum()),
    )
