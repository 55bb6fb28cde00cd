"""Similarity of vector sets: cosines, principal angles, nearest matches, deltas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from melbo_lens.analysis.similarity import (
    compare_vectors,
    cosine_matrix,
    delta_similarity,
    nearest_matches,
    principal_angles,
)
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors, steer

S = 1 / math.sqrt(2)


def test_cosine_matrix_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [1.0, -1.0]])
    cm = cosine_matrix(a, b)
    expected = torch.tensor([[0.0, -1.0, S], [S, -S, 0.0]], dtype=torch.float64)
    # tol: cosines and angles are O(1) by construction
    torch.testing.assert_close(cm.values, expected, atol=1e-12, rtol=0)
    assert cm.summary()["max_abs"] == pytest.approx(1.0)
    assert cm.summary()["mean_abs"] == pytest.approx((1 + 3 * S) / 6)
    same = cosine_matrix(a)  # the diagonal (all 1) is left out of the summary
    assert same.summary()["mean_abs"] == pytest.approx(S)
    assert "mean |cos| 0.707" in str(same)
    json.dumps(cm.to_dict())


def test_principal_angles_identical_orthogonal_and_by_hand(rng):
    a = torch.randn(3, 10, generator=rng, dtype=torch.float64)
    mixed = torch.randn(3, 3, generator=rng, dtype=torch.float64) @ a  # same span
    # tol: cosines and angles are O(1) by construction
    torch.testing.assert_close(
        principal_angles(a, mixed).angles, torch.zeros(3, dtype=torch.float64), atol=1e-7, rtol=0
    )
    eye = torch.eye(6)
    ortho = principal_angles(eye[:2], eye[2:5])
    torch.testing.assert_close(ortho.angles, torch.full((2,), math.pi / 2, dtype=torch.float64))
    # Planes sharing e1, the second axes at angle t; tiny t checks atan2 beats arccos.
    for t in (1e-6, 0.3, 1.2):
        b = torch.tensor([[1.0, 0, 0, 0], [0, math.cos(t), math.sin(t), 0]], dtype=torch.float64)
        pa = principal_angles(eye[:2, :4], b)
        torch.testing.assert_close(
            pa.angles, torch.tensor([0.0, t], dtype=torch.float64), atol=1e-12, rtol=1e-9
        )
    # Ranks differ: one angle; a repeated vector does not add a dimension.
    line = torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [2.0, 2.0, 0, 0, 0, 0]])
    pa = principal_angles(line, eye[:3])
    assert (pa.rank_a, pa.rank_b) == (1, 3)
    # tol: cosines and angles are O(1) by construction
    torch.testing.assert_close(pa.angles, torch.zeros(1, dtype=torch.float64), atol=1e-7, rtol=0)
    assert "rank 1" in str(pa)


def test_nearest_match_recovers_a_permutation_and_signs(rng):
    a = torch.randn(6, 16, generator=rng)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    b = signs[:, None] * a[perm] * torch.linspace(0.5, 3.0, 6)[:, None]  # b[j] = ±c·a[perm[j]]
    nm = nearest_matches(a, SteeringVectors(b, HookSite(1), method="copy"))
    inverse = torch.argsort(perm)
    assert nm.index == inverse.tolist()
    assert nm.sign == [int(signs[j]) for j in inverse]
    assert all(abs(abs(c) - 1) < 1e-6 for c in nm.cosine)
    assert nm.one_to_one and "copy" in nm.table()


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return PromptSet.from_tokens(
        tiny_model, [[1, 5, 9, 13, 17], [2, 4, 8]], target_positions=slice(-2, None)
    )


def test_delta_similarity_of_a_vector_with_itself_is_one(tiny_model, prompts, rng):
    sv = SteeringVectors(
        4.0 * torch.randn(3, 32, generator=rng), HookSite(0), target=HookSite(2, "resid_pre")
    )
    dm = delta_similarity(tiny_model, prompts, sv)
    torch.testing.assert_close(dm.values.diagonal(), torch.ones(3, dtype=torch.float64))
    # Off the diagonal: deltas by hand, full model, masked to the target positions.
    target = "blocks.2.hook_resid_pre"
    attn = prompts.attention_mask.long()
    _, base = tiny_model.run_with_cache(prompts.tokens, attention_mask=attn, names_filter=target)
    deltas = []
    for v in sv.vectors:
        with steer(tiny_model, sv.site, v):
            _, c = tiny_model.run_with_cache(
                prompts.tokens, attention_mask=attn, names_filter=target
            )
        deltas.append((c[target] - base[target])[prompts.target_mask].flatten())
    d = torch.nn.functional.normalize(torch.stack(deltas), dim=-1)
    # tol: cosines and angles are O(1) by construction
    torch.testing.assert_close(dm.values.float(), d @ d.T, atol=1e-5, rtol=0)


def test_compare_vectors_prints_every_section(tiny_model, prompts, rng):
    a = SteeringVectors(torch.randn(3, 32, generator=rng), HookSite(0), target=HookSite(2))
    b = SteeringVectors(torch.randn(2, 32, generator=rng), HookSite(1), target=HookSite(2))
    cmp = compare_vectors(a, b, model=tiny_model, prompts=prompts, labels=("run1", "run2"))
    text = str(cmp)
    for part in ("cosine similarity of vectors", "nearest match", "principal angles", "deltas at"):
        assert part in text
    assert cmp.deltas is not None and cmp.deltas.values.shape == (3, 2)
    json.dumps(cmp.to_dict())
    assert compare_vectors(a, b).deltas is None
    with pytest.raises(ValueError, match="site="):
        delta_similarity(tiny_model, prompts, torch.randn(32), target=HookSite(2))
