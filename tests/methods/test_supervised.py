"""Supervised vectors: hand computations, planted axes, probes, stability curves."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from melbo_lens import HookSite, SteeringVectors
from melbo_lens.methods.contrast import pair_activations
from melbo_lens.methods.estimators import logistic_probe, mean_difference, pca_directions
from melbo_lens.methods.supervised import (
    mean_difference_vectors,
    pca_vectors,
    probe_vectors,
    stability_curve,
)

POS = ["a cat sat on a mat", "bob ran", "the big dog barked at me", "abc"]
NEG = ["a dog sat", "bad cats ran far away", "xyz b", "hello there, bob"]
EMBED = HookSite(0, "resid_pre")  # with rotary embeddings: the token embedding itself


def hand_activations(model, texts, site, pick):
    """One run_with_cache per prompt (no padding, no batching), then pick a row."""
    rows = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=site.name)
        rows.append(pick(ids, cache[site.name][0]))
    return torch.stack(rows)


def test_mean_difference_equals_hand_computation_for_every_position(tiny_tok_model):
    model = tiny_tok_model
    tok = model.tokenizer
    ab = {tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")}

    def last_ab(ids):
        return max(i for i, t in enumerate(ids) if t in ab)

    picks = {
        "last": lambda ids, acts: acts[-1],
        "mean": lambda ids, acts: acts.mean(0),
        1: lambda ids, acts: acts[1],
        -2: lambda ids, acts: acts[-2],
        "answer": lambda ids, acts: acts[last_ab(ids)],
    }
    for site in (HookSite(1), HookSite(2, "attn_out")):
        for position, pick in picks.items():
            kw = {"answer_tokens": ["a", "b"]} if position == "answer" else {}
            sv = mean_difference_vectors(model, POS, NEG, site, position=position, **kw)
            hand = hand_activations(model, POS, site, pick) - hand_activations(
                model, NEG, site, pick
            )
            expected = hand.mean(0, keepdim=True)
            torch.testing.assert_close(sv.vectors, expected, atol=1e-5, rtol=1e-5)
            assert sv.method == "mean_difference" and sv.site == site
            assert sv.config["position"] == position and sv.config["n_pairs"] == 4
            assert sv.metadata["natural_norm"] == pytest.approx(float(expected.norm()), 1e-5)
    # the answer position is the last 'a' or 'b' of each prompt; default letters A/B agree
    sv = mean_difference_vectors(model, POS, NEG, 1, position="answer")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in POS]
    assert sv.metadata["positive_positions"] == [last_ab(i) for i in ids]
    assert sv.config["answer_tokens"] == sorted(ab)


def test_radius_rescales_and_artifact_round_trips(tiny_tok_model, tmp_path):
    natural = mean_difference_vectors(tiny_tok_model, POS, NEG, 1)
    scaled = mean_difference_vectors(tiny_tok_model, POS, NEG, 1, radius=2.5)
    assert float(scaled.vectors.norm()) == pytest.approx(2.5, rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(natural.vectors, scaled.vectors)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
    pca = pca_vectors(tiny_tok_model, POS, NEG, 1, n_components=2)
    # PCA directions default to the mean difference's natural norm
    torch.testing.assert_close(pca.radius, natural.radius.expand(2))
    path = pca.save(tmp_path / "pca.safetensors")
    back = SteeringVectors.load(path)
    torch.testing.assert_close(back.vectors, pca.vectors)
    assert back.method == "pca" and back.config == pca.config
    assert back.prompts["positive"]["texts"] == POS


def embedding_pairs(pos_emb: torch.Tensor, neg_emb: torch.Tensor):
    """A tiny model whose token 2i+1 / 2i embeds as pos_emb[i] / neg_emb[i]."""
    n, d = pos_emb.shape
    model = make_tiny(d_vocab=2 * n, d_model=d)
    with torch.no_grad():
        model.embed.W_E[1::2] = pos_emb
        model.embed.W_E[0::2] = neg_emb
    return model, [[2 * i + 1] for i in range(n)], [[2 * i] for i in range(n)]


def unit(d: int, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(d, generator=gen)
    return v / v.norm()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_pca_recovers_a_planted_axis(rng):
    d, n = 32, 64
    u = unit(d, rng)
    base = torch.randn(n, d, generator=rng)
    scale = 2.0 + 2.0 * torch.randn(n, 1, generator=rng)  # varies a lot along u
    noise = 0.15 * torch.randn(n, d, generator=rng)
    model, pos, neg = embedding_pairs(base + scale * u + noise, base)
    P, N, _ = pair_activations(model, pos, neg, EMBED)
    torch.testing.assert_close(P - N, scale * u + noise)
    for center in (False, True):
        sv = pca_vectors(model, pos, neg, EMBED, n_components=3, center=center)
        assert cos(sv.vectors[0], u) > 0.99, center  # signed: the positive side is +u
        gram = torch.nn.functional.normalize(sv.vectors, dim=-1)
        # tol: entries of an orthonormal Gram matrix are O(1)
        torch.testing.assert_close(gram @ gram.T, torch.eye(3), atol=1e-5, rtol=0)
        share = sv.metadata["explained_variance"]
        assert share[0] > 0.8 and share[0] >= share[1] >= share[2]
    flipped = pca_vectors(model, neg, pos, EMBED)
    assert cos(flipped.vectors[0], u) < -0.99


def test_probe_finds_the_separating_direction_where_mean_difference_is_misled(rng):
    d, n = 32, 48
    u = unit(d, rng)
    w = unit(d, rng)
    w = w - (w @ u) * u
    w = w / w.norm()
    # classes separate along u; along w their means differ too, but w is mostly noise
    pos = (
        0.3 * torch.randn(n, d, generator=rng)
        + u
        + (0.8 + 5 * torch.randn(n, 1, generator=rng)) * w
    )
    neg = (
        0.3 * torch.randn(n, d, generator=rng)
        - u
        + (-0.8 + 5 * torch.randn(n, 1, generator=rng)) * w
    )
    model, pos_t, neg_t = embedding_pairs(pos, neg)
    probe = probe_vectors(model, pos_t, neg_t, EMBED)
    mean = mean_difference_vectors(model, pos_t, neg_t, EMBED)
    assert cos(probe.vectors, u) > 0.95
    assert cos(mean.vectors, u) < 0.9
    assert probe.metadata["probe_accuracy"] >= 0.97
    assert probe.method == "probe" and probe.config["l2"] == 1e-2
    # deterministic, also under inference_mode
    with torch.inference_mode():
        again = probe_vectors(model, pos_t, neg_t, EMBED)
    torch.testing.assert_close(again.vectors, probe.vectors)


def test_stability_curve_reaches_one_and_grows_on_planted_noise(rng):
    d, n = 32, 128
    u = unit(d, rng)
    base = torch.randn(n, d, generator=rng)
    model, pos, neg = embedding_pairs(base + u + 0.7 * torch.randn(n, d, generator=rng), base)
    curve = stability_curve(model, pos, neg, EMBED, seed=0, repeats=8)
    sizes = [s for s, _ in curve]
    values = [c for _, c in curve]
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128]
    assert values[-1] == pytest.approx(1.0, abs=1e-9)
    drops = sum(b < a - 0.01 for a, b in zip(values, values[1:], strict=False))
    assert drops == 0, curve
    assert values[0] < 0.5 and values[5] > 0.75 and values[6] > 0.9, curve
    curve = stability_curve(model, pos, neg, EMBED, seed=0)
    assert stability_curve(model, pos, neg, EMBED, seed=0) == curve
    assert stability_curve(model, pos, neg, EMBED, seed=1) != curve
    for method in ("pca", "probe"):
        other = stability_curve(model, pos, neg, EMBED, method=method, sizes=[4, 128])
        assert other[-1] == (128, pytest.approx(1.0, abs=1e-6))
    averaged = stability_curve(model, pos, neg, EMBED, sizes=[1, 100], repeats=4)
    assert [s for s, _ in averaged] == [1, 100]


def test_errors_say_what_is_wrong(tiny_tok_model):
    with pytest.raises(ValueError, match="pair up one to one"):
        mean_difference_vectors(tiny_tok_model, POS, NEG[:3], 1)
    with pytest.raises(ValueError, match="none of the answer tokens"):
        mean_difference_vectors(tiny_tok_model, POS, NEG, 1, position="answer", answer_tokens="z")
    with pytest.raises(ValueError, match="outside positive prompt 3"):
        mean_difference_vectors(tiny_tok_model, POS, NEG, 1, position=5)
    with pytest.raises(ValueError, match="position must be"):
        mean_difference_vectors(tiny_tok_model, POS, NEG, 1, position="first")
    with pytest.raises(ValueError, match="n_components"):
        pca_vectors(tiny_tok_model, POS, NEG, 1, n_components=5)
    with pytest.raises(ValueError, match="one token each"):
        mean_difference_vectors(tiny_tok_model, POS, NEG, 1, position="answer", answer_tokens="ab")
    with pytest.raises(ValueError, match="sizes|every size"):
        stability_curve(tiny_tok_model, POS, NEG, 1, sizes=[8])


def test_estimators_are_plain_callables_over_contrast_activations():
    """On hand-made (P, N): the mean difference by hand, the first principal component
    of the differences along the planted axis with the positive side up, and a probe
    whose weights point from N to P."""
    g = torch.Generator().manual_seed(0)
    axis = torch.zeros(6, dtype=torch.float64)
    axis[2] = 1.0
    N = torch.randn(40, 6, generator=g, dtype=torch.float64)
    P = N + 3.0 * axis + 0.1 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mean_difference(P, N), (P - N).mean(0, keepdim=True))
    dirs, _ = pca_directions(P, N, 1, False)
    assert float(dirs[0] @ axis) > 0.99
    w, info = logistic_probe(P, N, 1e-2, 500)
    assert float(torch.nn.functional.normalize(w, dim=0) @ axis) > 0.9
    assert isinstance(info, dict)
