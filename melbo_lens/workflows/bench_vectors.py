"""Benchmark (f) and (g): the default search against the configurations it replaced.

(f) Time to N orthogonal vectors with the default config (a window of starts, the
power step, slots that end once their best candidate stops improving), against the
same window with fixed steps per slot (`slot_tol=0`, the default before the
convergence stop), one start per vector with the default's solver and steps, and the
previous default (one AMSGrad start per vector, 300 steps; `PREVIOUS_DEFAULT`).
Objectives are compared rank by rank (each run's objectives sorted): slot-by-slot
ratios mislead when one run finds two directions in the other order. With
`--noise-seed S` the fixed-step window also runs from seed S, and the same rank-by-rank
ratios between its two seeds give the spread that a change of seed alone causes (the
scale against which the default's ratios are read).
Diversity is the mean |cos| between the vectors' target deltas (lower: more diverse).

(g) Vector 0 on a model with a planted direction behind a threshold, per seed.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors

__all__ = [
    "FIXED_WINDOW",
    "PREVIOUS_DEFAULT",
    "delta_similarity",
    "planted_vector_0",
    "rank_ratios",
    "time_to_vectors",
]

PREVIOUS_DEFAULT: dict[str, Any] = dict(starts_per_vector=1, solver="amsgrad", steps=300)
FIXED_WINDOW: dict[str, Any] = dict(slot_tol=0)  # every slot runs all its steps


def delta_similarity(segment: Segment, vectors: Float[Tensor, "n d_model"]) -> float:
    """Mean |cos| between the target deltas of different vectors (masked, flattened)."""
    with torch.no_grad():
        z = segment.run(vectors)
        mask = segment.prompts.target_mask[None, :, :, None]
        deltas = ((z - segment.unsteered) * mask).flatten(1)
        unit = torch.nn.functional.normalize(deltas, dim=-1)
        gram = (unit @ unit.T).abs()
        k = gram.shape[0]
        return float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))) if k > 1 else 0.0


def rank_ratios(new: Float[Tensor, " n"], old: Float[Tensor, " m"]) -> list[float]:
    """Ratios of the two runs' objectives, each sorted from the largest.

    Examples:
        >>> rank_ratios(torch.tensor([1.0, 4.0]), torch.tensor([4.0, 2.0]))
        [1.0, 0.5]
    """
    a = torch.sort(new.double(), descending=True).values
    b = torch.sort(old.double(), descending=True).values
    m = min(len(a), len(b))
    return (a[:m] / b[:m]).tolist()


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    return f"min {ordered[0]:.3g}, median {ordered[len(ordered) // 2]:.3g}"


def time_to_vectors(
    model: Host,
    prompts: PromptSet,
    base: dict[str, Any],
    args: argparse.Namespace,
    naive_ms: float | None,
    segment: Segment,
) -> dict[str, Any]:
    """(f): see the module docstring. The previous default runs its first
    `args.reference_slots` slots; each costs the same 300 one-vector steps, so its time
    for all slots is that per-slot time times the slots (printed as such)."""
    n, m = args.slots, min(args.reference_slots or args.slots, args.slots)
    new_kw: dict[str, Any] = dict(steps=3, slot_steps=2) if args.quick else {}
    previous = dict(PREVIOUS_DEFAULT, steps=args.naive_steps if args.quick else 300)

    def run(count: int, **kw: Any) -> Any:
        config = MelboConfig(**base, n_vectors=count, **kw)
        return train_steering_vectors(model, prompts, config, progress=False)

    new = run(n, **new_kw)
    fixed = run(n, **new_kw, **FIXED_WINDOW)
    old = run(m, **previous)
    # the default's solver and steps with one start per vector: where the speed comes from
    lone_kw = dict(starts_per_vector=1, solver=new.metadata["solver"], steps=new.metadata["steps"])
    lone = run(n, **lone_kw)
    seconds = {
        "default": float(new.metadata["train_seconds"]),
        "fixed": float(fixed.metadata["train_seconds"]),
        "one_start": float(lone.metadata["train_seconds"]),
        "previous": float(old.metadata["train_seconds"]) * n / m,
    }
    objectives = {
        "default": new.record("objective"),
        "fixed": fixed.record("objective"),
        "one_start": lone.record("objective"),
        "previous": old.record("objective"),
    }
    steps_run = {
        "default": int(new.record("steps_done").sum()),
        "fixed": int(fixed.record("steps_done").sum()),
    }
    vs_fixed = rank_ratios(objectives["default"], objectives["fixed"])
    noise_seed = getattr(args, "noise_seed", None)
    seed_spread = None
    if noise_seed is not None:
        other = run(n, **new_kw, **FIXED_WINDOW, seed=noise_seed)
        seed_spread = rank_ratios(other.record("objective"), objectives["fixed"])
    vs_previous = rank_ratios(objectives["default"][:m], objectives["previous"])
    diversity = {
        "default": delta_similarity(segment, new.vectors),
        "fixed": delta_similarity(segment, fixed.vectors),
        "default_first": delta_similarity(segment, new.vectors[:m]),
        "previous_first": delta_similarity(segment, old.vectors),
    }
    meta = new.metadata
    label = (
        f"{meta['starts']} starts, {meta['solver']}, at most {meta['steps']}+"
        f"{meta['slot_steps']} steps, slot_tol {meta['slot_tol']:g}"
    )
    extrapolated = "" if m == n else f" ({m} slots run, x{n / m:g})"
    naive_s = None if naive_ms is None else naive_ms / 1e3 * previous["steps"] * n
    naive_line = (
        ""
        if naive_s is None
        else f"    naive reference, {previous['steps']} steps each    {naive_s:9.1f} s   "
        f"(per-step time of (a) x {previous['steps'] * n} vector-steps)\n"
    )
    s = seconds
    print(
        f"\n(f) time to {n} orthogonal vectors:\n{naive_line}"
        f"    previous default, 1 start, AMSGrad  {s['previous']:9.1f} s{extrapolated}\n"
        f"    1 start, {lone_kw['solver']}, {lone_kw['steps']} steps each     "
        f"{s['one_start']:9.1f} s   objective sum {float(objectives['one_start'].sum()):.4g}\n"
        f"    window, fixed steps (slot_tol 0)    {s['fixed']:9.1f} s   {steps_run['fixed']} "
        f"steps; objective sum {float(objectives['fixed'].sum()):.4g}\n"
        f"    default: {label}\n"
        f"{'':40}{s['default']:9.1f} s   {steps_run['default']} steps; objective sum "
        f"{float(objectives['default'].sum()):.4g}\n"
        f"    speed-up of the default: {s['fixed'] / s['default']:.2f}x vs fixed steps, "
        f"{s['previous'] / s['default']:.1f}x vs the previous default"
        + ("" if naive_s is None else f", {naive_s / s['default']:.1f}x vs naive")
        + "\n"
        f"    objectives rank by rank, default / fixed steps: {_summary(vs_fixed)}\n"
        f"      [{', '.join(f'{r:.3g}' for r in vs_fixed)}]\n"
        + (
            ""
            if seed_spread is None
            else f"    the same, fixed steps seed {noise_seed} / seed {base.get('seed', 0)} (what "
            f"a change of seed alone does): {_summary(seed_spread)}\n"
            f"      [{', '.join(f'{r:.3g}' for r in seed_spread)}]\n"
        )
        + f"    rank by rank, default / previous default (first {m}): {_summary(vs_previous)}\n"
        f"    diversity (mean |cos| of target deltas, lower is more diverse), all {n}: "
        f"default {diversity['default']:.3f}, fixed steps {diversity['fixed']:.3f}; first "
        f"{m}: default {diversity['default_first']:.3f}, previous {diversity['previous_first']:.3f}"
        f"; starts used {meta.get('starts_used', 1)} (fixed: {fixed.metadata.get('starts_used')})"
    )
    return {
        "slots": n,
        "reference_slots": m,
        "default": {"config": new.config, "metadata_steps": meta["steps"], "seconds": s["default"]},
        "seconds": seconds,
        "steps_run": steps_run,
        "objectives": {k: v.tolist() for k, v in objectives.items()},
        "rank_ratio_vs_fixed": vs_fixed,
        "rank_ratio_vs_previous": vs_previous,
        "noise_seed": noise_seed,
        "rank_ratio_fixed_other_seed": seed_spread,
        "speedup_vs_fixed": s["fixed"] / s["default"],
        "speedup_vs_previous_default": s["previous"] / s["default"],
        "naive_seconds": naive_s,
        "speedup_vs_naive": None if naive_s is None else naive_s / s["default"],
        "delta_abs_cos": diversity,
        "starts_used": meta.get("starts_used"),
        "starts_used_fixed": fixed.metadata.get("starts_used"),
    }


def planted_vector_0(seeds: Any = range(5), radius: float = 2.0) -> dict[str, Any]:
    """(g): vector 0's objective as a fraction of the planted optimum (the better of
    ±R·u) on `planted_direction_model(threshold=4)`, per seed: the default config vs the
    previous default (one AMSGrad start, 300 steps)."""
    from melbo_lens.analysis.deltas import perturbation_objectives
    from melbo_lens.core.sites import HookSite
    from melbo_lens.models.planted import planted_direction_model
    from melbo_lens.perturbations.vectors import SteeringVectors

    model, planted = planted_direction_model((12.0,), d_model=64, threshold=4.0)
    prompts = PromptSet.from_tokens(model, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]])
    source, target = HookSite(0), HookSite(2)
    ends = SteeringVectors(torch.stack([radius * planted[0], -radius * planted[0]]), source)
    optimum = float(perturbation_objectives(model, ends, prompts, target).max())
    fractions: dict[str, list[float]] = {"default": [], "previous default": []}
    for seed in seeds:
        for name, kw in (("default", {}), ("previous default", PREVIOUS_DEFAULT)):
            config = MelboConfig(source, target, n_vectors=1, radius=radius, seed=seed, **kw)
            sv = train_steering_vectors(model, prompts, config, progress=False)
            fractions[name].append(float(sv.record("objective")[0]) / optimum)
    n = len(fractions["default"])
    print(f"\n(g) vector 0 on a planted direction behind a threshold ({n} seeds):")
    for name, values in fractions.items():
        hits = sum(v >= 0.98 for v in values)
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"    {name:<17} >= 98% of the planted optimum from {hits} of {n} seeds [{listed}]")
    return {"optimum": optimum, "fractions": fractions}
