"""Baselines: random vectors, Jacobian singular vectors and Hessian eigenvectors checked
against explicit matrices built with torch.autograd.functional on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from melbo_lens import HookSite, MelboConfig, PromptSet, Segment, train_steering_vectors
from melbo_lens.methods.baselines import (
    hessian_vectors,
    jacobian_vectors,
    random_vectors,
    top_eigenpairs,
)
from melbo_lens.methods.objectives import melbo_objective

TOKENS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
SITE_PAIRS = [
    (HookSite(0), HookSite(2)),
    (HookSite(1, "attn_out"), HookSite(3, "resid_mid")),
]


@pytest.fixture(scope="module")
def model64():
    return make_tiny(dtype=torch.float64)


@pytest.fixture(scope="module")
def prompts(model64):
    return PromptSet.from_tokens(model64, TOKENS, target_positions=slice(-3, None))


def assert_same_directions(got: torch.Tensor, expected: torch.Tensor, bound: float = 0.999):
    got = torch.nn.functional.normalize(got.double(), dim=-1)
    expected = torch.nn.functional.normalize(expected.double(), dim=-1)
    cos = (got * expected).sum(-1).abs()
    assert bool((cos > bound).all()), cos


def explicit_jacobian(model, prompts, source, target) -> torch.Tensor:
    seg = Segment(model, source, target, prompts)
    mask = prompts.target_mask

    def f(theta):
        return seg.run(theta[None])[0][mask].flatten()

    return torch.autograd.functional.jacobian(
        f, torch.zeros(model.cfg.d_model, dtype=torch.float64)
    )


def explicit_hessian(model, prompts, source, target, at, power, q) -> torch.Tensor:
    seg = Segment(model, source, target, prompts)

    def f(theta):
        z = seg.run(theta[None])[0]
        return melbo_objective(z, seg.unsteered, prompts.target_mask, power=power, q=q)

    return torch.autograd.functional.hessian(f, at)


@pytest.mark.parametrize("source,target", SITE_PAIRS)
def test_jacobian_vectors_match_explicit_svd(model64, prompts, source, target):
    J = explicit_jacobian(model64, prompts, source, target)
    assert J.shape == (int(prompts.target_mask.sum()) * 32, 32)
    _, S, Vh = torch.linalg.svd(J, full_matrices=False)
    k = 3
    assert bool((S[:k] / S[1 : k + 1] > 1.01).all())  # distinct: vectors are well defined
    sv = jacobian_vectors(model64, prompts, source, target, k=k, radius=3.0)
    assert sv.method == "jacobian" and sv.site == source and sv.target == target
    torch.testing.assert_close(sv.radius, torch.full((k,), 3.0))
    sigma = torch.tensor(sv.metadata["singular_values"], dtype=torch.float64)
    torch.testing.assert_close(sigma, S[:k], rtol=1e-4, atol=0)
    assert_same_directions(sv.vectors, Vh[:k])
    assert sv.metadata["converged"]
    # objective at a tiny radius is R²σ² (the linearisation)
    small = jacobian_vectors(model64, prompts, source, target, k=2, radius=1e-4)
    torch.testing.assert_close(small.objective.double() / 1e-8, S[:2] ** 2, rtol=1e-3, atol=0)


def test_hessian_vectors_match_explicit_hessian(model64, prompts):
    source, target = SITE_PAIRS[0]
    d = model64.cfg.d_model
    gen = torch.Generator().manual_seed(5)
    at = torch.randn(d, generator=gen, dtype=torch.float64)
    at = 0.7 * at / at.norm()
    cases = [(None, 2.0, 1.0), (at, 4.0, 1.0), (at, 1.5, 2.0), (at, 2.0, 1.0)]
    for point, power, q in cases:
        where = torch.zeros(d, dtype=torch.float64) if point is None else point
        H = explicit_hessian(model64, prompts, source, target, where, power, q)
        evals, evecs = torch.linalg.eigh(H)
        evals, evecs = evals.flip(0), evecs.flip(1).T
        k = 3
        assert bool((evals[:k] - evals[1 : k + 1] > 1e-3 * evals[0].abs()).all())
        sv = hessian_vectors(
            model64, prompts, source, target, k=k, radius=2.0, power=power, q=q, at=point
        )
        got = torch.tensor(sv.metadata["eigenvalues"], dtype=torch.float64)
        torch.testing.assert_close(got, evals[:k], rtol=1e-4, atol=1e-8 * float(evals[0].abs()))
        assert_same_directions(sv.vectors, evecs[:k])
        assert sv.config["power"] == power and sv.config["q"] == q


def test_hessian_equals_jacobian_for_p2(model64, prompts):
    source, target = SITE_PAIRS[1]
    with torch.inference_mode():  # works inside inference_mode too
        h = hessian_vectors(model64, prompts, source, target, k=3, radius=2.0)
    j = jacobian_vectors(model64, prompts, source, target, k=3, radius=2.0)
    torch.testing.assert_close(h.vectors, j.vectors)
    sigma = torch.tensor(j.metadata["singular_values"], dtype=torch.float64)
    lam = torch.tensor(h.metadata["eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(lam, 2 * sigma**2, rtol=1e-9, atol=0)
    torch.testing.assert_close(h.objective, j.objective)


def test_hessian_at_zero_needs_p2_q1(model64, prompts):
    source, target = SITE_PAIRS[0]
    for power, q in ((4.0, 1.0), (1.0, 1.0), (2.0, 2.0)):
        with pytest.raises(ValueError, match="quadratic form only for power=2"):
            hessian_vectors(model64, prompts, source, target, k=2, radius=1.0, power=power, q=q)
    with pytest.raises(ValueError, match="at must be"):
        hessian_vectors(
            model64, prompts, source, target, k=2, radius=1.0, power=4.0, at=torch.zeros(32)
        )


def test_top_eigenpairs_stops_early_and_survives_invariant_subspaces():
    gen = torch.Generator().manual_seed(0)
    d = 300
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    spectrum = 0.8 ** torch.arange(d, dtype=torch.float64)
    A = (q * spectrum) @ q.T
    vals, vecs, info = top_eigenpairs(lambda v: v @ A, d, 5, tol=1e-8)
    torch.testing.assert_close(vals, spectrum[:5], rtol=1e-7, atol=0)
    assert_same_directions(vecs, q[:, :5].T, 1 - 1e-8)
    assert info["converged"] and info["matvecs"] < d / 3
    # rank 2 operator, 4 wanted: the Krylov space is invariant after one block
    low = (q[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q[:, :2].T
    vals, vecs, info = top_eigenpairs(lambda v: v @ low, d, 4, tol=1e-10)
    torch.testing.assert_close(vals, torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert info["converged"]


def test_random_vectors_norms_orthogonality_seeds(tiny_model):
    sv = random_vectors(tiny_model, HookSite(1), n=6, radius=2.5, seed=3)
    assert sv.method == "random" and sv.vectors.shape == (6, 32)
    torch.testing.assert_close(sv.radius, torch.full((6,), 2.5))
    gram = sv.vectors @ sv.vectors.T
    # tol: Gram entries are O(R²)=6.25; the rerun is bit-exact
    torch.testing.assert_close(gram, 6.25 * torch.eye(6), atol=1e-5, rtol=0)
    again = random_vectors(tiny_model, HookSite(1), n=6, radius=2.5, seed=3)
    # tol: Gram entries are O(R²)=6.25; the rerun is bit-exact
    torch.testing.assert_close(again.vectors, sv.vectors, atol=0, rtol=0)
    other = random_vectors(tiny_model, HookSite(1), n=6, radius=2.5, seed=4)
    assert (other.vectors - sv.vectors).abs().max() > 0.1
    loose = random_vectors(tiny_model, HookSite(1), n=6, radius=2.5, seed=3, orthogonal=False)
    off = (loose.vectors @ loose.vectors.T - 6.25 * torch.eye(6)).abs().max()
    assert off > 0.1  # independent Gaussian draws are not orthogonal
    with pytest.raises(ValueError, match="mutually orthogonal"):
        random_vectors(tiny_model, HookSite(1), n=33, radius=1.0)


def test_random_vectors_are_melbos_starting_point(tiny_model):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    cfg = MelboConfig(
        HookSite(0), HookSite(2), n_vectors=4, radius=2.0, steps=0, seed=7, starts_per_vector=1
    )
    start = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    rand = random_vectors(tiny_model, HookSite(0), n=4, radius=2.0, seed=7)
    torch.testing.assert_close(rand.vectors, start.vectors, atol=1e-5, rtol=1e-5)
