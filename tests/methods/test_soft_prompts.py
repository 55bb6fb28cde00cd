"""Soft prompts: the training path against the artifact's hook, a soft token equal to a
real token's embedding against that token in the text (right-padded batches and
left-padded KV-cached generation), a planted trigger recovered by a 1-token soft prompt,
every solver x orthogonality mode trained and resumed bit-exactly, and the refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import interrupted_then_resumed

from melbo_lens import generate
from melbo_lens.core.segment import Segment
from melbo_lens.methods.soft_prompts import (
    SoftPromptConfig,
    SoftPromptFamily,
    _resolved,
    soft_prompt_set,
    train_soft_prompts,
)
from melbo_lens.methods.training.objective import OBJECTIVES, LogProb, reads_logits
from melbo_lens.perturbations.artifact import load_artifact
from melbo_lens.perturbations.soft_prompts import SoftPrompts

TEXTS = ["hello there", "a cat sat", "good day", "one two", "my dog", "the sun", "big red"]


def _token(model, char: str) -> int:
    return model.tokenizer.encode(char, add_special_tokens=False)[0]


def test_training_path_equals_the_artifacts_hook(tiny_tok_model):
    model = tiny_tok_model
    ps = soft_prompt_set(model, TEXTS[:3], 2, chat=False)
    cfg = _resolved(model, SoftPromptConfig(n_prompts=2, n_tokens=2))
    family = SoftPromptFamily(cfg, model, ps)
    segment = Segment(model, cfg.source, cfg.target, ps)
    emb = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        ours = family.target(segment, {"embeddings": emb})
    sp = SoftPrompts(emb, placeholder=cfg.placeholder)
    for k in range(2):
        with torch.no_grad(), sp.apply(model, k):
            _, cache = model.run_with_cache(ps.tokens, attention_mask=ps.attention_mask)
        want = cache[cfg.target.name]
        mask = ps.attention_mask.bool()
        # tol: float32, the same blocks run from a cached prefix or from the tokens
        torch.testing.assert_close(ours[k][mask], want[mask], rtol=1e-5, atol=1e-5)


def test_a_soft_token_equal_to_a_tokens_embedding_is_that_token(tiny_tok_model):
    """Right-padded batches and left-padded KV-cached generation alike."""
    model = tiny_tok_model
    t = _token(model, "q")
    sp = SoftPrompts(model.W_E[[t]][None].detach().clone(), placeholder=0)
    texts = ["hi", "a longer prompt"]
    soft = generate(model, sp, texts, max_new_tokens=6, include_unsteered=False)
    real = generate(model, None, ["q" + x for x in texts], max_new_tokens=6)
    assert soft.steered[0] == real.unsteered
    ps = sp.prepare(model, texts, chat=False)
    with torch.no_grad(), sp.apply(model, 0):
        logits = model(ps.tokens, attention_mask=ps.attention_mask)
    swapped = torch.where(ps.tokens == 0, torch.full_like(ps.tokens, t), ps.tokens)
    with torch.no_grad():
        want = model(swapped, attention_mask=ps.attention_mask)
    mask = ps.attention_mask.bool()
    # tol: e_pl + 1·(e − e_pl) rounds to e within float32 ulps; logits are of size ~1
    torch.testing.assert_close(logits[mask], want[mask], rtol=1e-5, atol=1e-5)
    half = generate(model, sp, texts, max_new_tokens=6, scale=0.0, include_unsteered=True)
    assert half.steered[0] == half.unsteered  # scale 0: the placeholder itself


@pytest.mark.parametrize("trigger", ["q", "x"])
def test_a_one_token_soft_prompt_recovers_a_planted_trigger(tiny_tok_model, trigger):
    """The answers are what the model says after the trigger token; a 1-token soft
    prompt trained for their log-probability from random starts reaches at least the
    trigger's own log-probability, and its nearest vocabulary token is the trigger."""
    model = tiny_tok_model
    t = _token(model, trigger)
    planted = SoftPrompts(model.W_E[[t]][None].detach().clone(), placeholder=0)
    answers = generate(model, planted, TEXTS, max_new_tokens=8, include_unsteered=False)
    kept = [(p, a) for p, a in zip(TEXTS, answers.steered[0], strict=True) if a]
    ps = soft_prompt_set(
        model, [p for p, _ in kept], 1, continuations=[a for _, a in kept], chat=False
    )
    radius = float(model.W_E[t].norm())
    cfg = SoftPromptConfig(n_prompts=3, objective="logprob", radius=radius)
    found = train_soft_prompts(model, ps, cfg, progress=False)
    resolved = _resolved(model, cfg)
    segment = Segment(model, resolved.source, resolved.target, ps)
    family = SoftPromptFamily(resolved, model, ps)
    with torch.no_grad():
        z = family.target(segment, {"embeddings": planted.embeddings})
        at_trigger = float(LogProb()(segment, z)[0])
    assert (found.objective >= at_trigger).all(), (found.objective, at_trigger)
    readout = found.nearest_tokens(model, k=1)
    assert [member[0][0][0] for member in readout] == [trigger] * 3


@pytest.mark.parametrize(
    "solver,orthogonal",
    list(itertools.product(("amsgrad", "power"), ("sequential", "simultaneous", "soft", "none"))),
)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_soft_prompts_train_and_resume_exactly(
    tiny_tok_model, tmp_path, solver, orthogonal, objective
):
    model = tiny_tok_model
    answers = "ok" if reads_logits(objective) else None
    ps = soft_prompt_set(model, TEXTS[:3], 2, continuations=answers, chat=False)
    cfg = SoftPromptConfig(
        n_prompts=2,
        n_tokens=2,
        steps=4,
        solver=solver,
        orthogonal=orthogonal,
        objective=objective,
        radius=2.0,
    )
    whole = train_soft_prompts(model, ps, cfg, progress=False)
    # tol: float32 renormalisation of rows of norm 2
    torch.testing.assert_close(
        whole.embeddings.norm(dim=-1), torch.full((2, 2), 2.0), rtol=1e-5, atol=0
    )
    if orthogonal in ("sequential", "simultaneous"):
        cross = whole.embeddings[0] @ whole.embeddings[1].T / 4.0
        # tol: float32 Gram–Schmidt; cosines are at most 1
        torch.testing.assert_close(cross, torch.zeros(2, 2), atol=1e-5, rtol=0)
    part, resumed = interrupted_then_resumed(train_soft_prompts, model, ps, cfg, tmp_path)
    assert not part.complete
    assert torch.equal(resumed.embeddings, whole.embeddings) and resumed.complete
    loaded = load_artifact(whole.save(tmp_path / "done.safetensors"))
    assert isinstance(loaded, SoftPrompts) and torch.equal(loaded.embeddings, whole.embeddings)
    assert loaded.placeholder == whole.placeholder == 0


def test_what_soft_prompts_refuse(tiny_tok_model):
    model = tiny_tok_model
    one = soft_prompt_set(model, TEXTS[:2], 1, chat=False)
    with pytest.raises(ValueError, match=r"n_tokens=2 soft tokens need .* found \[1\]"):
        train_soft_prompts(model, one, SoftPromptConfig(n_tokens=2, radius=1.0), progress=False)
    sp = SoftPrompts(torch.ones(1, 2, 32), placeholder=0)
    with pytest.raises(ValueError, match="must hold 2 placeholder tokens"):
        sp.prepare(model, one)
    with pytest.raises(ValueError, match="holds 1 soft-prompt placeholders, expected 2"):
        with sp.apply(model, 0):
            model(one.tokens)
    with pytest.raises(ValueError, match="n_tokens must be an int >= 1"):
        SoftPromptConfig(n_tokens=0)
    with pytest.raises(ValueError, match="needs n_prompts × n_tokens <= d_model"):
        train_soft_prompts(
            model,
            soft_prompt_set(model, TEXTS[:2], 5, chat=False),
            SoftPromptConfig(n_prompts=7, n_tokens=5, orthogonal="sequential", radius=1.0),
            progress=False,
        )


def test_analyze_run_and_the_report_take_soft_prompts(tiny_tok_model, tmp_path):
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.run_analysis import RunAnalysis
    from melbo_lens.workflows.runs import analyze_run

    model = tiny_tok_model
    ps = soft_prompt_set(model, TEXTS[:2], 2, chat=False)
    sp = train_soft_prompts(
        model, ps, SoftPromptConfig(n_prompts=2, n_tokens=2, steps=5), progress=False
    )
    run = analyze_run(model, sp, sae=None, n_random=4, max_new_tokens=3, progress=False)
    # the trained objective, re-measured through the artifact's own hooks (tol: float32
    # sums of ~1e3 through two code paths)
    torch.testing.assert_close(
        torch.tensor(run.objective, dtype=torch.float64), sp.objective.double(), rtol=1e-4, atol=0
    )
    assert len(run.random_objective) == 4 and len(run.info["nearest_tokens"]) == 2
    run.save(tmp_path / "run")
    back = RunAnalysis.load(tmp_path / "run")
    assert isinstance(back.vectors, SoftPrompts)
    page = write_report(back, tmp_path / "report.html").read_text()
    assert "nearest tokens" in page


def test_the_exact_attribution_of_a_soft_prompt_sums_to_its_delta(tiny_tok_model):
    from melbo_lens import decompose_target_delta

    model = tiny_tok_model
    sp = SoftPrompts(torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(4)), 0)
    ps = sp.prepare(model, TEXTS[:2], chat=False)
    dec = decompose_target_delta(model, ps, sp, 0, target=3)
    assert dec.delta.abs().max() > 0.1  # the soft tokens change the target
    # tol: float32 sums of ~30 components of size ~1
    torch.testing.assert_close(dec.components.sum(0), dec.delta, rtol=1e-4, atol=1e-4)
