"""A run's analysis on a tiny model: numbers against hand computations, files round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from melbo_lens import (
    ArtifactError,
    HookSite,
    MelboConfig,
    PromptSet,
    SteeringVectors,
    attribute_target_delta,
    melbo_objective,
    random_vectors,
    train_steering_vectors,
)
from melbo_lens.workflows.runs import RunAnalysis, RunAnalysisError, analyze_run

SOURCE, TARGET = HookSite(0), HookSite(3, "resid_pre")


def tiny_sae(site: HookSite = SOURCE, seed: int = 0):
    """A StandardSAE with 64 random unit decoder rows at `site` (encoder = decoderᵀ)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=site.name, model_name="tiny")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=meta))
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    return sae


@pytest.fixture(scope="module")
def prompts(tiny_tok_model) -> PromptSet:
    return PromptSet.from_texts(tiny_tok_model, ["hello there", "what is up?"])


@pytest.fixture(scope="module")
def vectors(tiny_tok_model, prompts) -> SteeringVectors:
    cfg = MelboConfig(SOURCE, TARGET, n_vectors=3, radius=4.0, steps=5)
    return train_steering_vectors(tiny_tok_model, prompts, cfg, progress=False)


@pytest.fixture(scope="module")
def run(tiny_tok_model, prompts, vectors) -> RunAnalysis:
    return analyze_run(
        tiny_tok_model,
        vectors,
        prompts,
        sae=tiny_sae(),
        n_random=6,
        max_new_tokens=6,
        attribution="attribution_patching",
        progress=False,
    )


def _objective_by_hand(model, prompts, vector) -> float:
    """Σ_i Σ_t∈targets ||Z_t(θ) − Z_t(0)||² with plain hooks (p = 2, q = 1)."""
    tokens, mask = prompts.tokens, prompts.attention_mask.long()
    _, clean = model.run_with_cache(tokens, attention_mask=mask, names_filter=TARGET.name)

    def add(act, hook):
        return act + vector

    with model.hooks(fwd_hooks=[(SOURCE.name, add)]):
        _, steered = model.run_with_cache(tokens, attention_mask=mask, names_filter=TARGET.name)
    delta = steered[TARGET.name] - clean[TARGET.name]
    return float((delta.pow(2).sum(-1) * prompts.target_mask).sum())


def test_objectives_match_training_and_a_hand_computation(run, vectors, tiny_tok_model, prompts):
    torch.testing.assert_close(torch.tensor(run.objective), vectors.objective, rtol=1e-4, atol=0)
    rand = random_vectors(tiny_tok_model, SOURCE, n=6, radius=4.0, seed=run.info["random_seed"])
    by_hand = [_objective_by_hand(tiny_tok_model, prompts, v) for v in rand.vectors]
    assert run.random_objective == pytest.approx(by_hand, rel=1e-4)
    s = run.random_summary()
    assert s["mean"] == pytest.approx(sum(by_hand) / 6) and s["n"] == 6
    assert run.random_ratio()[1] == pytest.approx(run.objective[1] / s["mean"])
    assert run.random_rank()[0] == sum(r < run.objective[0] for r in by_hand) / 6


def test_parts_present_and_consistent(run, vectors):
    assert run.labels == ["melbo[0]", "melbo[1]", "melbo[2]"]
    assert run.generations.indices == [0, 1, 2]
    assert torch.allclose(
        run.vector_similarity.values.diagonal(), torch.ones(3, dtype=torch.float64)
    )
    assert run.delta_similarity.values.shape == (3, 3)
    assert [d.label for d in run.decompositions] == run.labels
    assert set(run.feature_tokens) == {f for d in run.decompositions for f in d.features}
    assert [t.index for t in run.token_deltas] == [0, 1, 2]
    for k, acts in enumerate(run.feature_activations):
        dec = run.decompositions[k]
        positive = [f for f, c in zip(dec.features, dec.coefficients, strict=True) if c > 0]
        assert acts.feature == (positive or dec.features)[0]
    # no corpus and no SAE at the target were given: the notes say so, and nothing else
    assert [n.split(":")[0].split(";")[0] for n in run.notes] == [
        "contexts come from the bundled prompts (~100 tokens)",
        "cards list no latents",
    ]
    assert run.cards is not None and [c.index for c in run.cards] == [0, 1, 2]
    assert set(run.dashboards or {}) == {SOURCE.name}
    assert run.info["attribution"]["prompts"] == 2


def test_compact_attribution_keeps_contributions_and_token_norms(
    run, tiny_tok_model, prompts, vectors
):
    full = attribute_target_delta(tiny_tok_model, prompts, vectors, 1, method="exact")
    compact = run.attributions[1].decomposition
    assert compact.components.shape[-1] == 1
    torch.testing.assert_close(
        compact.contributions(), full.decomposition.contributions(), rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(compact.token_norms(), full.decomposition.token_norms())
    assert run.attributions[1].metric_steered == pytest.approx(run.objective[1], rel=1e-4)
    assert 0 < len(run.attributions[1].verified) <= 8


def test_save_load_roundtrip(run, tmp_path):
    run.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "analysis.json",
        "analysis.safetensors",
        "dashboards",
        "vectors.safetensors",
    ]
    back = RunAnalysis.load(tmp_path)
    assert back.cards == run.cards
    (hook,) = run.dashboards
    assert back.dashboards[hook].latents == run.dashboards[hook].latents
    assert (
        back.dashboards[hook][run.dashboards[hook].latents[0]]
        == run.dashboards[hook][run.dashboards[hook].latents[0]]
    )
    assert back.to_dict() == json.loads(json.dumps(run.to_dict()))
    torch.testing.assert_close(back.vectors.vectors, run.vectors.vectors)
    for a, b in zip(run.attributions, back.attributions, strict=True):
        torch.testing.assert_close(a.decomposition.contributions(), b.decomposition.contributions())
        assert [n.actual for n in a.nodes] == [n.actual for n in b.nodes]
    assert back.generations.for_vector(2) == run.generations.for_vector(2)
    assert back.feature_tokens == run.feature_tokens
    assert back.token_deltas[0].norms == run.token_deltas[0].norms


def test_load_refuses_broken_or_foreign_runs(run, tmp_path, vectors):
    with pytest.raises(FileNotFoundError, match="no saved analysis"):
        RunAnalysis.load(tmp_path)
    run.save(tmp_path)
    js = tmp_path / "analysis.json"
    good = js.read_text()
    js.write_text(good[: len(good) // 2])
    with pytest.raises(RunAnalysisError, match="not valid JSON"):
        RunAnalysis.load(tmp_path)
    js.write_text(json.dumps({"format": "someone.else/2"}))
    with pytest.raises(RunAnalysisError, match="not a melbo_lens run analysis"):
        RunAnalysis.load(tmp_path)
    js.write_text(good)
    vectors[:2].save(tmp_path / "vectors.safetensors")  # retrained / replaced vectors
    with pytest.raises(RunAnalysisError, match="not the set of vectors"):
        RunAnalysis.load(tmp_path)
    run.save(tmp_path)
    (tmp_path / "analysis.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        RunAnalysis.load(tmp_path)
    run.save(tmp_path)
    torch.save({"vectors": torch.zeros(3, 32)}, tmp_path / "vectors.safetensors")
    with pytest.raises(ArtifactError, match="never unpickles"):
        RunAnalysis.load(tmp_path)
    run.save(tmp_path)
    data = json.loads(good)
    del data["objective"]
    js.write_text(json.dumps(data))
    with pytest.raises(RunAnalysisError, match="corrupt analysis data"):
        RunAnalysis.load(tmp_path)


def test_no_fitting_sae_is_a_note_not_an_error(tiny_tok_model, prompts, vectors, tmp_path):
    run = analyze_run(
        tiny_tok_model, vectors, prompts, n_random=2, max_new_tokens=3, progress=False
    )
    assert run.decompositions is None and run.feature_activations is None
    assert run.attributions[0].method == "exact" and run.attributions[0].nodes == []
    assert any("no packaged SAE fits" in n for n in run.notes)
    assert run.token_deltas is not None
    run.save(tmp_path)
    assert RunAnalysis.load(tmp_path).decompositions is None
    with pytest.raises(ValueError, match="reads blocks.2.hook_resid_post but the vectors live"):
        analyze_run(tiny_tok_model, vectors, prompts, sae=tiny_sae(HookSite(2)), progress=False)


def test_model_without_tokenizer_skips_text_parts(tiny_model):
    ps = PromptSet.from_tokens(tiny_model, [[5, 6, 7, 8], [9, 10, 11]])
    cfg = MelboConfig(SOURCE, TARGET, n_vectors=2, radius=2.0, steps=2)
    vecs = train_steering_vectors(tiny_model, ps, cfg, progress=False)
    run = analyze_run(tiny_model, vecs, sae=tiny_sae(), n_random=2, progress=False)
    assert run.generations is None and run.token_deltas is None and run.feature_tokens is None
    assert run.decompositions is not None
    assert any("no tokenizer" in n for n in run.notes)
    assert run.info["n_prompts"] == 2  # prompts came from the vectors' provenance


def test_clear_errors(tiny_model):
    vecs = SteeringVectors(torch.eye(32)[:2], SOURCE)
    with pytest.raises(ValueError, match="record no target site"):
        analyze_run(tiny_model, vecs, PromptSet.from_tokens(tiny_model, [[1, 2]]), sae=None)
    with pytest.raises(ValueError, match="record no training prompts"):
        analyze_run(tiny_model, vecs, target=TARGET, sae=None)


def test_cli_report_computes_once_then_renders_the_saved_analysis(
    tiny_tok_model, vectors, tmp_path, monkeypatch, capsys
):
    from melbo_lens.cli import main

    vectors.save(tmp_path / "vectors.safetensors")  # what `melbo-lens train` leaves
    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda name, **kw: tiny_tok_model)
    args = ["report", str(tmp_path), "--sae", "none", "--n-random", "3", "--quiet"]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"report -> {tmp_path / 'report.html'}" in out
    saved = RunAnalysis.load(tmp_path)
    assert len(saved.random_objective) == 3 and saved.generations is not None

    def no_model(name, **kw):
        raise AssertionError("a saved analysis must be rendered without loading a model")

    monkeypatch.setattr("melbo_lens.models.zoo.load_model", no_model)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text().count('class="ml-row"') == 3
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    # a finished report is replaced only when asked; --out DIR writes DIR/report.html
    before = (tmp_path / "report.html").read_bytes()
    assert main(["report", str(tmp_path)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "report.html").read_bytes() == before
    assert main(["report", str(tmp_path), "--overwrite"]) == 0
    folder = tmp_path / "views"
    folder.mkdir()
    assert main(["report", str(tmp_path), "--out", str(folder)]) == 0
    assert (folder / "report.html").is_file()


# ---------------------------------------------------------------------- adapters
def test_analyze_run_and_report_take_adapters(tiny_tok_model, prompts, tmp_path):
    """Adapters go through the same analysis and report: objectives measured by hand with
    apply() on whole-model runs, random adapters as the baseline, files round-trip."""
    from melbo_lens import AdapterConfig, random_adapters, train_steering_adapters
    from melbo_lens.views.report import render_report

    model = tiny_tok_model
    cfg = AdapterConfig(1, TARGET, n_adapters=2, rank=2, radius=4.0, steps=5)
    adapters = train_steering_adapters(model, prompts, cfg, progress=False)
    run = analyze_run(model, adapters, prompts, n_random=3, max_new_tokens=4, progress=False)

    def by_hand(art, k):
        mask = prompts.attention_mask.long()
        _, clean = model.run_with_cache(prompts.tokens, attention_mask=mask)
        with art.apply(model, k):
            _, dirty = model.run_with_cache(prompts.tokens, attention_mask=mask)
        return float(melbo_objective(dirty[TARGET.name], clean[TARGET.name], prompts.target_mask))

    assert run.objective == pytest.approx([by_hand(adapters, k) for k in range(2)], rel=1e-4)
    rand = random_adapters(model, 1, n=3, radius=4.0, rank=2, seed=run.info["random_seed"])
    assert run.random_objective == pytest.approx([by_hand(rand, k) for k in range(3)], rel=1e-4)
    assert run.generations is not None and len(run.generations.steered) == 2
    assert run.delta_similarity is not None and run.vector_similarity is not None
    assert run.attributions is not None and len(run.attributions) == 2
    assert run.decompositions is None and run.feature_activations is None
    assert run.token_deltas is not None and len(run.token_deltas) == 2
    # per-token ‖Δ_t‖ of adapter 1 on its own text, against two whole-model runs
    from melbo_lens.analysis.tokens import token_ids

    deltas = run.token_deltas[1]
    text = (run.generations.prompts[0], run.generations.for_vector(1)[0])
    ids = torch.tensor([token_ids(model, text, None)[0]])
    assert ids.shape[1] == len(deltas.norms)
    _, clean = model.run_with_cache(ids, names_filter=TARGET.name)
    with adapters.apply(model, 1):
        _, dirty = model.run_with_cache(ids, names_filter=TARGET.name)
    by_hand = (dirty[TARGET.name] - clean[TARGET.name])[0].norm(dim=-1)
    # two float32 forward passes of the same model: agreement to float rounding
    torch.testing.assert_close(torch.tensor(deltas.norms), by_hand, rtol=1e-4, atol=1e-5)
    run.save(tmp_path)
    back = RunAnalysis.load(tmp_path)
    assert isinstance(back.vectors, type(adapters)) and back.objective == run.objective
    html_text = render_report(back)
    assert "melbo_adapters" in html_text and "random adapters of the same layer" in html_text
