"""Attribution of a steering vector's target-layer change to the parts of the model.

A vector θ added at a source site changes the activations at a later target site by
Δ = Z_target(θ) − Z_target(0). Everything between the two sites writes into the residual
stream additively, so Δ splits *exactly* into

    Δ = (change at the source: θ itself, or an adapter's output)
        + Σ_heads (steered − unsteered head output, z_h · W_O[h])
        + Σ_MLPs  (steered − unsteered MLP output)

per token (the attention bias b_O is written once per layer in both runs and cancels).
That is the decomposition; it needs no approximation.

Which *nodes* matter for a scalar metric m of the target activations (default the MELBO
objective for p = 2: Σ over target positions of ||Δ_t||²) is a causal question. The nodes
are attention heads, MLPs and, for any SAE given at a site, its features plus its error
term (x = decode(encode(x)) + err, the error kept as one node). Every estimate answers
the same question as real activation patching here:

    effect(node) = m(steered) − m(steered run with that node set to its unsteered value)

* attribution patching: gradient × activation change, linearised at the **steered**
  point (at the unsteered point the gradient of ||Δ||² is zero, so that point tells
  nothing about the default metric);
* integrated gradients: the gradient averaged along the straight path from the
  unsteered to the steered activations of one *group* of nodes (the heads of a layer,
  an MLP, an SAE's features and error), with everything downstream recomputed. Its
  completeness: the attributions of a group sum to the effect of patching the whole
  group, up to the quadrature error of `steps` midpoints. For an SAE on the residual
  stream (a cut between source and target) that is the whole change m(steered) −
  m(unsteered).

Verification patches the top-N nodes one at a time (steered run, node ← unsteered) and
reports estimate against actual effect and their Pearson correlation. Attribution
patching is first-order in the node's change; with the quadratic default metric that
leaves an error of ||c||² (c: the node's own share of Δ) at *any* vector size, so use
integrated gradients for ||Δ||² and attribution patching for metrics linear in Δ.

The same machinery explains the difference between two models (`feature_change_attribution`):
a loss on their output difference is backpropagated into SAE features at one site of
model B, and each feature scores gradient × (its activation under B − under A).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from melbo_lens.core.host import d_model_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import (
    STREAM_POINTS,
    HookSite,
    as_site,
    attn_z_name,
    check_order,
    require_hook,
)
from melbo_lens.perturbations.adapters import SteeringAdapters, adapter_hooks, check_adapter_host
from melbo_lens.perturbations.vectors import SteeringVectors, steering_hook

__all__ = [
    "DeltaAttribution",
    "DeltaDecomposition",
    "FeatureChange",
    "GroupCompleteness",
    "NodeAttribution",
    "attribute_target_delta",
    "decompose_target_delta",
    "feature_change_attribution",
    "logit_diff_metric",
]

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
    """Decomposition of Δ, node attributions of a metric, and their verification."""

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


# ---------------------------------------------------------------------- metrics
def _delta_norm_metric(unsteered: Tensor, mask: Tensor) -> Metric:
    def delta_sq_norm(z: Tensor) -> Tensor:
        return ((z - unsteered).pow(2).sum(-1) * mask).sum()

    return delta_sq_norm


def _projection_metric(direction: Tensor, unsteered: Tensor, mask: Tensor) -> Metric:
    if direction.ndim != 1 or direction.shape[0] != unsteered.shape[-1]:
        raise ValueError(
            f"a metric direction must be [d_model={unsteered.shape[-1]}], got "
            f"{tuple(direction.shape)}"
        )
    unit = torch.nn.functional.normalize(direction.to(unsteered), dim=0)

    def delta_projection(z: Tensor) -> Tensor:
        return (((z - unsteered) @ unit) * mask).sum()

    return delta_projection


def logit_diff_metric(
    model: Any, prompts: PromptSet, target: HookSite | str | int, good: int, bad: int
) -> Metric:
    """m(Z_target) = Σ_prompts logit[good] − logit[bad] at each prompt's last real token.

    The rest of the model runs from the target (a `resid_pre` / `resid_post` site of a
    HookedTransformer) to the logits.

    Examples:
        >>> m = logit_diff_metric(model, prompts, HookSite(2), good=7, bad=9)  # doctest: +SKIP
        >>> attribute_target_delta(model, prompts, vectors, 0, metric=m)  # doctest: +SKIP
    """
    target = as_site(target)
    if not target.is_block_boundary:
        raise ValueError(
            f"logit_diff_metric runs the model on from the target, which must be a "
            f"resid_pre / resid_post site; got {target.name}"
        )
    start = target.next_block
    last = prompts.lengths - 1
    rows = torch.arange(len(prompts))
    mask = prompts.attention_mask.long()

    def logit_diff(z: Tensor) -> Tensor:
        logits = model(z, start_at_layer=start, attention_mask=mask)
        final = logits[rows, last]
        return (final[:, good] - final[:, bad]).sum()

    return logit_diff


def _resolve_metric(metric: Any, unsteered: Tensor, mask: Tensor) -> tuple[str, Metric]:
    if metric is None or (isinstance(metric, str) and metric == "delta_sq_norm"):
        return "delta_sq_norm", _delta_norm_metric(unsteered, mask)
    if isinstance(metric, Tensor):
        return "delta_projection", _projection_metric(metric, unsteered, mask)
    if callable(metric):
        return getattr(metric, "__name__", type(metric).__name__), cast(Metric, metric)
    raise TypeError(
        "metric must be None (Σ_t ||Δ_t||²), a [d_model] direction tensor (Δ projected on "
        f"it), or a callable metric(Z_target) -> scalar; got {metric!r}"
    )


# ---------------------------------------------------------------------- set-up
def _perturbation(
    model: Any, artifact: Any, index: int, scale: float
) -> tuple[HookSite, list[Hook]]:
    """Source site and the hooks that apply artifact[index] (vector or adapter)."""
    d_model = d_model_of(model)
    name = getattr(artifact, "model_name", None)
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be one int (one vector or adapter), got {index!r}")
    if isinstance(artifact, SteeringVectors):
        if artifact.d_model != d_model:
            raise ValueError(
                f"the vectors have d_model={artifact.d_model} but the model has "
                f"d_model={d_model}; were they trained on another model "
                f"({name or 'unknown'})?"
            )
        if not -len(artifact) <= index < len(artifact):
            raise IndexError(f"vector index {index} out of range for {len(artifact)} vectors")
        site = require_hook(model, artifact.site)
        return site, [(site.name, steering_hook(artifact.vectors[index], scale))]
    if isinstance(artifact, SteeringAdapters):
        check_adapter_host(model, artifact.layer)
        if artifact.d_model != d_model or artifact.d_mlp != int(model.cfg.d_mlp):
            raise ValueError(
                f"the adapters have d_model={artifact.d_model}, d_mlp={artifact.d_mlp} but "
                f"the model has d_model={d_model}, d_mlp={model.cfg.d_mlp}; were they "
                f"trained on another model ({name or 'unknown'})?"
            )
        if not -len(artifact) <= index < len(artifact):
            raise IndexError(f"adapter index {index} out of range for {len(artifact)}")
        a, b = artifact.omega_a[index], artifact.omega_b[index]
        return artifact.site, adapter_hooks(artifact.layer, a, b, artifact.radius * scale)
    raise TypeError(f"expected SteeringVectors or SteeringAdapters, got {type(artifact).__name__}")


def _prompts(model: Any, prompts: Any) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or len(prompts) == 0:
        raise ValueError("no prompts given; pass a PromptSet or at least one text")
    return PromptSet.from_texts(model, list(prompts))


def _check_target(model: Any, source: HookSite, target: HookSite | None) -> HookSite:
    if target is None:
        raise ValueError("no target site: the artifact records none, so pass target=HookSite(...)")
    if target.point not in STREAM_POINTS:
        raise ValueError(
            f"the target must be a residual-stream site ({', '.join(STREAM_POINTS)}), got "
            f"{target.name}; a write such as attn_out is not a sum of earlier components"
        )
    require_hook(model, target)
    check_order(source, target)
    return target


def _components(model: Any, source: HookSite, target: HookSite) -> list[tuple[int, str]]:
    """(layer, "attn" | "mlp") written strictly after the source, up to the target."""
    out = []
    hook_dict = getattr(model, "hook_dict", {})
    for layer in range(int(model.cfg.n_layers)):
        for kind, point in (("attn", "attn_out"), ("mlp", "mlp_out")):
            pos = HookSite(layer, point).position
            if not source.position < pos <= target.position:
                continue
            name = attn_z_name(layer) if kind == "attn" else HookSite(layer, point).name
            if name in hook_dict:
                out.append((layer, kind))
    return out


def _hook_of(layer: int, kind: str) -> str:
    return attn_z_name(layer) if kind == "attn" else HookSite(layer, "mlp_out").name


def _capture(store: dict[str, Tensor], key: str) -> Callable[..., Any]:
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        store[key] = act.detach()
        return act

    return hook


def _run(segment: Segment, k: int, hooks: list[Hook]) -> Tensor:
    """Target activations of k copies of the prompts under `hooks`.

    A sliced segment starts at block `segment.start`, so the hook `resid_post` of the
    block before never fires; hooks there move to `resid_pre` of block `start`, the
    same tensor (and the first hook point that runs).
    """
    if segment.layer_slicing and segment.start > 0:
        before = HookSite(segment.start - 1, "resid_post").name
        after = HookSite(segment.start, "resid_pre").name
        hooks = [(after if name == before else name, fn) for name, fn in hooks]
    return segment.run_hooked(k, hooks)


def _rep(x: Tensor, k: int) -> Tensor:
    """Repeat [n, ...] to the [k·n, ...] row layout of Segment.run_hooked."""
    return x.repeat(k, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------- decomposition
@dataclass
class _State:
    """Everything one attribution needs: the runs, caches and the metric."""

    model: Any
    prompts: PromptSet
    segment: Segment
    source: HookSite
    target: HookSite
    perturb: list[Hook]
    components: list[tuple[int, str]]
    saes: dict[str, Any]
    steered: dict[str, Tensor]
    unsteered: dict[str, Tensor]
    z_steered: Tensor
    decomposition: DeltaDecomposition
    endpoints: dict[str, tuple[list[Tensor], list[Tensor]]] = field(default_factory=dict)


def _prepare(
    model: Any,
    prompts: Any,
    artifact: Any,
    index: int,
    target: HookSite | str | int | None,
    scale: float,
    saes: dict[Any, Any] | None,
) -> _State:
    prompts = _prompts(model, prompts)
    source, perturb = _perturbation(model, artifact, index, scale)
    target = _check_target(
        model, source, as_site(target) if target is not None else getattr(artifact, "target", None)
    )
    sae_map = _check_saes(model, source, target, saes or {})
    components = _components(model, source, target)
    segment = Segment(model, source, target, prompts)
    names = [source.name, *(_hook_of(layer, kind) for layer, kind in components), *sae_map]
    steered: dict[str, Tensor] = {}
    unsteered: dict[str, Tensor] = {}
    with torch.no_grad():
        z_s = _run(segment, 1, [*perturb, *((n, _capture(steered, n)) for n in names)])[0]
        _run(segment, 1, [(n, _capture(unsteered, n)) for n in names])
    z_u = segment.unsteered
    parts = [steered[source.name] - unsteered[source.name]]
    labels = ["direct"]
    kinds = ["source"]
    for layer, kind in components:
        hook = _hook_of(layer, kind)
        d = steered[hook] - unsteered[hook]
        if kind == "attn":
            w_o = model.blocks[layer].attn.W_O.detach()  # [n_heads, d_head, d_model]
            per_head = torch.einsum("nphd,hdm->hnpm", d, w_o.to(d))
            parts.extend(per_head)
            labels.extend(f"L{layer}H{h}" for h in range(per_head.shape[0]))
            kinds.extend(["head"] * per_head.shape[0])
        else:
            parts.append(d)
            labels.append(f"L{layer}.mlp")
            kinds.append("mlp")
    comps = torch.stack(parts)
    delta = z_s - z_u
    err = float((comps.sum(0) - delta).abs().max() / delta.abs().max().clamp_min(1e-30))
    if err > 1e-3:
        raise RuntimeError(
            f"the components between {source.name} and {target.name} do not add up to Δ "
            f"(relative error {err:.2e}); this host's blocks are not pre-norm residual "
            "blocks whose attn_out = Σ_h z_h·W_O[h] + b_O (post-norm models are unsupported)"
        )
    mask = prompts.target_mask.to(delta.device)
    decomposition = DeltaDecomposition(
        labels, kinds, comps, delta, mask, source, target, err,
        prompts.attention_mask.to(delta.device),
    )  # fmt: skip
    return _State(
        model, prompts, segment, source, target, perturb, components, sae_map,
        steered, unsteered, z_s, decomposition,
    )  # fmt: skip


def _check_saes(
    model: Any, source: HookSite, target: HookSite, saes: dict[Any, Any]
) -> dict[str, Any]:
    out = {}
    d_model = d_model_of(model)
    for key, sae in saes.items():
        site = require_hook(model, as_site(key))
        if not source.position <= site.position <= target.position:
            raise ValueError(
                f"an SAE at {site.name} sees no change: it must sit between the source "
                f"{source.name} and the target {target.name}"
            )
        d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
        if d_in is not None and int(d_in) != d_model:
            raise ValueError(
                f"the SAE for {site.name} has d_in={d_in} but the model has d_model={d_model}"
                "; it was trained on another model or site"
            )
        if site.name in out:
            raise ValueError(f"two SAEs given for {site.name}")
        out[site.name] = sae
    return out


def decompose_target_delta(
    model: Any,
    prompts: PromptSet | Sequence[str],
    vectors: SteeringVectors | SteeringAdapters,
    index: int = 0,
    *,
    target: HookSite | str | int | None = None,
    scale: float = 1.0,
) -> DeltaDecomposition:
    """Exact per-token split of Δ = Z_target(steered) − Z_target(unsteered).

    Components: `direct` (the change at the source itself: the vector, or an adapter's
    output), one per attention head `L{l}H{h}` and one per MLP `L{l}.mlp` between the
    source and the target. They sum to Δ up to float rounding.

    Examples:
        >>> dec = decompose_target_delta(model, prompts, vectors, 0)
        >>> torch.allclose(dec.components.sum(0), dec.delta, atol=1e-5)
        True
    """
    return _prepare(model, prompts, vectors, index, target, scale, None).decomposition


# ---------------------------------------------------------------------- nodes and groups
@dataclass
class _Group:
    """Nodes read at one hook: the heads of a layer, an MLP, or an SAE's features + error."""

    name: str
    hook: str
    kind: str  # "attn" | "mlp" | "sae"
    sae: Any = None


def _groups(state: _State) -> list[_Group]:
    groups = [
        _Group(f"L{layer}.{kind}", _hook_of(layer, kind), kind) for layer, kind in state.components
    ]
    groups += [_Group(hook, hook, "sae", sae) for hook, sae in state.saes.items()]
    return groups


def _sae_parts(sae: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """Feature activations and error term of x: x = decode(f) + err."""
    f = sae.encode(x)
    return f, x - sae.decode(f)


def _endpoints(state: _State, g: _Group) -> tuple[list[Tensor], list[Tensor]]:
    """The group's leaves (unsteered, steered): [z] / [mlp_out] / [features, error]."""
    if g.name not in state.endpoints:
        u, s = state.unsteered[g.hook], state.steered[g.hook]
        if g.kind == "sae":
            with torch.no_grad():
                u, s = _sae_parts(g.sae, u), _sae_parts(g.sae, s)  # type: ignore[assignment]
            state.endpoints[g.name] = (list(u), list(s))
        else:
            state.endpoints[g.name] = ([u], [s])
    return state.endpoints[g.name]


def _rebuild(g: _Group, leaves: list[Tensor]) -> Tensor:
    return g.sae.decode(leaves[0]) + leaves[1] if g.kind == "sae" else leaves[0]


def _node_scores(g: _Group, products: list[Tensor]) -> list[NodeAttribution]:
    """Per-node sums of gradient × change products (each shaped like the leaf)."""
    if g.kind == "attn":
        per = products[0].sum((0, 1, 3))
        layer = int(g.name[1:].split(".")[0])
        return [
            NodeAttribution(f"L{layer}H{h}", "head", g.hook, h, float(v))
            for h, v in enumerate(per.tolist())
        ]
    if g.kind == "mlp":
        return [NodeAttribution(g.name, "mlp", g.hook, None, float(products[0].sum()))]
    feats = products[0].reshape(-1, products[0].shape[-1]).sum(0)
    out = [
        NodeAttribution(f"{g.hook}:f{i}", "feature", g.hook, i, float(v))
        for i, v in enumerate(feats.tolist())
    ]
    out.append(
        NodeAttribution(f"{g.hook}:err", "sae_error", g.hook, None, float(products[1].sum()))
    )
    return out


def _metric_over_copies(metric: Metric, z: Tensor) -> Tensor:
    return sum((metric(z[j]) for j in range(z.shape[0])), z.new_zeros(()))


def _attribution_patching(state: _State, metric: Metric) -> list[NodeAttribution]:
    """Gradient × (steered − unsteered), gradient taken in the steered run (one backward)."""
    groups = _groups(state)
    eps: dict[str, list[Tensor]] = {}

    def tap(g: _Group) -> Callable[..., Any]:
        # zero-valued leaves added to the activation: their gradient is the total-effect
        # gradient at the steered point, and the graph still flows through the hook.
        def hook(act: Tensor, hook: Any = None) -> Tensor:
            if g.kind == "sae":
                f = g.sae.encode(act)
                e_f = torch.zeros_like(f, requires_grad=True)
                e_x = torch.zeros_like(act, requires_grad=True)
                eps[g.name] = [e_f, e_x]
                return g.sae.decode(f + e_f) + (act - g.sae.decode(f)) + e_x
            e = torch.zeros_like(act, requires_grad=True)
            eps[g.name] = [e]
            return act + e

        return hook

    hooks = [*state.perturb, *((g.hook, tap(g)) for g in groups)]
    with torch.enable_grad():
        z = _run(state.segment, 1, hooks)
        value = _metric_over_copies(metric, z)
        leaves = [e for g in groups for e in eps[g.name]]
        grads = torch.autograd.grad(value, leaves, allow_unused=True) if leaves else ()
    out: list[NodeAttribution] = []
    it = iter(grads)
    for g in groups:
        u, s = _endpoints(state, g)
        prods = []
        for a_u, a_s in zip(u, s, strict=True):
            grad = next(it)
            prods.append(torch.zeros_like(a_s) if grad is None else grad * (a_s - a_u))
        out.extend(_node_scores(g, prods))
    return out


def _integrated_gradients(state: _State, metric: Metric, steps: int) -> list[NodeAttribution]:
    """Per group: mean gradient at `steps` midpoints of the straight unsteered → steered
    path of the group's leaves (everything downstream recomputed) × the change."""
    out: list[NodeAttribution] = []
    n = len(state.prompts)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    for g in _groups(state):
        u, s = _endpoints(state, g)
        leaves: list[Tensor] = []

        def interpolate(
            act: Tensor, hook: Any = None, g: _Group = g, u=u, s=s, leaves=leaves
        ) -> Tensor:
            a = alphas.to(act).repeat_interleave(n)
            for a_u, a_s in zip(u, s, strict=True):
                shape = (-1, *([1] * (a_u.ndim - 1)))
                x = _rep(a_u, steps) + a.view(shape) * _rep(a_s - a_u, steps)
                leaves.append(x.detach().requires_grad_(True))
            return _rebuild(g, leaves).to(act.dtype)

        with torch.enable_grad():
            z = _run(state.segment, steps, [*state.perturb, (g.hook, interpolate)])
            value = _metric_over_copies(metric, z)
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        prods = []
        for grad, a_u, a_s in zip(grads, u, s, strict=True):
            if grad is None:
                prods.append(torch.zeros_like(a_s))
                continue
            mean_grad = grad.view(steps, *a_s.shape).mean(0)
            prods.append(mean_grad * (a_s - a_u))
        out.extend(_node_scores(g, prods))
    return out


# ---------------------------------------------------------------------- real patching
def _patch_hook(state: _State, g: _Group, node: NodeAttribution | None) -> Callable[..., Any]:
    """Hook setting one node (or the whole group for node=None) to its unsteered value
    in the steered run."""
    u, s = _endpoints(state, g)

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        if node is None:
            leaves = list(u)
        elif g.kind == "attn":
            z = s[0].clone()
            z[:, :, node.index] = u[0][:, :, node.index]
            leaves = [z]
        elif g.kind == "mlp":
            leaves = [u[0]]
        elif node.kind == "feature":
            f = s[0].clone()
            f[..., node.index] = u[0][..., node.index]
            leaves = [f, s[1]]
        else:
            leaves = [s[0], u[1]]
        return _rebuild(g, leaves).to(act.dtype)

    return hook


def _patched_metric(state: _State, metric: Metric, hook: str, fn: Callable[..., Any]) -> float:
    with torch.no_grad():
        return float(metric(_run(state.segment, 1, [*state.perturb, (hook, fn)])[0]))


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2:
        return None
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a @ b) / denom) if denom > 0 else None


# ---------------------------------------------------------------------- entry point
def attribute_target_delta(
    model: Any,
    prompts: PromptSet | Sequence[str],
    vectors: SteeringVectors | SteeringAdapters,
    index: int = 0,
    *,
    method: str = "exact",
    metric: Metric | Tensor | None = None,
    saes: dict[HookSite | str | int, Any] | None = None,
    target: HookSite | str | int | None = None,
    steps: int = 16,
    top_n: int = 20,
    verify: bool = True,
    scale: float = 1.0,
) -> DeltaAttribution:
    """Explain the target-layer change of `vectors[index]` (a vector or an adapter).

    Always computes the exact decomposition of Δ (`.decomposition`, with the per-token
    view) and the metric at both ends; `method="exact"` (default) stops there. With
    `method="attribution_patching"` or `"integrated_gradients"` it also
    attributes the metric (None: Σ_t ||Δ_t||² over target positions; a [d_model] tensor:
    Σ_t ⟨Δ_t, unit direction⟩; or any callable metric(Z_target) -> scalar, e.g.
    `logit_diff_metric`) to heads, MLPs and the features + error of `saes`
    ({site or hook name: SAE with encode/decode}), and reports, per node group, the sum
    of estimates against the effect of patching the whole group (IG completeness). With
    `verify`, the `top_n` nodes by |estimate| are patched for real (steered run, node ←
    unsteered) and `.correlation` is the Pearson r of estimate and actual effect.

    Attribution patching is linearised at the steered point. For a metric linear in Δ
    (a direction, a logit difference near the linear regime) it matches patching for
    small vectors; for the quadratic default its error per node is ||c||², c the node's
    own share of Δ, at any vector size: prefer integrated gradients there.

    Examples:
        >>> res = attribute_target_delta(model, prompts, vectors, 0,  # doctest: +SKIP
        ...                              method="integrated_gradients", steps=32)
        >>> print(res.table(10))  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an int >= 0, got {top_n!r}")
    state = _prepare(model, prompts, vectors, index, target, scale, saes)
    mask = state.prompts.target_mask.to(state.z_steered.device)
    name, fn = _resolve_metric(metric, state.segment.unsteered, mask)
    with torch.no_grad():
        m_s = float(fn(state.z_steered))
        m_u = float(fn(state.segment.unsteered))
    result = DeltaAttribution(state.decomposition, method, name, m_s, m_u)
    if method == "exact":
        return result
    if method == "attribution_patching":
        nodes = _attribution_patching(state, fn)
        result.linearised_at = "steered"
    else:
        nodes = _integrated_gradients(state, fn, steps)
        result.steps = steps
        result.linearised_at = "path (midpoint rule)"
    for g in _groups(state):
        members = [nd for nd in nodes if nd.hook == g.hook]
        patched = _patched_metric(state, fn, g.hook, _patch_hook(state, g, None))
        total = math.fsum(nd.estimate for nd in members)
        result.groups.append(GroupCompleteness(g.name, len(members), total, m_s - patched))
    nodes.sort(key=lambda nd: abs(nd.estimate), reverse=True)
    if verify:
        by_hook = {g.hook: g for g in _groups(state)}
        for nd in nodes[:top_n]:
            g = by_hook[nd.hook]
            nd.actual = m_s - _patched_metric(state, fn, g.hook, _patch_hook(state, g, nd))
        chosen = nodes[:top_n]
        result.correlation = _pearson(
            [nd.estimate for nd in chosen], [float(nd.actual or 0.0) for nd in chosen]
        )
    result.nodes = nodes
    return result


# ---------------------------------------------------------------------- model differences
@dataclass
class FeatureChange:
    """Which SAE features at `site` explain the output difference of model B from model A.

    `scores[i]` = Σ over real tokens of ∂loss/∂f_i (in B's run) × (f_i(B) − f_i(A)):
    the first-order drop in the loss if feature i went back to its value under A.
    `grad_x_act[i]` uses f_i(B) instead of the change (importance, not change).
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

    Examples:
        >>> fc = feature_change_attribution(  # doctest: +SKIP
        ...     base, tuned, prompts, sae, HookSite(6))
        >>> fc.ranked(10)  # doctest: +SKIP
    """
    _same_architecture(model_a, model_b)
    prompts = _prompts(model_a, prompts)
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
        with model_a.hooks(fwd_hooks=[(site.name, _capture(store, site.name))]):
            logits_a = model_a(tokens, attention_mask=attn.long())
        f_a, e_a = _sae_parts(sae, store[site.name])
    leaves: list[Tensor] = []

    def split(act: Tensor, hook: Any = None) -> Tensor:
        with torch.no_grad():
            f, e = _sae_parts(sae, act)
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
