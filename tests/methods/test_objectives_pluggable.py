"""Pluggable objectives: the consistency term against an independent computation and
planted truth, and every family x objective x solver x orthogonality combination either
training (resumed bit-exactly) or refused with a clear error."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import interrupted_then_resumed

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


# ---------------------------------------------------------------------- logprob
ANSWER_TOKENS = [7, 7, 3]


def _continued(model):
    rows = [row + ANSWER_TOKENS for row in TOKENS]
    positions = [list(range(len(row) - 1, len(row) + len(ANSWER_TOKENS) - 1)) for row in TOKENS]
    return PromptSet.from_tokens(model, rows, target_positions=positions)


def _answer_logprob(model, prompts, vector, site):
    """Σ log p(answer tokens) from the full model's logits (independent of the segment)."""
    from melbo_lens import steer

    total = torch.zeros(())
    for row, positions in zip(prompts.token_lists(), prompts.target_lists(), strict=True):
        tokens = torch.tensor([row])
        with torch.no_grad(), steer(model, site, vector):
            logp = torch.log_softmax(model(tokens)[0].float(), -1)
        total += sum(logp[t, row[t + 1]] for t in positions)
    return float(total)


def test_logprob_objective_is_the_full_models_log_probability(tiny_model):
    prompts = _continued(tiny_model)
    last = HookSite(tiny_model.cfg.n_layers - 1, "resid_post")
    segment = Segment(tiny_model, HookSite(0), last, prompts)
    from melbo_lens.methods.training.objective import LogProb

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = LogProb()(segment, segment.run(vectors))
    for j in range(2):
        # tol: a sum of 9 log-probabilities of size ~4, float32 through two code paths
        assert float(ours[j]) == pytest.approx(
            _answer_logprob(tiny_model, prompts, vectors[j], HookSite(0)), rel=1e-5
        )


def test_training_for_logprob_makes_the_answer_likely_and_melbo_does_not(tiny_model):
    prompts = _continued(tiny_model)
    site = HookSite(0)
    found = {}
    for objective in ("logprob", "melbo"):
        target = None if objective == "logprob" else HookSite(2)
        cfg = MelboConfig(site, target, n_vectors=1, radius=4.0, objective=objective)
        found[objective] = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    trained = found["logprob"]
    assert trained.target == HookSite(3, "resid_post")  # chosen for the objective
    base = _answer_logprob(tiny_model, prompts, torch.zeros(32), site)
    reached = _answer_logprob(tiny_model, prompts, trained.vectors[0], site)
    melbo = _answer_logprob(tiny_model, prompts, found["melbo"].vectors[0], site)
    assert reached == pytest.approx(float(trained.record("objective")[0]), rel=1e-5)
    assert reached > base + 3.0 and reached > melbo + 3.0, (reached, base, melbo)


def test_neg_logprob_makes_the_answer_unlikely(tiny_model):
    prompts = _continued(tiny_model)
    site = HookSite(0)
    cfg = MelboConfig(site, None, n_vectors=1, radius=4.0, objective="neg-logprob")
    trained = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    base = _answer_logprob(tiny_model, prompts, torch.zeros(32), site)
    suppressed = _answer_logprob(tiny_model, prompts, trained.vectors[0], site)
    # the objective is minus the log-probability, measured by an independent forward pass
    assert -suppressed == pytest.approx(float(trained.record("objective")[0]), rel=1e-5)
    assert suppressed < base - 3.0, (suppressed, base)


def test_what_the_logprob_objective_refuses(tiny_model):
    prompts = _continued(tiny_model)
    cfg = MelboConfig(HookSite(0), HookSite(2), n_vectors=1, radius=2.0, objective="logprob")
    with pytest.raises(ValueError, match="target must be blocks.3.hook_resid_post, got blocks.2"):
        train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    bare = PromptSet.from_tokens(tiny_model, TOKENS, target_positions=slice(None))
    cfg = MelboConfig(HookSite(0), HookSite(3), n_vectors=1, radius=2.0, objective="logprob")
    with pytest.raises(ValueError, match="is its last token; build the prompts with"):
        train_steering_vectors(tiny_model, bare, cfg, progress=False)


def test_with_continuations_marks_the_positions_that_predict_the_answer(tiny_tok_model):
    ps = PromptSet.with_continuations(tiny_tok_model, ["ab", "cde"], "xy", chat=False)
    for row, positions in zip(ps.token_lists(), ps.target_lists(), strict=True):
        answer = row[positions[0] + 1 :]
        assert tiny_tok_model.tokenizer.decode(answer) == "xy"
        assert positions == list(range(len(row) - 3, len(row) - 1))
    with pytest.raises(ValueError, match="got 3 for 2 prompts"):
        PromptSet.with_continuations(tiny_tok_model, ["ab", "cde"], ["x", "y", "z"], chat=False)


@pytest.mark.parametrize(
    "family,solver,orthogonal",
    list(
        itertools.product(
            FAMILIES, ("amsgrad", "power"), ("sequential", "simultaneous", "soft", "none")
        )
    ),
)
@pytest.mark.parametrize("objective", ["logprob", "neg-logprob"])
def test_logprob_trains_and_resumes_in_every_combination(
    tiny_model, tmp_path, family, solver, orthogonal, objective
):
    train = FAMILIES[family][0]
    last = HookSite(3, "resid_post")
    common = dict(radius=2.0, steps=4, objective=objective, solver=solver, orthogonal=orthogonal)
    if family == "vectors":
        config = MelboConfig(HookSite(0), last, n_vectors=2, slot_tol=0, **common)
    else:
        config = AdapterConfig(1, last, n_adapters=2, rank=1, **common)
    prompts = _continued(tiny_model)
    whole = train(tiny_model, prompts, config, progress=False)
    _, resumed = interrupted_then_resumed(train, tiny_model, prompts, config, tmp_path)
    for name in ("vectors",) if family == "vectors" else ("omega_a", "omega_b"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    sign = 1 if objective == "logprob" else -1  # sums of log-probabilities, or minus them
    assert (sign * whole.record("objective") < 0).all()
