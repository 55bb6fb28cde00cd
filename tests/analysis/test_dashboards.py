"""Feature dashboards against planted truth: a model whose residual at block 0 carries a
token flag and a position ramp, and an SAE whose latents 0 and 1 read the flags of 'a'
and 'b' (activation 5 + position/64), so each latent's true top contexts are the latest
occurrences of its token, by construction."""

from __future__ import annotations

import gzip
import math

import pytest
import torch
from conftest import make_tiny, make_tiny_tokenizer
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from melbo_lens.analysis.corpus import Corpus, CorpusError, load_corpus
from melbo_lens.analysis.sae.dashboard_result import FeatureDashboards
from melbo_lens.analysis.sae.dashboards import (
    dashboard_shard,
    feature_dashboards,
    logit_effects,
    merge_dashboard_states,
)
from melbo_lens.analysis.streaming import TopScores
from melbo_lens.core.io import ArtifactError

SITE = "blocks.0.hook_resid_pre"
TEXTS = [
    "a cab sat by a bay",
    "the bad cat ate a bean",
    "bob and abby ran far",
    "no such letters here",
    "a b a b a b",
] * 3
CTX = 16


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    model = make_tiny(n_layers=2, positional_embedding_type="standard")
    tok = make_tiny_tokenizer()
    model.set_tokenizer(tok)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    with torch.no_grad():
        model.W_E[:, :3] = 0
        model.W_E[a, 0] = 1.0
        model.W_E[b, 1] = 1.0
        model.W_pos.zero_()
        model.W_pos[:, 2] = torch.arange(model.cfg.n_ctx) / 64
    cfg = StandardSAEConfig(
        d_in=32, d_sae=8, metadata=SAEMetadata(hook_name=SITE, model_name="tiny")
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        for j in (0, 1):
            sae.W_enc[j, j] = 10.0
            sae.W_enc[2, j] = 1.0
            sae.b_enc[j] = -5.0
        g = torch.Generator().manual_seed(0)
        w = torch.randn(8, 32, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
    return model, sae, (a, b)


def _truth(model, token_id: int) -> list[tuple[int, float]]:
    """(location, value) of every occurrence of `token_id` at row position >= 1, best first."""
    rows = load_corpus(TEXTS).token_rows(model.tokenizer, CTX)
    out = []
    for r, row in enumerate(rows.tolist()):
        for p, t in enumerate(row):
            if p >= 1 and t == token_id:
                out.append((r * CTX + p, 5.0 + p / 64))
    return sorted(out, key=lambda x: (-x[1], x[0]))


def _dash(model, sae, **kw) -> FeatureDashboards:
    kw = {"ctx": CTX, "cache": False, "progress": False, "k": 5, "batch_size": 2, **kw}
    return feature_dashboards(model, sae, TEXTS, **kw)


def test_planted_latents_top_contexts_are_their_tokens_latest_first(planted) -> None:
    model, sae, (a, b) = planted
    dash = _dash(model, sae)
    for latent, token_id, char in ((0, a, "a"), (1, b, "b")):
        truth = _truth(model, token_id)[:5]
        assert dash.top_locations[latent].tolist() == [loc for loc, _ in truth]
        torch.testing.assert_close(
            dash.top_values[latent], torch.tensor([v for _, v in truth]), rtol=1e-5, atol=1e-5
        )
        d = dash[latent]
        # the views show each context text once (TEXTS repeats, so some windows repeat)
        assert len(d.top_activations) >= 2
        assert [c.token for c in d.top_activations] == [char] * len(d.top_activations)
        texts = [c.text() for c in d.top_activations]
        assert len(set(texts)) == len(texts)
        assert all(
            len(c.left) == dash.left and len(c.right) == dash.right for c in d.top_activations
        )
    assert dash.active[2:].sum() == 0  # the unplanted latents never fire
    table = dash.to_pandas()
    assert list(table.index) == list(range(8))
    assert table.loc[1, "frac_nonzero"] == dash[1].frac_nonzero
    assert table.loc[0, "top_context"] == dash[0].top_activations[0].text()


def test_activations_match_sae_lens_encode(planted) -> None:
    """The recorded values are sae-lens's own encode at those positions (run_with_cache)."""
    model, sae, _ = planted
    dash = _dash(model, sae, latents=[0, 1])
    rows = load_corpus(TEXTS).token_rows(model.tokenizer, CTX)
    _, cache = model.run_with_cache(rows, names_filter=SITE)
    enc = sae.encode(cache[SITE].reshape(-1, 32)).detach()
    for i, latent in enumerate((0, 1)):
        locs = dash.top_locations[i]
        torch.testing.assert_close(dash.top_values[i], enc[locs, latent], rtol=1e-6, atol=1e-6)
        # density and histogram mass: every active token at positions >= 1, counted once
        fired = enc.view(len(rows), CTX, -1)[:, 1:, latent] > 0
        assert int(dash.active[i]) == int(fired.sum()) == int(dash.hist[i].sum())
        assert dash[latent].frac_nonzero == pytest.approx(float(fired.float().mean()))


def test_logit_effects_match_a_hand_computation_with_the_final_norm(planted) -> None:
    model, sae, _ = planted
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.ln_final.w.copy_(torch.rand(32, generator=g) * 4)  # far from uniform
    d = torch.randn(3, 32, generator=g)
    by_hand = ((d - d.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U
    torch.testing.assert_close(logit_effects(model, d), by_hand, rtol=1e-5, atol=1e-5)
    # the norm's weight matters here: without it the ranking is different
    plain = (d - d.mean(-1, keepdim=True)) @ model.W_U
    assert plain.topk(10).indices.tolist() != by_hand.topk(10).indices.tolist()
    dash = _dash(model, sae, latents=[3])
    w = sae.W_dec[3] / sae.W_dec[3].norm()
    expect = ((w - w.mean()) * model.ln_final.w) @ model.W_U
    assert dash.logit_top_ids[0].tolist() == expect.topk(10).indices.tolist()
    assert dash.logit_bottom_ids[0].tolist() == (-expect).topk(10).indices.tolist()
    with torch.no_grad():
        model.ln_final.w.fill_(1.0)


def test_sharded_pass_equals_one_pass(planted) -> None:
    model, sae, _ = planted
    one = dashboard_shard(model, sae, TEXTS, (0, 1), ctx=CTX, batch_size=3)
    parts = [
        dashboard_shard(model, sae, TEXTS, (i, 3), ctx=CTX, batch_size=2)
        for i in (2, 0, 1)  # any order
    ]
    merged = merge_dashboard_states(parts)
    assert merged.scores.equals(one.scores)
    assert torch.equal(merged.corr_rows, one.corr_rows)
    assert torch.equal(merged.corr_values, one.corr_values)


def test_correlated_latents_fire_together(planted) -> None:
    model, sae, _ = planted
    with torch.no_grad():  # latent 4 reads the same flag as latent 0
        sae.W_enc[:, 4] = sae.W_enc[:, 0]
        sae.b_enc[4] = sae.b_enc[0]
    try:
        dash = _dash(model, sae, latents=[0], corr_every=1)
        assert dash[0].correlated_features[0][0] == 4
        assert dash[0].correlated_features[0][1] == pytest.approx(1.0, abs=1e-5)
    finally:
        with torch.no_grad():
            sae.W_enc[:, 4] = 0
            sae.b_enc[4] = -1.0


def test_save_load_cache_and_resume(planted, tmp_path, monkeypatch) -> None:
    model, sae, _ = planted
    ref = _dash(model, sae)
    folder = tmp_path / "dash"
    calls = {"n": 0}
    real = TopScores.update

    def flaky(self, scores, locations):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, scores, locations)

    monkeypatch.setattr(TopScores, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        _dash(model, sae, cache=folder, save_every=2)
    assert (folder / "state.json").is_file()  # what finished is kept
    monkeypatch.setattr(TopScores, "update", real)
    resumed = _dash(model, sae, cache=folder, save_every=2)
    assert torch.equal(resumed.top_values, ref.top_values)
    assert torch.equal(resumed.sample_locations, ref.sample_locations)
    assert torch.equal(resumed.hist, ref.hist)
    assert not (folder / "state.json").exists()
    back = FeatureDashboards.load(folder, sae=sae)
    assert back[0].summary() == ref[0].summary()
    assert _dash(model, sae, cache=folder).info["key"] == resumed.info["key"]  # read back
    other = StandardSAE(sae.cfg)
    with pytest.raises(ArtifactError, match="another SAE"):
        FeatureDashboards.load(folder, sae=other)


def test_bad_input_is_named(planted, tmp_path) -> None:
    model, sae, _ = planted
    with pytest.raises(ValueError, match=r"latents \[8\] out of range.*8 latents"):
        _dash(model, sae, latents=[8])
    wide = StandardSAE(StandardSAEConfig(d_in=16, d_sae=4, metadata=SAEMetadata(hook_name=SITE)))
    with pytest.raises(ValueError, match="d_in=16.*d_model is 32"):
        _dash(model, wide)
    elsewhere = StandardSAE(
        StandardSAEConfig(
            d_in=32, d_sae=4, metadata=SAEMetadata(hook_name="blocks.9.hook_resid_post")
        )
    )
    with pytest.raises(ValueError, match="layer"):
        _dash(model, elsewhere)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        feature_dashboards(model, sae, str(empty), cache=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(latin)
    with pytest.raises(FileNotFoundError, match="corpus build"):
        load_corpus("no-such-corpus")
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "ok"}\n{"bad": 1}\n'))
    with pytest.raises(CorpusError, match="line 2|record 2"):
        load_corpus(gz)


def test_corpus_round_trip_and_splits(tmp_path) -> None:
    c = Corpus.from_records(
        [
            {"text": "prose one", "split": "heldout"},
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
        ],
        name="mini",
    )
    c.save(tmp_path / "mini.jsonl.gz")
    back = load_corpus(tmp_path / "mini.jsonl.gz")
    assert back.sha256 == c.sha256
    assert back.split("heldout").documents[0].text == "prose one"
    tok = make_tiny_tokenizer()
    chat = back.split("train").documents[0].render(tok)
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"  # the model's template
    stream = back.token_stream(tok)
    assert int(stream[-1]) == tok.eos_token_id
    assert not math.isnan(float(stream.float().mean()))
