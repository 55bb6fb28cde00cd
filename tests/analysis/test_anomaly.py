"""Anomaly scoring (`analysis.anomaly`): AUROC and the Ledoit–Wolf Mahalanobis distance
against scikit-learn, a planted anomaly direction scored perfectly and a random score at
chance, and the detector end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from melbo_lens import HookSite, PromptSet, SteeringVectors
from melbo_lens.analysis.anomaly import (
    PerturbationDetector,
    auroc,
    fit_detector,
    last_token_targets,
    mahalanobis_scores,
    seed_interval,
)


def test_auroc_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    neg = torch.randint(0, 5, (55,), generator=gen).double()
    labels = [1] * 40 + [0] * 55
    want = metrics.roc_auc_score(labels, torch.cat([pos, neg]).tolist())
    assert auroc(pos, neg) == pytest.approx(want, rel=1e-12)


def test_mahalanobis_matches_scikit_learns_ledoit_wolf():
    covariance = pytest.importorskip("sklearn.covariance")
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(30, 12, generator=gen, dtype=torch.float64) @ torch.randn(
        12, 12, generator=gen, dtype=torch.float64
    )  # fewer samples than a comfortable estimate needs: shrinkage matters
    x = torch.randn(7, 12, generator=gen, dtype=torch.float64) * 3
    lw = covariance.LedoitWolf().fit(ref.numpy())
    want = torch.from_numpy(lw.mahalanobis(x.numpy())).sqrt()  # sklearn gives squares
    # tol: float64 on both sides; the result is returned in float32
    torch.testing.assert_close(mahalanobis_scores(ref, x).double(), want, rtol=1e-6, atol=0)


def test_a_planted_direction_is_detected_perfectly_and_a_random_score_is_at_chance():
    gen = torch.Generator().manual_seed(2)
    d = 64
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    detector = PerturbationDetector(HookSite(0), torch.zeros(d), direction[None] * 5.0)
    clean = torch.randn(200, d, generator=gen)
    anomalous = torch.randn(200, d, generator=gen) + 6.0 * direction  # the planted push
    scores_a, scores_c = detector.score_deviations(anomalous), detector.score_deviations(clean)
    assert auroc(scores_a, scores_c) == 1.0
    chance = auroc(torch.randn(2000, generator=gen), torch.randn(2000, generator=gen))
    # tol: the AUROC of two 2000-sample null draws has sd ~0.009
    assert chance == pytest.approx(0.5, abs=0.04)


def test_the_detector_flags_activations_pushed_the_way_a_learned_vector_pushes(tiny_tok_model):
    """End to end: the signature of vector 1, fitted on clean prompts, scores prompts run
    with vector 1 applied (planted anomalies) above the same prompts unperturbed."""
    model = tiny_tok_model
    vectors = SteeringVectors(
        torch.randn(3, 32, generator=torch.Generator().manual_seed(3)) * 4, HookSite(1)
    )
    reference = PromptSet.from_texts(model, [f"ref {c}{c}x" for c in "abcdefgh"])
    heldout = PromptSet.from_texts(model, [f"held {c}y" for c in "ijklmnop"])
    target = HookSite(3)
    detector = fit_detector(model, vectors, reference, target)
    assert detector.signatures.shape == (3, 32)
    clean = detector.score(model, heldout)
    pushed = last_token_targets(model, heldout, target, vectors, 1) - detector.reference_mean
    assert auroc(detector.score_deviations(pushed), clean) == 1.0


def test_seed_interval_against_a_hand_computation():
    r = seed_interval([0.8, 0.9, 1.0, 0.9, 0.85])
    mean, sd = 0.89, 0.0741619848709566  # sample sd of the five values
    assert r["mean"] == pytest.approx(mean)
    assert r["high"] - r["mean"] == pytest.approx(2.776 * sd / 5**0.5, rel=1e-6)
    assert (r["min"], r["max"], r["n"]) == (0.8, 1.0, 5)
