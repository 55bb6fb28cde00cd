"""Pluggable objectives: the consistency term against an independent computation and
planted truth, and every family x objective x solver x orthogonality combination either
training (resumed bit-exactly) or refused with a clear error."""

from __future__ import annotations

import itertools

import pytest
import torch

from melbo_lens import HookSite, MelboConfig, PromptSet, train_steering_vectors
from melbo_lens.core.segment import Segment
from melbo_lens.methods.adapters import AdapterConfig, train_steering_adapters
from melbo_lens.methods.objectives import consistency_per_member

TOKENS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]


def _by_loops(steered, unsteered, mask):
    """The same quantity with Python loops and math on plain floats (independent)."""
    k, n = steered.shape[:2]
    out = []
    for j in range(k):
        means = []
        for i in range(n):
            rows = [
                steered[j, i, t] - unsteered[j, i, t]
                for t in range(mask.shape[-1])
                if mask[j, i, t]
            ]
            means.append(torch.stack(rows).double().mean(0))
        total = 0.0
        for a in range(n):
            for b in range(n):
                if a != b:
                    total += float(means[a] @ means[b] / (means[a].norm() * means[b].norm()))
        out.append(total / (n * (n - 1)))
    return torch.tensor(out, dtype=torch.float64)


def test_consistency_matches_a_loop_computation(rng):
    steered = torch.randn(3, 4, 5, 6, generator=rng)
    unsteered = torch.randn(3, 4, 5, 6, generator=rng)
    mask = torch.rand(3, 4, 5, generator=rng) > 0.4
    mask[..., 0] = True  # every prompt keeps a position
    ours = consistency_per_member(steered, unsteered, mask).double()
    # tol: values in [-1, 1], float32 means and norms against float64 loops
    torch.testing.assert_close(ours, _by_loops(steered, unsteered, mask), rtol=0, atol=1e-5)


def test_consistency_prefers_one_effect_everywhere_over_a_strong_effect_on_one_prompt():
    """Planted: direction A moves every prompt's target the same way by 1; direction B
    moves prompt 0 by 10 and the others the opposite way by 0.5. MELBO's objective
    prefers B, the consistency objective A."""
    from melbo_lens.methods.objectives import melbo_objective_per_prompt

    n, pos, d = 4, 3, 5
    unsteered = torch.zeros(n, pos, d)
    mask = torch.ones(n, pos, dtype=torch.bool)
    e = torch.eye(d)[0]
    a = unsteered + e
    b = unsteered - 0.5 * e
    b[0] = 10.0 * e
    melbo = [float(melbo_objective_per_prompt(x, unsteered, mask).sum()) for x in (a, b)]
    consistent = [float(consistency_per_member(x, unsteered, mask)) for x in (a, b)]
    assert melbo[1] > melbo[0]
    assert consistent[0] == pytest.approx(1.0) and consistent[1] == pytest.approx(0.0, abs=1e-6)


def test_training_for_consistency_finds_more_consistent_vectors(tiny_model):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    runs = {}
    for objective in ("melbo", "consistency"):
        cfg = MelboConfig(HookSite(0), HookSite(3), n_vectors=3, radius=3.0, objective=objective)
        runs[objective] = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    segment = Segment(tiny_model, HookSite(0), HookSite(3), prompts)

    def scores(vectors):
        with torch.no_grad():
            z = segment.run(vectors)
        mask = prompts.target_mask.expand(z.shape[:-1])
        return consistency_per_member(z, segment.unsteered.expand_as(z), mask)

    trained = runs["consistency"]
    # the recorded objective is the consistency of the vector, recomputed here
    # tol: cosines in [-1, 1], recomputed in the same dtype and rows
    torch.testing.assert_close(
        scores(trained.vectors), trained.record("objective"), rtol=0, atol=1e-5
    )
    assert float(scores(trained.vectors)[0]) > float(scores(runs["melbo"].vectors)[0])
    assert trained.metadata["objective"] == "consistency"


FAMILIES = {
    "vectors": (
        train_steering_vectors,
        lambda **kw: MelboConfig(HookSite(0), HookSite(2), n_vectors=2, radius=2.0, steps=4, **kw),
    ),
    "adapters": (
        train_steering_adapters,
        lambda **kw: AdapterConfig(1, HookSite(3), n_adapters=2, rank=1, radius=2.0, steps=4, **kw),
    ),
}
COMBOS = list(
    itertools.product(
        FAMILIES,
        ("melbo", "consistency", "melbo+consistency"),
        ("amsgrad", "power"),
        ("sequential", "simultaneous", "soft", "none"),
    )
)


@pytest.mark.parametrize("family,objective,solver,orthogonal", COMBOS)
def test_every_combination_trains_and_resumes_bit_exactly(
    tiny_model, tmp_path, family, objective, solver, orthogonal
):
    train, make = FAMILIES[family]
    window = dict(slot_tol=0) if family == "vectors" else {}
    config = make(objective=objective, solver=solver, orthogonal=orthogonal, **window)
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    whole = train(tiny_model, prompts, config, progress=False)
    assert whole.complete and torch.isfinite(whole.record("objective")).all()
    calls = []

    def stop(state):
        calls.append(1)
        return len(calls) < 3

    path = tmp_path / "run.safetensors"
    part = train(tiny_model, prompts, config, progress=False, callback=stop, checkpoint=path)
    assert part.metadata["interrupted"]
    resumed = train(tiny_model, prompts, config, progress=False, resume=str(path))
    for name in ("vectors",) if family == "vectors" else ("omega_a", "omega_b"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    assert torch.equal(resumed.record("objective"), whole.record("objective"))


def test_what_the_consistency_objective_refuses(tiny_model):
    one = PromptSet.from_tokens(tiny_model, TOKENS[:1])
    cfg = MelboConfig(HookSite(0), HookSite(2), n_vectors=1, radius=2.0, objective="consistency")
    with pytest.raises(ValueError, match="needs at least 2 prompts, got 1"):
        train_steering_vectors(tiny_model, one, cfg, progress=False)
    three = PromptSet.from_tokens(tiny_model, TOKENS)
    with pytest.raises(
        ValueError, match="cannot be split into passes; use a max_rows_per_pass of at least 3"
    ):
        train_steering_vectors(tiny_model, three, cfg, progress=False, max_rows_per_pass=2)
    with pytest.raises(ValueError, match="objective must be one of"):
        MelboConfig(objective="reach")
    with pytest.raises(ValueError, match="consistency_weight must be a finite number > 0"):
        MelboConfig(objective="melbo+consistency", consistency_weight=-1.0)
