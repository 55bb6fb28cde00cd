"""Vector cards against independent computations on a tiny model: (a) the source contexts
are the top projections read off `run_with_cache`; (b) a vector built to raise one token's
logit promotes that token; (c) the latents it switches on are those whose activation
rises in two plain runs; (d) completions come from `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, make_tiny_tokenizer
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from melbo_lens.analysis.cards import PerturbationCard, vector_cards
from melbo_lens.analysis.corpus import load_corpus
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello there, my friend"] * 4
CTX = 12


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    m = make_tiny(n_layers=4)
    m.set_tokenizer(make_tiny_tokenizer())
    return m


def _target_token_vector(model, token: int, site: HookSite, norm: float) -> SteeringVectors:
    """A vector along W_U[:, token] minus the mean column: raises that token's logit."""
    w = model.W_U
    d = w[:, token] - w.mean(1)
    return SteeringVectors((d / d.norm() * norm)[None], site)


def test_promoted_token_and_contexts(model) -> None:
    tok = model.tokenizer
    target = tok.convert_tokens_to_ids("z")
    sv = _target_token_vector(model, target, HookSite(3), 40.0)
    [card] = vector_cards(model, sv, TEXTS, ctx=CTX, context_tokens=10_000, effect_rows=4)
    assert card.promoted[0][0] == "z"
    assert card.promoted[0][1] > 0 and card.suppressed[0][1] < 0  # mean Δ log p
    assert card.promoted[0][2] > 0 and card.suppressed[0][2] < 0  # mean Δ p, the ranking
    assert card.kl is not None and card.kl > 0
    # (a) independently: projections of blocks.3.hook_resid_post onto the unit vector
    rows = load_corpus(TEXTS).token_rows(tok, CTX)
    _, cache = model.run_with_cache(rows, names_filter=sv.site.name)
    proj = cache[sv.site.name][:, 1:] @ (sv.vectors[0] / sv.vectors[0].norm())
    every = proj.flatten()
    got = torch.tensor([c["value"] for c in card.contexts])
    # the best projection first, then lower ones; a repeated text is listed once (the
    # corpus repeats each sentence 4 times), so the values are a subsequence of the ranking
    torch.testing.assert_close(got[0], every.max(), rtol=1e-5, atol=1e-5)
    assert bool((got[1:] <= got[:-1]).all())
    assert all(bool(torch.isclose(every, g, rtol=1e-5, atol=1e-5).any()) for g in got)
    shown = ["".join(c["left"]) + c["token"] for c in card.contexts]
    assert len(set(shown)) == len(shown)
    assert all(len(c["left"]) == 10 and len(c["right"]) == 5 for c in card.contexts)


def test_latents_switched_on_match_two_plain_runs(model) -> None:
    site = "blocks.3.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16, metadata=SAEMetadata(hook_name=site)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 16, generator=g))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    vec = torch.zeros(32)
    vec[:] = sae.W_enc[:, 5]  # adding it raises latent 5's pre-activation most
    sv = SteeringVectors((vec / vec.norm() * 30.0)[None], HookSite(1))
    [card] = vector_cards(model, sv, TEXTS, ctx=CTX, context_tokens=200, effect_rows=3, sae=sae)
    rows = load_corpus(TEXTS).token_rows(model.tokenizer, CTX)[:3]
    _, clean = model.run_with_cache(rows, names_filter=site)
    with sv.apply(model, 0):
        _, steered = model.run_with_cache(rows, names_filter=site)

    def enc(c):
        return sae.encode(c[site][:, 1:].reshape(-1, 32))

    change = (enc(steered) - enc(clean)).mean(0)
    assert card.sae_hook == site
    assert [f for f, _ in card.latents_on] == [
        int(i) for i in change.topk(10).indices if change[i] > 0
    ]
    assert card.latents_on[0][1] == pytest.approx(float(change.max()), rel=1e-4)


def test_completions_behaviours_and_round_trip(model) -> None:
    sv = SteeringVectors(
        torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), HookSite(1)
    )
    cards = vector_cards(
        model,
        sv,
        TEXTS,
        ctx=CTX,
        context_tokens=200,
        effect_rows=2,
        prompts=["hi", "so"],
        max_new_tokens=3,
        chat=False,
        labels=["alpha", "beta"],
    )
    assert [c.label for c in cards] == ["alpha", "beta"]
    assert all(len(c.completions) == 2 and c.behavior for c in cards)
    back = PerturbationCard.from_dict(cards[1].to_dict())
    assert back == cards[1]
    with pytest.raises(IndexError, match=r"indices \[2\] out of range"):
        vector_cards(model, sv, TEXTS, indices=[2])
