"""On-manifold vectors (`MelboConfig(on_manifold=k)`): the basis against an independent
SVD, trained vectors entirely inside it in every solver x orthogonality mode (resumed
bit-exactly), random vectors' share at k/d, and the refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import interrupted_then_resumed

from melbo_lens import HookSite, MelboConfig, PromptSet, SteeringVectors, train_steering_vectors
from melbo_lens.methods.manifold import activation_subspace, subspace_share
from melbo_lens.methods.training.objective import OBJECTIVES, reads_logits

TOKENS = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]


def _prompts(model):
    return PromptSet.from_tokens(model, TOKENS, target_positions=slice(None))


def test_basis_is_the_top_right_singular_subspace_of_the_activations(tiny_model):
    prompts = _prompts(tiny_model)
    basis = activation_subspace(tiny_model, prompts, HookSite(1), 5)
    _, cache = tiny_model.run_with_cache(prompts.tokens, attention_mask=prompts.attention_mask)
    rows = [
        cache["blocks.1.hook_resid_post"][i, t].double().numpy()
        for i, row in enumerate(TOKENS)
        for t in range(len(row))
    ]
    _, _, vh = np.linalg.svd(np.stack(rows), full_matrices=False)
    want = vh[:5].T @ vh[:5]  # the projector: independent of the singular vectors' signs
    got = (basis @ basis.T).double().numpy()
    # tol: float32 activations and basis; a projector's entries are at most 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), rtol=0, atol=1e-5)


def test_random_vectors_share_is_k_over_d():
    d, k = 32, 4
    basis = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(1)))[0]
    share = subspace_share(torch.randn(4000, d, generator=torch.Generator().manual_seed(2)), basis)
    # tol: one share is Beta(k/2, (d-k)/2), sd 0.080; the mean of 4000 has sd 0.0013
    assert float(share.mean()) == pytest.approx(k / d, abs=0.006)
    assert float(subspace_share(basis.T * 3.0, basis).min()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "solver,orthogonal",
    list(itertools.product(("amsgrad", "power"), ("sequential", "simultaneous", "soft", "none"))),
)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_on_manifold_vectors_stay_inside_and_resume_exactly(
    tiny_model, tmp_path, solver, orthogonal, objective
):
    if reads_logits(objective):  # the answer [7, 7, 3] after each prompt
        rows = [row + [7, 7, 3] for row in TOKENS]
        positions = [list(range(len(r) - 1, len(r) + 2)) for r in TOKENS]
        prompts = PromptSet.from_tokens(tiny_model, rows, target_positions=positions)
        target = HookSite(3, "resid_post")
    else:
        prompts, target = _prompts(tiny_model), HookSite(3)
    config = MelboConfig(
        HookSite(1),
        target,
        objective=objective,
        n_vectors=3,
        radius=3.0,
        steps=5,
        solver=solver,
        orthogonal=orthogonal,
        on_manifold=6,
        slot_tol=0,
    )
    whole = train_steering_vectors(tiny_model, prompts, config, progress=False)
    assert whole.subspace is not None and whole.subspace.shape == (32, 6)
    basis = activation_subspace(tiny_model, prompts, HookSite(1), 6)
    assert torch.equal(whole.subspace, basis) and whole.metadata["objective"] == objective
    share, norms = subspace_share(whole.vectors, basis), whole.vectors.norm(dim=-1)
    # tol: float32 projection and renormalisation (a share is at most 1)
    torch.testing.assert_close(share, torch.ones(3), atol=1e-5, rtol=0)
    # tol: the same, on norms of 3
    torch.testing.assert_close(norms, torch.full((3,), 3.0), atol=1e-5, rtol=0)
    if orthogonal in ("sequential", "simultaneous"):
        gram = whole.vectors @ whole.vectors.T / 9.0
        # tol: float32 Gram–Schmidt followed by the subspace projection U Uᵀ θ, which
        # rounds again (measured up to 2.8e-5 of a cosine); cosines are at most 1
        torch.testing.assert_close(gram, torch.eye(3), atol=1e-4, rtol=0)
    _, resumed = interrupted_then_resumed(
        train_steering_vectors, tiny_model, prompts, config, tmp_path
    )
    assert torch.equal(resumed.vectors, whole.vectors)
    saved = SteeringVectors.load(whole.save(tmp_path / "done.safetensors"))
    assert torch.equal(saved.subspace, whole.subspace)
    assert torch.equal(saved[1:].subspace, whole.subspace)


def test_the_constraint_costs_objective_and_training_still_raises_it(tiny_model):
    """Inside a 2-dimensional subspace the best vector is no better than the free one
    (it is a restriction), and training raises the objective from its start."""
    prompts = _prompts(tiny_model)
    common = dict(n_vectors=1, radius=3.0, steps=30, orthogonal="none", solver="power")
    free = train_steering_vectors(
        tiny_model, prompts, MelboConfig(HookSite(1), HookSite(3), **common), progress=False
    )
    inside = train_steering_vectors(
        tiny_model,
        prompts,
        MelboConfig(HookSite(1), HookSite(3), on_manifold=2, **common),
        progress=False,
    )
    assert float(inside.objective[0]) <= float(free.objective[0]) * (1 + 1e-4)
    assert float(inside.objective[0]) > float(inside.losses[0, 0])


def test_what_on_manifold_refuses(tiny_model):
    with pytest.raises(ValueError, match="on_manifold must be None or an int >= 1"):
        MelboConfig(on_manifold=0)
    with pytest.raises(ValueError, match="fits at most 2 vectors, got n_vectors=3"):
        MelboConfig(n_vectors=3, on_manifold=2)
    MelboConfig(n_vectors=3, on_manifold=2, orthogonal="soft")  # soft: not a hard bound
    config = MelboConfig(HookSite(1), HookSite(3), n_vectors=1, radius=3.0, on_manifold=30)
    with pytest.raises(ValueError, match="on_manifold must be between 1 and 18"):
        train_steering_vectors(tiny_model, _prompts(tiny_model), config, progress=False)
