"""Plotly figures render the numbers they are given: traces, axes, hover text, values."""

from __future__ import annotations

from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch

from melbo_lens.analysis.attribution import (
    DeltaAttribution,
    DeltaDecomposition,
    NodeAttribution,
)
from melbo_lens.analysis.similarity import cosine_matrix
from melbo_lens.analysis.tokens import TokenDeltas
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors
from melbo_lens.views.figures import (
    attribution_bars,
    feature_heatmap,
    objective_vs_random,
    planted_benchmark,
    radius_sweep,
    similarity_heatmap,
    token_delta_heatmap,
    training_curves,
)

torch.set_num_threads(1)


def _vectors(with_record: bool = True) -> SteeringVectors:
    losses = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [0.5, 1.5, 2.5, 3.5]])
    return SteeringVectors(
        torch.eye(2, 4) * 4.0,
        HookSite(1),
        target=HookSite(3),
        config={"radius": 4.0, "power": 2.0, "q": 1.0},
        losses=losses if with_record else None,
        objective=torch.tensor([3.0, 3.5]) if with_record else None,
    )


def _decomposition(label, features, cosines, coefficients=None):
    return SimpleNamespace(
        label=label,
        features=features,
        cosines=cosines,
        coefficients=coefficients if coefficients is not None else cosines,
        method="cosine",
    )


def test_training_curves():
    fig = training_curves(_vectors())
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    assert [t.name for t in fig.data] == ["melbo[0]", "melbo[1]"]
    assert list(fig.data[0].y) == [1.0, 2.0, 3.0, None]  # NaN step: a gap
    assert list(fig.data[1].y) == [0.5, 1.5, 2.5, 3.5]
    assert list(fig.data[0].x) == [1, 2, 3, 4]
    assert fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.title.text == "objective"
    assert "melbo[0]" in fig.data[0].hovertemplate and "objective" in fig.data[0].hovertemplate
    assert "R=4" in fig.layout.title.text
    assert training_curves(_vectors(), log_y=True).layout.yaxis.type == "log"
    named = training_curves(_vectors(), labels=["honest", "pirate"])
    assert [t.name for t in named.data] == ["honest", "pirate"]
    with pytest.raises(ValueError, match="no training record"):
        training_curves(_vectors(with_record=False))
    with pytest.raises(ValueError, match="3 labels for 2 vectors"):
        training_curves(_vectors(), labels=["a", "b", "c"])


def test_objective_vs_random():
    rand = [1.0, 2.0, 3.0]
    fig = objective_vs_random(_vectors(), rand)
    bar, box = fig.data
    assert isinstance(bar, go.Bar) and isinstance(box, go.Box)
    assert list(bar.y) == [3.0, 3.5] and list(bar.x) == ["melbo[0]", "melbo[1]"]
    assert list(box.y) == rand and box.boxpoints == "all"
    assert list(bar.customdata) == pytest.approx([1.5, 1.75])  # ratio to the random mean 2
    assert "random mean" in bar.hovertemplate
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(2.0)
    assert fig.layout.xaxis.title.text == "vector"
    assert fig.layout.yaxis.title.text == "objective"
    assert "random" in fig.layout.title.text
    with pytest.raises(ValueError, match="empty"):
        objective_vs_random(_vectors(), [])
    with pytest.raises(ValueError, match="no final objective"):
        objective_vs_random(_vectors(with_record=False), rand)


def test_radius_sweep_with_and_without_extras():
    sweep = SimpleNamespace(
        radii=[1.0, 2.0, 4.0, 8.0],
        objective=[0.1, 0.5, 2.0, 9.0],
        diversity=[0.2, 0.4, 0.6, 0.7],
        fluency=[2.0, 2.1, 3.0, 40.0],
        recommended=4.0,
    )
    fig = radius_sweep(sweep)
    names = [t.name for t in fig.data]
    assert names == ["objective", "diversity", "fluency", "recommended R = 4"]
    assert list(fig.data[0].x) == sweep.radii and list(fig.data[0].y) == sweep.objective
    assert list(fig.data[1].y) == sweep.diversity and list(fig.data[2].y) == sweep.fluency
    # one panel per quantity, each with its own y axis; perplexity on a log axis
    assert [t.yaxis for t in fig.data[:3]] == ["y", "y2", "y3"]
    assert fig.layout.yaxis.title.text == "objective"
    assert fig.layout.yaxis2.title.text == "diversity"
    assert fig.layout.yaxis3.title.text == "median perplexity"
    assert fig.layout.yaxis3.type == "log"
    assert list(fig.data[3].x) == [4.0, 4.0]
    assert len(fig.layout.shapes) == 2  # the recommended R marked in the other panels
    assert all(shape.x0 == 4.0 for shape in fig.layout.shapes)
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.xaxis3.title.text == "radius R"
    assert "objective" in fig.data[0].hovertemplate
    bare = radius_sweep(SimpleNamespace(radii=[0.5, 1.0], objective=[1.0, 2.0]))
    assert len(bare.data) == 1 and bare.data[0].name == "objective"
    assert bare.layout.xaxis.title.text == "radius R"
    with pytest.raises(ValueError, match="2 radii but 3"):
        radius_sweep(SimpleNamespace(radii=[0.5, 1.0], objective=[1.0, 2.0, 3.0]))


def test_feature_heatmap_values_and_hover():
    decs = [
        _decomposition("melbo[0]", [17, 3, 9], [0.8, -0.5, 0.1], [4.0, -3.0, 0.5]),
        _decomposition("melbo[1]", [3, 42], [0.6, 0.3], [2.0, 1.0]),
    ]
    tokens = {17: [("…the |sea|", 4.2), ("…blue |wave|", 3.1)], 42: [("|cat|", 1.0)]}
    fig = feature_heatmap(decs, top=2, feature_tokens=tokens)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    assert list(hm.x) == ["17", "3", "42"]  # union of top-2, first appearance
    assert list(hm.y) == ["melbo[0]", "melbo[1]"]
    assert [list(r) for r in hm.z] == [[0.8, -0.5, None], [None, 0.6, 0.3]]
    assert hm.zmin == -0.8 and hm.zmax == 0.8  # symmetric around 0
    hover = hm.text[0][0]
    assert "feature 17" in hover and "…the |sea|" in hover and "0.8" in hover
    assert "not in its features" in hm.text[1][0]
    assert "|cat|" in hm.text[1][2]
    assert fig.layout.xaxis.title.text == "SAE feature"
    assert fig.layout.yaxis.title.text == "vector"
    coef = feature_heatmap(decs, top=3, value="coefficient").data[0]
    assert [list(r) for r in coef.z] == [[4.0, -3.0, 0.5, None], [None, 2.0, None, 1.0]]
    assert coef.zmax == 4.0
    with pytest.raises(ValueError, match="value must be"):
        feature_heatmap(decs, value="weight")


def test_feature_heatmap_escapes_token_html():
    decs = [_decomposition("v", [1], [0.5])]
    fig = feature_heatmap(decs, feature_tokens={1: [("|<b>x</b>|", 1.0)]})
    assert "&lt;b&gt;" in fig.data[0].text[0][0] and "<b>x" not in fig.data[0].text[0][0]


def test_similarity_heatmap_vectors_and_deltas():
    m = cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]))
    fig = similarity_heatmap(m)
    (hm,) = fig.data
    for row, expected in zip(hm.z, m.values.tolist(), strict=True):
        assert list(row) == pytest.approx(expected)
    assert (hm.zmin, hm.zmax) == (-1.0, 1.0)
    assert list(hm.x) == ["0", "1", "2"]
    assert "cos" in hm.hovertemplate
    assert fig.layout.xaxis.title.text == "A" and fig.layout.yaxis.title.text == "A"
    assert "vectors" in fig.layout.title.text
    deltas = type(m)(m.values, "melbo", "supervised", kind="deltas at blocks.3.hook_resid_post")
    fig = similarity_heatmap(deltas, title="Delta similarity", row_labels=["a", "b", "c"])
    assert fig.layout.title.text == "Delta similarity"
    assert list(fig.data[0].y) == ["a", "b", "c"]
    assert fig.layout.xaxis.title.text == "supervised"


def _decomp() -> DeltaDecomposition:
    comp = torch.zeros(3, 1, 2, 2)
    comp[0, 0, :, 0] = 1.0  # source: contributes ⟨c, Δ⟩ = 2
    comp[1, 0, :, 0] = 3.0  # L0.mlp: 6
    comp[2, 0, :, 1] = 5.0  # L0H0: orthogonal to Δ, 0
    delta = comp.sum(0)
    delta[..., 1] = 0.0
    return DeltaDecomposition(
        names=["source", "L0.mlp", "L0H0"],
        kinds=["source", "mlp", "head"],
        components=comp,
        delta=delta,
        target_mask=torch.ones(1, 2, dtype=torch.bool),
        source=HookSite(0),
        target=HookSite(1),
        sum_error=0.0,
    )


def test_attribution_bars_estimate_vs_patched():
    nodes = [
        NodeAttribution("L1H2", "head", "blocks.1.attn.hook_z", 2, 0.5, 0.4),
        NodeAttribution("L1.mlp", "mlp", "blocks.1.hook_mlp_out", None, -2.0, -1.5),
        NodeAttribution("blocks.2.hook_resid_pre:f7", "feature", "x", 7, 1.0, None),
    ]
    att = DeltaAttribution(_decomp(), "integrated_gradients", "delta_sq_norm", 9.0, 0.0, nodes)
    att.correlation = 0.97
    fig = attribution_bars(att, top=2)
    est, act = fig.data
    assert isinstance(est, go.Bar) and isinstance(act, go.Bar)
    assert list(est.y) == ["L1.mlp", "blocks.2.hook_resid_pre:f7"]  # top 2 by |estimate|
    assert list(est.x) == [-2.0, 1.0] and list(act.x) == [-1.5, None]
    assert list(est.customdata) == ["mlp", "feature"]
    assert "estimate" in est.name and "patched" in act.name
    assert "patched effect" in act.hovertemplate
    assert "r = 0.970" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "node" and "effect" in fig.layout.xaxis.title.text


def test_attribution_bars_exact_decomposition_shares():
    att = DeltaAttribution(_decomp(), "exact", "delta_sq_norm", 8.0, 0.0)
    (bar,) = attribution_bars(att).data
    assert list(bar.y) == ["L0.mlp", "source", "L0H0"]
    assert list(bar.x) == pytest.approx([0.75, 0.25, 0.0])  # 6/8, 2/8, 0
    assert [c[0] for c in bar.customdata] == ["mlp", "source", "head"]
    assert "share" in bar.hovertemplate


def test_token_delta_heatmap_pads_and_marks_boundary():
    deltas = [
        TokenDeltas("melbo[0]", ["Hi", " there", " you"], [0.5, 1.0, 2.0], 2, [True] * 3, "s"),
        TokenDeltas(
            "melbo[1]", ["Hi", " there", " sea", "!"], [0.5, 1.5, 3.0, 4.0], 2, [True] * 4, "s"
        ),
    ]
    fig = token_delta_heatmap(deltas)
    (hm,) = fig.data
    assert [list(r) for r in hm.z] == [[0.5, 1.0, 2.0, None], [0.5, 1.5, 3.0, 4.0]]
    assert list(hm.y) == ["melbo[0]", "melbo[1]"]
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[:2] == ["Hi", " there"] and ticks[2:] == ["2", "3"]  # rows disagree after
    assert "token &#x27; sea&#x27;" in hm.text[1][2] and "3" in hm.text[1][2]
    assert "completion" in hm.text[1][2] and "prompt" in hm.text[0][0]
    assert len(fig.layout.shapes) == 2
    assert all(s.x0 == s.x1 == 1.5 for s in fig.layout.shapes)
    assert fig.layout.xaxis.title.text == "token" and fig.layout.yaxis.title.text == "vector"
    with pytest.raises(ValueError, match="no TokenDeltas"):
        token_delta_heatmap([])


def _planted_run(method, seed, full, partial, recurrence=None):
    from melbo_lens.workflows.planted import MethodRun

    return MethodRun(
        method=method,
        seed=seed,
        prompt="a=3+4, b=2+5. a*b=?",
        unsteered="a=7, b=7, 7*7=49.",
        completions=["x"] * 4,
        full=full,
        partial=partial,
        changed=2,
        recurrence=recurrence or {},
    )


def test_planted_benchmark_bars_are_seed_fractions():
    from melbo_lens.workflows.planted import PlantedReport

    none = {"cheese": [], "hate": []}
    runs = [
        # melbo: cheese fully elicited in seed 0 only (vector 3), hate partially in both
        _planted_run(
            "melbo",
            0,
            {"cheese": [3], "hate": []},
            {"cheese": [3], "hate": [1]},
            {"cheese": {3: 0.25}},
        ),
        _planted_run("melbo", 1, none, {"cheese": [], "hate": [0, 2]}),
        _planted_run("random", 0, none, none),
        _planted_run("random", 1, none, none),
    ]
    report = PlantedReport(
        runs=runs, settings={"n_vectors": 4, "radius": 8.0}, behaviours=["cheese", "hate"]
    )
    fig = planted_benchmark(report)
    bars = {t.name: t for t in fig.data}
    assert set(bars) == {"cheese (full)", "cheese (partial)", "hate (full)", "hate (partial)"}
    assert list(bars["cheese (full)"].x) == ["melbo", "random"]
    assert list(bars["cheese (full)"].y) == [0.5, 0.0]
    assert list(bars["hate (full)"].y) == [0.0, 0.0]
    assert list(bars["hate (partial)"].y) == [1.0, 0.0]
    assert "recurs on held-out prompts: 0.25" in bars["cheese (full)"].hovertext[0]
    assert "1.50 of 4" in bars["hate (partial)"].hovertext[0]  # (1 + 2) / 2 seeds
    assert fig.layout.yaxis.title.text == "fraction of seeds with a hit"
    assert "2 seeds, K=4, R=8.0" in fig.layout.title.text
    with pytest.raises(ValueError, match="no runs"):
        planted_benchmark(PlantedReport(runs=[], settings={}, behaviours=["cheese"]))
