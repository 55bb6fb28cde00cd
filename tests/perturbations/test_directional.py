"""Interventions: directional ablation, weight orthogonalisation, clamping, arithmetic."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, residual_stream_sites
from melbo_lens.perturbations.arithmetic import add_vectors, scale_sweep, subtract_vectors
from melbo_lens.perturbations.directional import (
    ablate_direction,
    clamp_direction,
    direction_basis,
    mean_projection,
)
from melbo_lens.perturbations.orthogonalize import orthogonalize_weights
from melbo_lens.perturbations.vectors import SteeringVectors, steer

TOKENS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 8, 16, 32, 3]])


def _stream_names(model) -> list[str]:
    return [s.name for s in residual_stream_sites(model)]


def _projections(model, r: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(x·r̂, ||x||) per position at every residual-stream site."""
    names = _stream_names(model)
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: n in names)
    unit = r / r.norm()
    return {n: (cache[n] @ unit, cache[n].norm(dim=-1)) for n in names}


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def _direction(model, seed: int = 0, k: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.d_model,) if k is None else (k, model.cfg.d_model)
    return torch.randn(shape, generator=g)


# ---------------------------------------------------------------------- ablation
def test_ablation_zeroes_the_projection_at_every_stream_site(tiny_model):
    r = _direction(tiny_model)
    before = _projections(tiny_model, r)
    # The direction is really present beforehand, so the check below can fail.
    assert all((p.abs() > 1e-2 * n).any() for p, n in before.values())
    with ablate_direction(tiny_model, r):
        after = _projections(tiny_model, r)
    assert len(after) == 3 * tiny_model.cfg.n_layers
    for name, (proj, norm) in after.items():
        assert (proj.abs() < 1e-5 * norm).all(), name
    assert _no_hooks_left(tiny_model)


def test_ablating_several_directions_removes_their_span(tiny_model):
    rs = _direction(tiny_model, seed=1, k=3)
    with ablate_direction(tiny_model, rs):
        for r in (rs[0], rs[2], rs[0] - 2 * rs[1]):
            for name, (proj, norm) in _projections(tiny_model, r).items():
                assert (proj.abs() < 1e-5 * norm).all(), name


def test_ablation_at_chosen_sites_only(tiny_model):
    r = _direction(tiny_model)
    with ablate_direction(tiny_model, r, sites=[HookSite(1, "resid_mid")]):
        after = _projections(tiny_model, r)
    proj, norm = after["blocks.1.hook_resid_mid"]
    assert (proj.abs() < 1e-5 * norm).all()
    proj, norm = after["blocks.1.hook_resid_post"]  # the MLP writes r back
    assert (proj.abs() > 1e-3 * norm).any()


def test_hooks_are_removed_even_when_the_body_raises(tiny_model):
    r = _direction(tiny_model)
    base = tiny_model(TOKENS)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_direction(tiny_model, r):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with clamp_direction(tiny_model, r, 1.0, sites=HookSite(2)):
            raise RuntimeError("boom")
    assert _no_hooks_left(tiny_model)
    assert torch.equal(tiny_model(TOKENS), base)


def test_zero_or_dependent_directions_are_refused(tiny_model):
    d = tiny_model.cfg.d_model
    with pytest.raises(ValueError, match="zero or linearly dependent"):
        direction_basis(torch.zeros(d), d)
    r = _direction(tiny_model)
    with pytest.raises(ValueError, match="linearly dependent"):
        direction_basis(torch.stack([r, 2 * r]), d)
    with pytest.raises(ValueError, match="d_model=32"):
        direction_basis(torch.ones(d + 1), d)


# ---------------------------------------------------------------------- weights
CONFIGS = {
    "LN": dict(normalization_type="LN"),
    "RMS+gated+W_pos": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        positional_embedding_type="standard",
    ),
    "no-norm": dict(normalization_type=None),
    "parallel": dict(normalization_type="LN", parallel_attn_mlp=True),
    "attn-only": dict(normalization_type="LN", attn_only=True),
    "folded-LNPre": dict(normalization_type="LN", positional_embedding_type="standard"),
}


def _random_biases(model, seed: int = 7):
    """TransformerLens initialises biases to zero; a projection forgotten on b_O or
    b_out would then go unnoticed, so give every bias (LayerNorm's too) a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_orthogonalised_weights_give_the_hook_version_logits(name):
    model = _random_biases(make_tiny(**CONFIGS[name]))
    if name == "folded-LNPre":
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        assert model.cfg.normalization_type == "LNPre"
    r = _direction(model, seed=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(TOKENS)
    with ablate_direction(model, r):
        hooked = model(TOKENS)
    edited = orthogonalize_weights(model, r)
    weighted = edited(TOKENS)
    # fp32: the two versions differ only in rounding order (P(x+a) vs x+Pa); logits are
    # O(1) here, and 1e-4 is ~1000 float32 ulps at that size. Measured max error: ~1e-6.
    torch.testing.assert_close(weighted, hooked, atol=1e-4, rtol=1e-4)
    assert (weighted - base).abs().max() > 1e-2  # the ablation does change the output
    # The edited model's stream never contains r, without any hook.
    for site, (proj, norm) in _projections(edited, r).items():
        assert (proj.abs() < 1e-5 * norm).all(), site
    # The original model is untouched.
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(TOKENS), base)


def test_post_norm_models_are_refused_but_hooks_stay_exact():
    model = make_tiny(normalization_type="RMS", use_normalization_before_and_after=True)
    r = _direction(model)
    with pytest.raises(NotImplementedError, match="ablate_direction"):
        orthogonalize_weights(model, r)
    with ablate_direction(model, r):
        for site, (proj, norm) in _projections(model, r).items():
            assert (proj.abs() < 1e-5 * norm).all(), site


def test_copying_inside_a_hooks_block_leaves_both_models_clean(tiny_model):
    r, other = _direction(tiny_model), _direction(tiny_model, seed=3)
    with ablate_direction(tiny_model, other):
        inside = tiny_model(TOKENS)
        edited = orthogonalize_weights(tiny_model, r)
        assert torch.equal(tiny_model(TOKENS), inside)  # the original keeps its hooks
        assert _no_hooks_left(edited)  # the copy does not inherit them
    assert _no_hooks_left(tiny_model)


# ---------------------------------------------------------------------- clamping
def test_clamp_sets_the_projection_at_the_sites_only(tiny_model):
    r = _direction(tiny_model, seed=4)
    sites = [HookSite(1), HookSite(2, "resid_mid")]
    with clamp_direction(tiny_model, r, 2.5, sites=sites):
        after = _projections(tiny_model, r)
    for site in sites:
        proj, norm = after[site.name]
        # tol: absolute, scaled by the largest residual norm
        torch.testing.assert_close(proj, torch.full_like(proj, 2.5), atol=1e-5 * norm.max(), rtol=0)
    proj, _ = after["blocks.0.hook_resid_post"]  # upstream: untouched
    assert (proj - 2.5).abs().max() > 1e-2
    # A per-position value broadcasts over [batch, pos].
    values = torch.arange(TOKENS.shape[1], dtype=torch.float32)
    with clamp_direction(tiny_model, r, values, sites=HookSite(3, "resid_pre")):
        proj, norm = _projections(tiny_model, r)["blocks.3.hook_resid_pre"]
    # tol: absolute, scaled by the largest residual norm
    torch.testing.assert_close(proj, values.expand_as(proj), atol=1e-5 * norm.max(), rtol=0)


def test_clamp_needs_one_direction(tiny_model):
    with pytest.raises(ValueError, match="one direction"):
        with clamp_direction(tiny_model, _direction(tiny_model, k=2), 0.0, sites=HookSite(1)):
            pass


def test_mean_projection_matches_a_hand_computation(tiny_model):
    r = _direction(tiny_model, seed=5)
    prompts = PromptSet.from_tokens(
        tiny_model, [[1, 5, 9, 13], [2, 4, 8]], target_positions=slice(-2, None)
    )
    site = HookSite(2, "resid_mid")
    _, cache = tiny_model.run_with_cache(
        prompts.tokens, attention_mask=prompts.attention_mask.long(), names_filter=site.name
    )
    x = cache[site.name]
    unit = r / r.norm()
    rows = [x[0, 2] @ unit, x[0, 3] @ unit, x[1, 1] @ unit, x[1, 2] @ unit]
    assert mean_projection(tiny_model, prompts, r, site) == pytest.approx(
        float(sum(rows) / 4), abs=1e-5
    )
    every = float((x[prompts.attention_mask] @ unit).mean())
    assert mean_projection(tiny_model, prompts, r, site, positions="all") == pytest.approx(
        every, abs=1e-5
    )


# ---------------------------------------------------------------------- arithmetic
def test_add_and_subtract_vectors_broadcast_and_record_provenance():
    a = SteeringVectors(torch.eye(3)[:2] * 2.0, HookSite(1), method="melbo")
    b = SteeringVectors(torch.tensor([[0.0, 0.0, 1.0]]), HookSite(1), method="mean-diff")
    s = add_vectors(a, b, alpha=3.0)
    assert s.vectors.tolist() == [[2.0, 0.0, 3.0], [0.0, 2.0, 3.0]]
    assert s.site == HookSite(1) and s.method == "arithmetic"
    assert s.config["op"] == "add" and s.config["b"] == "mean-diff"
    d = subtract_vectors(a, a)
    assert torch.equal(d.vectors, torch.zeros(2, 3)) and d.config["op"] == "subtract"
    assert subtract_vectors(b, a).vectors.tolist() == [[-2.0, 0.0, 1.0], [0.0, -2.0, 1.0]]
    with pytest.raises(ValueError, match="different sites"):
        add_vectors(a, SteeringVectors(torch.ones(1, 3), HookSite(2)))
    with pytest.raises(ValueError, match="same number of vectors"):
        add_vectors(a, torch.ones(3, 3))


def test_scale_sweep_matches_single_runs(tiny_model):
    vectors = SteeringVectors(4.0 * _direction(tiny_model, seed=6, k=3), HookSite(1))
    prompts = PromptSet.from_tokens(tiny_model, TOKENS.tolist(), target_positions=slice(-2, None))
    sweep = scale_sweep(tiny_model, vectors, prompts, [0.0, 1.0, 3.0], tokens=[7, 9], max_rows=4)
    assert sweep.kl.shape == (3, 3)
    assert torch.equal(sweep.kl[:, 0], torch.zeros(3))
    assert torch.equal(sweep.top1_changed[:, 0], torch.zeros(3))
    assert (sweep.kl[:, 2] > sweep.kl[:, 0]).all()
    # Vector 2 at scale 3, one at a time, by hand.
    mask = prompts.target_mask
    base = tiny_model(TOKENS)[mask].log_softmax(-1)
    with steer(tiny_model, HookSite(1), vectors.vectors[2], scale=3.0):
        lp = tiny_model(TOKENS)[mask].log_softmax(-1)
    kl = (base.exp() * (base - lp)).sum(-1).mean()
    assert float(sweep.kl[2, 2]) == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    change = (lp[:, [7, 9]].logsumexp(-1) - base[:, [7, 9]].logsumexp(-1)).mean()
    assert float(sweep.logprob_change[2, 2]) == pytest.approx(float(change), abs=1e-5)
    assert "vector 2" in str(sweep) and sweep.to_dict()["scales"] == [0.0, 1.0, 3.0]
    # A bare direction needs its site.
    with pytest.raises(ValueError, match="needs site"):
        scale_sweep(tiny_model, vectors.vectors[0], prompts, [1.0])
    one = scale_sweep(tiny_model, vectors.vectors[2], prompts, [3.0], site=HookSite(1))
    assert float(one.kl[0, 0]) == pytest.approx(float(sweep.kl[2, 2]), rel=1e-4, abs=1e-6)
