"""The HTML report: self-contained, bundles inlined once, every part of the run shown."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from plotly.offline import get_plotlyjs

from melbo_lens import HookSite, MelboConfig, PromptSet, train_steering_vectors
from melbo_lens.views.report import render_report, write_report
from melbo_lens.views.tokens import bundle_script
from melbo_lens.workflows.runs import RunAnalysis, analyze_run

SOURCE, TARGET = HookSite(0), HookSite(3, "resid_pre")
EVIL = "<script>alert('x')</script>&"


def tiny_sae(site: HookSite = SOURCE):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=site.name, model_name="tiny")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=meta))
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


@pytest.fixture(scope="module")
def run(tiny_tok_model) -> RunAnalysis:
    model = tiny_tok_model
    ps = PromptSet.from_texts(model, ["hello there", "what is up?"])
    cfg = MelboConfig(SOURCE, TARGET, n_vectors=3, radius=4.0, steps=4)
    vectors = train_steering_vectors(model, ps, cfg, progress=False)
    run = analyze_run(
        model, vectors, ps, sae=tiny_sae(), n_random=5, max_new_tokens=5, progress=False
    )
    run.generations.steered[1][0] = EVIL  # text from the model is escaped, never markup
    return run


@pytest.fixture(scope="module")
def page(run) -> str:
    return render_report(run)


def _figures(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="ml-figures">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_self_contained_bundles_inlined_once(page):
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js[:2000]) == 1  # plotly.js once, not per figure
    cv = bundle_script()
    assert page.count(cv[40:2000]) == 1  # the circuitsvis bundle once, not per view
    # the markup outside scripts (plotly.js's code holds URL strings it never loads here):
    markup = re.sub(r"(<script\b[^>]*>).*?</script>", r"\1</script>", page, flags=re.S)
    assert markup.count("<script") >= 4  # plotly.js, figure data, circuitsvis, the page script
    # no external resource: every src= / href= is a page anchor, no script has a src
    refs = re.findall(r"""<[^>]+\s(?:src|href)\s*=\s*["']?([^"'\s>]+)""", markup)
    assert refs and all(r.startswith("#") for r in refs), [r for r in refs if r[0] != "#"]
    assert not re.search(r"<script[^>]*\ssrc=", markup)
    assert "http" not in markup.replace("http-equiv", "")
    assert "@import" not in markup and "url(" not in markup


def test_every_figure_spec_has_a_div_and_the_template_is_stored_once(page):
    data = _figures(page)
    divs = re.findall(r'<div class="ml-fig" id="(fig-\d+)"', page)
    assert sorted(divs) == sorted(data["figs"]) and len(divs) >= 10
    assert data["template"] is not None
    assert all("template" not in f["layout"] for f in data["figs"].values())
    assert all(f.get("shared_template") for f in data["figs"].values())


def test_vectors_table_and_detail_panels(page, run):
    rows = re.findall(r'<tr class="ml-row" data-vector="(\d+)"', page)
    assert rows == ["0", "1", "2"]
    for k in range(3):
        assert f'<div class="ml-detail" id="vector-{k}" data-vector="{k}" hidden>' in page
        assert f"{run.objective[k]:.4g}" in page
    # completions of vector 2 in its panel, escaped exactly once
    panel = page.split('id="vector-2"')[1].split('class="ml-detail"')[0]
    for text in run.generations.for_vector(2):
        assert "\n" + text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>" in panel
    assert EVIL not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    # token views: one per vector plus one feature view per vector, each with its own div
    ids = re.findall(r'<div id="(ml-view-\d+)"', page)
    assert len(ids) == len(set(ids)) == 6
    assert page.count("CircuitsVis.render(") == 6
    # the SAE features of vector 0 are in its panel's table
    panel0 = page.split('id="vector-0"')[1].split('class="ml-detail"')[0]
    assert all(f">f{f}<" in panel0 for f in run.decompositions[0].features)


def test_figure_numbers_are_the_run_numbers_rounded(page, run):
    data = _figures(page)
    bars = [
        t
        for f in data["figs"].values()
        for t in f["data"]
        if t.get("type") == "bar" and t.get("name") == "learned vectors"
    ]
    assert len(bars) == 1
    assert bars[0]["y"] == pytest.approx(run.objective, rel=1e-3)


def test_missing_parts_are_said_not_crashed(run):
    bare = replace(
        run,
        generations=None,
        decompositions=None,
        feature_tokens=None,
        token_deltas=None,
        feature_activations=None,
        attributions=None,
        delta_similarity=None,
        notes=["SAE parts skipped: no packaged SAE fits this model"],
    )
    page = render_report(bare)
    assert "No SAE decomposition (see Notes)" in page
    assert "SAE parts skipped: no packaged SAE fits this model" in page
    assert "No completions for this vector" in page
    assert "CircuitsVis" not in page  # no views, no bundle


def test_write_report_is_atomic_and_small(run, tmp_path):
    path = write_report(run, tmp_path / "sub" / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left
    overhead = path.stat().st_size - len(get_plotlyjs()) - len(bundle_script())
    # figures and data stay small next to the bundles; each latent's dashboard (about 8 kB
    # of HTML: 10 top contexts, 3 per quantile band, two histograms) comes on top
    n_latents = sum(len(d) for d in (run.dashboards or {}).values())
    assert n_latents > 0
    assert overhead < 60_000 * len(run) + 10_000 * n_latents
