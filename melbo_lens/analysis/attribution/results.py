"""What an attribution returns: the exact split of the target delta, node estimates and
their verification by patching, as plain result objects that save to JSON."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor

from melbo_lens.core.sites import (
    HookSite,
)

__all__ = ["DeltaAttribution", "DeltaDecomposition", "GroupCompleteness", "NodeAttribution"]


Hook = tuple[str, Callable[..., Any]]


Metric = Callable[[Tensor], Tensor]


METHODS = ("exact", "attribution_patching", "integrated_gradients")


PATCH_DIRECTION = "steered run, node set to its unsteered activation"


# ---------------------------------------------------------------------- results
@dataclass
class DeltaDecomposition:
    """Δ at the target split into additive components, per prompt and token.

    `components[c]` is component c's contribution; their sum is `delta` up to float
    rounding (`sum_error`: max |Σ − Δ| / max |Δ|).

    Attributes:
        names: One name per component (`"L3H2"`, `"mlp4"`, `"source"`, ...).
        kinds: `"head"`, `"mlp"`, `"bias"` or `"source"` per component.
        components: [c, n, pos, d_model] each component's contribution to Δ.
        delta: [n, pos, d_model] Δ = Z(θ) − Z(0) at the target.
        target_mask: [n, pos] the target positions.
        source: Where the vector was added.
        target: Where Δ is read.
        sum_error: max |Σ components − Δ| / max |Δ|.
        attention_mask: [n, pos] the real tokens.
    """

    names: list[str]
    kinds: list[str]
    components: Float[Tensor, "c n pos d_model"]
    delta: Float[Tensor, "n pos d_model"]
    target_mask: Bool[Tensor, "n pos"]
    source: HookSite
    target: HookSite
    sum_error: float
    attention_mask: Bool[Tensor, "n pos"] | None = None

    def contributions(self) -> Float[Tensor, " c"]:
        """Σ over target positions of ⟨component_t, Δ_t⟩; they sum to Σ_t ||Δ_t||²."""
        m = self.target_mask[None, :, :, None]
        return (self.components * self.delta[None] * m).sum((1, 2, 3))

    def token_norms(self) -> Float[Tensor, "n pos"]:
        """||Δ_t|| per prompt and position (every real position, target or not)."""
        return self.delta.norm(dim=-1)

    def component_token_norms(self) -> Float[Tensor, "c n pos"]:
        """||component_t|| per component, prompt and position."""
        return self.components.norm(dim=-1)

    def token_table(
        self, prompt: int = 0, tokens: Sequence[str] | None = None, top: int = 3
    ) -> str:
        """Per position of one prompt: ||Δ_t||, whether it is a target position, and the
        `top` components by share ⟨c_t, Δ_t⟩ / ||Δ_t||² of that token's change."""
        real = self.attention_mask[prompt] if self.attention_mask is not None else None
        n_pos = int(real.sum()) if real is not None else self.delta.shape[1]
        d = self.delta[prompt, :n_pos]
        share = (self.components[:, prompt, :n_pos] * d).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-30)
        lines = [f"{'pos':>4} {'token':<14}{'target':<8}{'||Δ_t||':>10}  top components"]
        for t in range(n_pos):
            tok = repr(tokens[t])[:13] if tokens is not None else ""
            best = share[:, t].abs().argsort(descending=True)[:top].tolist()
            parts = ", ".join(f"{self.names[c]} {float(share[c, t]):.0%}" for c in best)
            flag = "*" if bool(self.target_mask[prompt, t]) else ""
            lines.append(f"{t:>4} {tok:<14}{flag:<8}{float(d[t].norm()):>10.4g}  {parts}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        contrib = self.contributions().tolist()
        return {
            "source": self.source.name,
            "target": self.target.name,
            "sum_error": self.sum_error,
            "total_sq_norm": float((self.delta.pow(2).sum(-1) * self.target_mask).sum()),
            "components": [
                {"name": n, "kind": k, "contribution": c}
                for n, k, c in zip(self.names, self.kinds, contrib, strict=True)
            ],
            "token_norms": self.token_norms().tolist(),
            "target_mask": self.target_mask.tolist(),
            "component_token_norms": {
                n: v.tolist() for n, v in zip(self.names, self.component_token_norms(), strict=True)
            },
        }

    def table(self, limit: int = 20) -> str:
        """Components ranked by |contribution to Σ_t ||Δ_t||²|."""
        contrib = self.contributions()
        total = float(contrib.sum())
        order = contrib.abs().argsort(descending=True)[:limit].tolist()
        lines = [
            f"Δ {self.source.name} -> {self.target.name}: Σ_t ||Δ_t||² = {total:.4g} "
            f"(decomposition error {self.sum_error:.1e})",
            f"{'component':<14}{'kind':<10}{'⟨c, Δ⟩':>12}{'share':>9}",
        ]
        for i in order:
            share = float(contrib[i]) / total if total else float("nan")
            lines.append(
                f"{self.names[i]:<14}{self.kinds[i]:<10}{float(contrib[i]):>12.4g}{share:>9.1%}"
            )
        if len(order) < len(self.names):
            lines.append(f"... {len(self.names) - len(order)} more components")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class NodeAttribution:
    """One node's estimated effect on the metric, and (if verified) the patched effect."""

    name: str
    kind: str  # "head" | "mlp" | "feature" | "sae_error"
    hook: str
    index: int | None
    estimate: float
    actual: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "hook": self.hook,
            "index": self.index,
            "estimate": self.estimate,
            "actual": self.actual,
        }


@dataclass
class GroupCompleteness:
    """Σ of a group's estimates against the effect of patching the whole group."""

    group: str
    n_nodes: int
    estimate_sum: float
    patched_change: float

    @property
    def error(self) -> float:
        return abs(self.estimate_sum - self.patched_change)

    @property
    def relative_error(self) -> float:
        return self.error / max(abs(self.patched_change), 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "n_nodes": self.n_nodes,
            "estimate_sum": self.estimate_sum,
            "patched_change": self.patched_change,
            "error": self.error,
            "relative_error": self.relative_error,
        }


@dataclass
class DeltaAttribution:
    """Decomposition of Δ, node attributions of a metric, and their verification.

    Attributes:
        decomposition: The exact decomposition of Δ the attribution refines.
        method: `"attribution_patching"` or `"integrated_gradients"`.
        metric: The metric's name.
        metric_steered: The metric with the vector.
        metric_unsteered: The metric without it.
        nodes: Per node (head or MLP): its attribution and, for the top nodes, the real
            patching effect it predicts.
        groups: Completeness checks: attribution sums against patching whole groups.
        correlation: Pearson correlation of attributions with patching effects.
        steps: Integrated-gradients midpoints (None for attribution patching).
        linearised_at: Which run the gradient was taken in.
        patch_direction: What the verifying patches do.
    """

    decomposition: DeltaDecomposition
    method: str
    metric: str
    metric_steered: float
    metric_unsteered: float
    nodes: list[NodeAttribution] = field(default_factory=list)
    groups: list[GroupCompleteness] = field(default_factory=list)
    correlation: float | None = None
    steps: int | None = None
    linearised_at: str | None = None
    patch_direction: str = PATCH_DIRECTION

    @property
    def metric_change(self) -> float:
        return self.metric_steered - self.metric_unsteered

    @property
    def verified(self) -> list[NodeAttribution]:
        return [n for n in self.nodes if n.actual is not None]

    @property
    def completeness_error(self) -> float:
        """Largest relative |Σ estimates − patched effect| over node groups (nan if none)."""
        return max((g.relative_error for g in self.groups), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "metric_steered": self.metric_steered,
            "metric_unsteered": self.metric_unsteered,
            "metric_change": self.metric_change,
            "steps": self.steps,
            "linearised_at": self.linearised_at,
            "patch_direction": self.patch_direction,
            "correlation": _finite_or_none(self.correlation),
            "completeness_error": _finite_or_none(self.completeness_error),
            "nodes": [n.to_dict() for n in self.nodes],
            "groups": [g.to_dict() for g in self.groups],
            "decomposition": self.decomposition.to_dict(),
        }

    def to_saved(self, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(JSON part, tensors named `prefix` + ...) of a compact attribution (components
        and Δ as per-token norms, last axis 1), as a saved run analysis stores it."""
        dec = self.decomposition
        tensors = {
            prefix + "components": dec.components[..., 0].float(),
            prefix + "delta_norm": dec.delta[..., 0].float(),
            prefix + "target_mask": dec.target_mask.clone(),
        }
        if dec.attention_mask is not None:
            tensors[prefix + "attention_mask"] = dec.attention_mask.clone()
        data = {
            "method": self.method,
            "metric": self.metric,
            "metric_steered": self.metric_steered,
            "metric_unsteered": self.metric_unsteered,
            "correlation": self.correlation,
            "steps": self.steps,
            "linearised_at": self.linearised_at,
            "patch_direction": self.patch_direction,
            "nodes": [n.to_dict() for n in self.nodes],
            "groups": [
                {
                    "group": g.group,
                    "n_nodes": g.n_nodes,
                    "estimate_sum": g.estimate_sum,
                    "patched_change": g.patched_change,
                }
                for g in self.groups
            ],
            "decomposition": {
                "names": dec.names,
                "kinds": dec.kinds,
                "source": dec.source.name,
                "target": dec.target.name,
                "sum_error": dec.sum_error,
            },
        }
        return data, tensors

    @classmethod
    def from_saved(
        cls, d: dict[str, Any], tensors: dict[str, Tensor], prefix: str
    ) -> DeltaAttribution:
        """Inverse of `to_saved`."""
        dd = d["decomposition"]
        missing = [
            n for n in ("components", "delta_norm", "target_mask") if prefix + n not in tensors
        ]
        if missing:
            raise KeyError(f"attribution {prefix!r} lacks tensors {missing}")
        dec = DeltaDecomposition(
            names=list(dd["names"]),
            kinds=list(dd["kinds"]),
            components=tensors[prefix + "components"][..., None],
            delta=tensors[prefix + "delta_norm"][..., None],
            target_mask=tensors[prefix + "target_mask"].bool(),
            source=HookSite.parse(dd["source"]),
            target=HookSite.parse(dd["target"]),
            sum_error=float(dd["sum_error"]),
            attention_mask=tensors.get(prefix + "attention_mask"),
        )
        return cls(
            decomposition=dec,
            method=d["method"],
            metric=d["metric"],
            metric_steered=float(d["metric_steered"]),
            metric_unsteered=float(d["metric_unsteered"]),
            nodes=[NodeAttribution(**n) for n in d["nodes"]],
            groups=[GroupCompleteness(**g) for g in d["groups"]],
            correlation=d["correlation"],
            steps=d["steps"],
            linearised_at=d["linearised_at"],
            patch_direction=d["patch_direction"],
        )

    def table(self, limit: int = 20) -> str:
        lines = [self.decomposition.table(limit), ""]
        if self.method == "exact":
            return "\n".join(lines[:1])
        corr = "n/a" if self.correlation is None else f"{self.correlation:.3f}"
        lines += [
            f"{self.method} of {self.metric}: m(steered) = {self.metric_steered:.4g}, "
            f"m(unsteered) = {self.metric_unsteered:.4g}; effect = {PATCH_DIRECTION}",
            f"verified nodes: {len(self.verified)}, Pearson r(estimate, actual) = {corr}; "
            f"completeness error (max over groups) = {self.completeness_error:.2e}",
            f"{'node':<40} {'kind':<12}{'estimate':>12}{'actual':>12}",
        ]
        for n in self.nodes[:limit]:
            actual = "" if n.actual is None else f"{n.actual:.4g}"
            lines.append(f"{n.name:<40} {n.kind:<12}{n.estimate:>12.4g}{actual:>12}")
        if len(self.nodes) > limit:
            lines.append(f"... {len(self.nodes) - limit} more nodes")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
