"""Adapter normalisation variants ("frobenius", "spectral" next to unit "columns"):
the applied edit against a hand computation with full matrices, its norm equal to R in
the named norm, training in every solver x orthogonality mode (resumed bit-exactly), and
save/load."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import interrupted_then_resumed

from melbo_lens import HookSite, PromptSet
from melbo_lens.core.sites import mlp_hidden_name
from melbo_lens.methods.adapters import AdapterConfig, train_steering_adapters
from melbo_lens.methods.training.objective import OBJECTIVES, reads_logits
from melbo_lens.perturbations.adapter_norms import edit_norm
from melbo_lens.perturbations.adapters import SteeringAdapters

TOKENS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]


def _full_norm(matrix: torch.Tensor, normalization: str) -> torch.Tensor:
    """The matrix norm from the full d_mlp x d_model matrix (independent of the r x r path)."""
    if normalization == "columns":
        return torch.tensor(1.0, dtype=matrix.dtype)
    if normalization == "frobenius":
        return matrix.pow(2).sum().sqrt()
    return torch.linalg.svdvals(matrix)[0]


@pytest.mark.parametrize("normalization", ["columns", "frobenius", "spectral"])
def test_the_applied_edit_is_the_hand_computed_one(tiny_model, normalization):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 64, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 32, 3, generator=gen, dtype=torch.float64)
    radius = 2.5
    adapters = SteeringAdapters(
        a.float(), b.float(), layer=1, radius=radius, normalization=normalization
    )
    tokens = torch.tensor([[1, 2, 3, 4]])
    _, cache = tiny_model.run_with_cache(tokens)
    h = cache[mlp_hidden_name(1)][0].double()  # [pos, d_mlp]
    for j in range(2):
        product = a[j] @ b[j].T
        delta_w = radius * product / _full_norm(product, normalization)
        if normalization != "columns":  # ||ΔW|| = R in the named norm
            assert float(_full_norm(delta_w, normalization)) == pytest.approx(radius, rel=1e-9)
        # tol: float32 factors and hooks against float64 full matrices
        torch.testing.assert_close(
            adapters.weight_deltas()[j].double(), delta_w, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            adapters.norms[j].double(), delta_w.pow(2).sum().sqrt(), rtol=1e-5, atol=0
        )
        with adapters.apply(tiny_model, j):
            _, steered = tiny_model.run_with_cache(tokens)
        got = (steered["blocks.1.hook_mlp_out"] - cache["blocks.1.hook_mlp_out"])[0].double()
        torch.testing.assert_close(got, h @ delta_w, rtol=1e-4, atol=1e-5)


def test_edit_norm_matches_full_matrices_in_float64():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(4, 20, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 12, 3, generator=gen, dtype=torch.float64)
    for normalization in ("frobenius", "spectral"):
        want = torch.stack([_full_norm(a[j] @ b[j].T, normalization) for j in range(4)])
        torch.testing.assert_close(edit_norm(a, b, normalization), want, rtol=1e-12, atol=0)


VARIANTS = {  # name: (normalization, position_quantile)
    "frobenius": ("frobenius", None),
    "spectral": ("spectral", None),
    "sparse": ("columns", 0.5),
}
# sparse adapters act on about half the tokens; longer prompts keep every prompt's change
# non-zero (a prompt the adapter leaves alone has no delta, and a consistency cosine of 0)
LONG = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21]]


@pytest.mark.parametrize(
    "variant,solver,orthogonal",
    list(
        itertools.product(
            VARIANTS,
            ("amsgrad", "power"),
            ("sequential", "simultaneous", "soft", "none"),
        )
    ),
)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_variants_train_and_resume_exactly(
    tiny_model, tmp_path, variant, solver, orthogonal, objective
):
    normalization, quantile = VARIANTS[variant]
    tokens = TOKENS if quantile is None else LONG
    if reads_logits(objective):  # the answer [7, 7, 3] after each prompt
        rows = [row + [7, 7, 3] for row in tokens]
        positions = [list(range(len(r) - 1, len(r) + 2)) for r in tokens]
        prompts = PromptSet.from_tokens(tiny_model, rows, target_positions=positions)
    else:
        prompts = PromptSet.from_tokens(tiny_model, tokens, target_positions=slice(None))
    config = AdapterConfig(
        1,
        HookSite(3, "resid_post") if reads_logits(objective) else HookSite(3),
        objective=objective,
        n_adapters=2,
        rank=2,
        radius=2.0,
        steps=5,
        solver=solver,
        orthogonal=orthogonal,
        normalization=normalization,
        position_quantile=quantile,
    )
    whole = train_steering_adapters(tiny_model, prompts, config, progress=False)
    assert whole.normalization == normalization
    assert whole.complete and bool(torch.isfinite(whole.objective).all())
    assert (whole.thresholds is None) == (quantile is None)
    deltas = whole.weight_deltas().double()
    for j in range(2 if normalization != "columns" else 0):
        # tol: float32 factors; the norm is fixed by construction
        assert float(_full_norm(deltas[j], normalization)) == pytest.approx(2.0, rel=1e-5)
    if orthogonal in ("sequential", "simultaneous"):  # Ω_B columns of the two adapters
        cross = whole.omega_b[0].T @ whole.omega_b[1]
        # tol: float32 Gram–Schmidt of unit-scale columns
        torch.testing.assert_close(cross, torch.zeros(2, 2), atol=1e-5, rtol=0)
    _, resumed = interrupted_then_resumed(
        train_steering_adapters, tiny_model, prompts, config, tmp_path
    )
    assert torch.equal(resumed.omega_a, whole.omega_a)
    assert torch.equal(resumed.omega_b, whole.omega_b)
    if quantile is not None:
        assert torch.equal(resumed.thresholds, whole.thresholds)
    loaded = SteeringAdapters.load(whole.save(tmp_path / "done.safetensors"))
    assert loaded.normalization == normalization
    assert torch.equal(loaded.weight_deltas(), whole.weight_deltas())


def test_training_raises_the_objective_under_each_normalisation(tiny_model):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS, target_positions=slice(None))
    for normalization in ("frobenius", "spectral"):
        config = AdapterConfig(
            1, HookSite(3), n_adapters=1, rank=2, radius=2.0, steps=40, normalization=normalization
        )
        out = train_steering_adapters(tiny_model, prompts, config, progress=False)
        assert float(out.objective[0]) > 1.05 * float(out.losses[0, 0]), normalization


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization must be one of"):
        AdapterConfig(1, HookSite(3), normalization="nuclear")
    a, b = torch.ones(1, 4, 1), torch.ones(1, 3, 1)
    with pytest.raises(ValueError, match="normalization must be one of"):
        SteeringAdapters(a, b, layer=0, radius=1.0, normalization="l1")


# ---------------------------------------------------------------------- sparse positions
def test_sparse_positions_apply_the_hand_computed_masked_edit(tiny_model):
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(2, 64, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 32, 2, generator=gen, dtype=torch.float64)
    tau = torch.tensor([[0.5, 1.0], [2.0, 0.1]], dtype=torch.float64)
    adapters = SteeringAdapters(a.float(), b.float(), layer=1, radius=1.5, thresholds=tau.float())
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    _, cache = tiny_model.run_with_cache(tokens)
    h = cache[mlp_hidden_name(1)][0].double()
    for j in range(2):
        read = h @ a[j]  # [pos, r]
        kept = read * (read.abs() > tau[j])
        assert 0 < int((read.abs() > tau[j]).sum()) < read.numel()  # the mask is not trivial
        with adapters.apply(tiny_model, j):
            _, steered = tiny_model.run_with_cache(tokens)
        got = (steered["blocks.1.hook_mlp_out"] - cache["blocks.1.hook_mlp_out"])[0].double()
        # tol: float32 hooks against the float64 hand computation
        torch.testing.assert_close(got, 1.5 * kept @ b[j].T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("orthogonal", ["sequential", "none"])
def test_sparse_adapters_act_on_the_quantiles_share_of_tokens(tiny_model, tmp_path, orthogonal):
    rows = [list(range(1 + i, 13 + i)) for i in range(4)]  # 48 tokens
    prompts = PromptSet.from_tokens(tiny_model, rows, target_positions=slice(None))
    config = AdapterConfig(
        1,
        HookSite(3),
        n_adapters=2,
        rank=2,
        radius=2.0,
        steps=6,
        orthogonal=orthogonal,
        position_quantile=0.75,
    )
    whole = train_steering_adapters(tiny_model, prompts, config, progress=False)
    assert whole.thresholds is not None and whole.thresholds.shape == (2, 2)
    _, cache = tiny_model.run_with_cache(prompts.tokens)
    h = cache[mlp_hidden_name(1)].reshape(-1, 64)
    share = ((h @ whole.omega_a).abs() > whole.thresholds[:, None, :]).float().mean(1)
    # tol: the 0.75-quantile of 48 read-outs leaves 12 of 48 above it (ties aside)
    torch.testing.assert_close(share, torch.full((2, 2), 0.25), atol=1 / 48, rtol=0)
    _, resumed = interrupted_then_resumed(
        train_steering_adapters, tiny_model, prompts, config, tmp_path
    )
    assert torch.equal(resumed.omega_a, whole.omega_a) and torch.equal(
        resumed.thresholds, whole.thresholds
    )
    loaded = SteeringAdapters.load(whole.save(tmp_path / "done.safetensors"))
    assert torch.equal(loaded.thresholds, whole.thresholds)
    assert torch.equal(loaded[1].thresholds, whole.thresholds[1:])
    with pytest.raises(ValueError, match="position_quantile must be None or a number in"):
        AdapterConfig(1, HookSite(3), position_quantile=1.0)
