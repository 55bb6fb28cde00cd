"""The exact split of a perturbation member’s target delta into the source change, every
attention head and every MLP in between (additive residual stream: no approximation),
and the set-up the estimators share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from melbo_lens.analysis.attribution.results import DeltaDecomposition, Hook
from melbo_lens.core.host import Host, d_model_of
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
from melbo_lens.perturbations.base import Perturbation
from melbo_lens.perturbations.trained import Trained

__all__ = ["decompose_target_delta"]


# ---------------------------------------------------------------------- set-up
def _perturbation(
    model: Host, artifact: Perturbation, index: int, scale: float
) -> tuple[HookSite, list[Hook]]:
    """Source site and the hooks that apply member `index` of any perturbation."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be one int (one vector or adapter), got {index!r}")
    if not isinstance(artifact, Perturbation):
        raise TypeError(
            f"expected a perturbation (SteeringVectors, SteeringAdapters, ...), got "
            f"{type(artifact).__name__}"
        )
    if -len(artifact) <= index < 0:
        index += len(artifact)  # Python semantics for negative indices
    d_model = d_model_of(model)
    width = getattr(artifact, "d_model", d_model)
    if width != d_model:
        name = getattr(artifact, "model_name", None)
        raise ValueError(
            f"the perturbation has d_model={width} but the model has d_model={d_model}; "
            f"was it made for another model ({name or 'unknown'})?"
        )
    site = require_hook(model, artifact.site)
    return site, artifact.hooks(model, index, scale)


def _check_target(model: Host, source: HookSite, target: HookSite | None) -> HookSite:
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


def _components(model: Host, source: HookSite, target: HookSite) -> list[tuple[int, str]]:
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


def component_hook(layer: int, kind: str) -> str:
    return attn_z_name(layer) if kind == "attn" else HookSite(layer, "mlp_out").name


def capture_hook(store: dict[str, Tensor], key: str) -> Callable[..., Any]:
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        store[key] = act.detach()
        return act

    return hook


def run_copies(segment: Segment, k: int, hooks: list[Hook]) -> Tensor:
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


def repeat_rows(x: Tensor, k: int) -> Tensor:
    """Repeat [n, ...] to the [k·n, ...] row layout of Segment.run_hooked."""
    return x.repeat(k, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------- decomposition
@dataclass
class AttributionState:
    """Everything one attribution needs: the runs, caches and the metric."""

    model: Host
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


def prepare_attribution(
    model: Host,
    prompts: Any,
    artifact: Any,
    index: int,
    target: HookSite | str | int | None,
    scale: float,
    saes: dict[Any, Any] | None,
) -> AttributionState:
    prompts = PromptSet.coerce(model, prompts)
    source, perturb = _perturbation(model, artifact, index, scale)
    target = _check_target(
        model, source, as_site(target) if target is not None else getattr(artifact, "target", None)
    )
    sae_map = _check_saes(model, source, target, saes or {})
    components = _components(model, source, target)
    segment = Segment(model, source, target, prompts)
    names = [source.name, *(component_hook(layer, kind) for layer, kind in components), *sae_map]
    steered: dict[str, Tensor] = {}
    unsteered: dict[str, Tensor] = {}
    with torch.no_grad():
        z_s = run_copies(segment, 1, [*perturb, *((n, capture_hook(steered, n)) for n in names)])[0]
        run_copies(segment, 1, [(n, capture_hook(unsteered, n)) for n in names])
    z_u = segment.unsteered

    def diff(a: Tensor, b: Tensor) -> Tensor:  # in fp32: low-precision activations upcast
        return a.float() - b.float()

    parts = [diff(steered[source.name], unsteered[source.name])]
    labels = ["direct"]
    kinds = ["source"]
    for layer, kind in components:
        hook = component_hook(layer, kind)
        d = diff(steered[hook], unsteered[hook])
        if kind == "attn":
            hooked: Any = model  # the blocks' weights (a TransformerBridge forwards them)
            w_o = hooked.blocks[layer].attn.W_O.detach()  # [n_heads, d_head, d_model]
            per_head = torch.einsum("nphd,hdm->hnpm", d, w_o.to(d))
            parts.extend(per_head)
            labels.extend(f"L{layer}H{h}" for h in range(per_head.shape[0]))
            kinds.extend(["head"] * per_head.shape[0])
        else:
            parts.append(d)
            labels.append(f"L{layer}.mlp")
            kinds.append("mlp")
    comps = torch.stack(parts)
    delta = diff(z_s, z_u)
    delta_scale = delta.abs().max().clamp_min(1e-30)
    err = float((comps.sum(0) - delta).abs().max() / delta_scale)
    allowed = rounding_bound(z_s, z_u, segment.n_blocks, delta_scale)
    if err > allowed:
        precision = (
            f"; more than {z_s.dtype} rounding explains (up to {allowed:.2e} here)"
            if allowed > _EXACT_TOL
            else ""
        )
        raise RuntimeError(
            f"the components between {source.name} and {target.name} do not add up to Δ "
            f"(relative error {err:.2e}{precision}); this host's blocks are not pre-norm "
            "residual blocks whose attn_out = Σ_h z_h·W_O[h] + b_O (post-norm models are "
            "unsupported)"
        )
    mask = prompts.target_mask.to(delta.device)
    decomposition = DeltaDecomposition(
        labels, kinds, comps, delta, mask, source, target, err,
        prompts.attention_mask.to(delta.device),
    )  # fmt: skip
    return AttributionState(
        model, prompts, segment, source, target, perturb, components, sae_map,
        steered, unsteered, z_s, decomposition,
    )  # fmt: skip


_EXACT_TOL = 1e-3  # relative mismatch allowed in fp32


def rounding_bound(z_s: Tensor, z_u: Tensor, n_blocks: int, delta_scale: Tensor) -> float:
    """The relative mismatch rounding alone can cause: each of the ~2 residual additions
    per block rounds the stream to the model's dtype (half an ulp of |z|), and Δ is the
    difference of two such streams; for a low-precision model that is far above fp32's
    `_EXACT_TOL` whenever |Δ| is small against |z|."""
    eps = torch.finfo(z_s.dtype).eps if z_s.dtype.is_floating_point else 0.0
    magnitude = torch.maximum(z_s.abs().max(), z_u.abs().max()).float()
    bound = float(eps * (2 * n_blocks + 1) * magnitude / delta_scale)
    return max(_EXACT_TOL, bound)


def _check_saes(
    model: Host, source: HookSite, target: HookSite, saes: dict[Any, Any]
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
    model: Host,
    prompts: PromptSet | Sequence[str],
    vectors: Trained,
    index: int = 0,
    *,
    target: HookSite | str | int | None = None,
    scale: float = 1.0,
) -> DeltaDecomposition:
    """Exact per-token split of Δ = Z_target(steered) − Z_target(unsteered).

    Components: `direct` (the change at the source itself: the vector, or an adapter's
    output), one per attention head `L{l}H{h}` and one per MLP `L{l}.mlp` between the
    source and the target. They sum to Δ up to float rounding.

    Args:
        model: the model the perturbation acts on.
        prompts: the prompts (a `PromptSet` or texts).
        vectors: a trained artifact (vectors, adapters or soft prompts).
        index: which member.
        target: where Δ is read (default: the artifact's target).
        scale: multiplies the member's edit.

    Returns:
        `DeltaDecomposition`: the components [c, n, pos, d], their names, and Δ.

    Examples:
        >>> dec = decompose_target_delta(model, prompts, vectors, 0)
        >>> torch.allclose(dec.components.sum(0), dec.delta, atol=1e-5)
        True
    """
    return prepare_attribution(model, prompts, vectors, index, target, scale, None).decomposition
