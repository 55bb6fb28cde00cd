"""Choosing R: the recommendation rule by hand, and a sweep on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from melbo_lens.analysis.diversity import fluency
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.melbo import MelboConfig
from melbo_lens.workflows.radius import RadiusSweep, recommend_radius, select_radius

torch.set_num_threads(1)


def char_embed(texts):
    """Fake sentence embedder: character counts over a small alphabet (+1 to avoid 0)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz .,!?0123456789"
    return torch.tensor([[t.count(c) for c in alphabet] + [1] for t in texts], dtype=torch.float)


# ------------------------------------------------------------------------- the rule
def test_recommend_highest_diversity_before_collapse():
    radii = [1, 2, 4, 8, 16]
    div = [0.1, 0.4, 0.3, 0.9, 0.95]
    flu = [2.0, 2.5, 3.9, 8.1, 50.0]  # bound 2 x 4 = 8: collapses at R = 8
    assert recommend_radius(radii, div, flu, 4.0, 2.0) == 2  # not 4: diversity dropped there
    assert recommend_radius(radii, div, flu, 4.0, 2.1) == 8  # bound 8.4 admits R = 8
    assert recommend_radius(radii, div, flu, 4.0, 100.0) == 16


def test_recommend_stops_at_first_collapse_even_if_later_recovers():
    # R = 4 collapses (nan counts too); R = 8 is fluent again but comes after a collapse.
    assert recommend_radius([1, 2, 4, 8], [0.1, 0.2, 0.5, 0.9], [1, 1, 99, 1], 1.0, 3.0) == 2
    assert recommend_radius([1, 2, 4], [0.1, 0.2, 0.9], [1, math.nan, 1], 1.0, 3.0) == 1
    assert recommend_radius([1, 2], [0.1, 0.3], [9.0, 9.0], 2.0, 2.0) is None


def test_recommend_scans_radii_in_order_ties_and_repetition():
    # unsorted input: sorted is 1 (div .5), 2 (div .5), 4 (collapsed)
    assert recommend_radius([4, 2, 1], [0.9, 0.5, 0.5], [9.0, 1.0, 1.0], 1.0, 2.0) == 1
    rep = [0.0, 0.1, 0.6]
    args = ([1, 2, 4], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 1.0, 2.0)
    assert recommend_radius(*args, repetition=rep) == 4
    assert recommend_radius(*args, repetition=rep, repetition_limit=0.5) == 2
    with pytest.raises(ValueError, match="one value per radius"):
        recommend_radius([1, 2], [0.1], [1.0, 1.0], 1.0, 2.0)


def _hand_sweep() -> RadiusSweep:
    return RadiusSweep(
        radii=[2.0, 4.0, 8.0],
        objective=[1.0, 4.0, 16.0],
        diversity=[0.05, 0.30, 0.60],
        fluency=[3.0, 5.0, 40.0],
        repetition=[0.0, 0.1, 0.7],
        recommended=None,
        baseline_fluency=2.0,
        fluency_limit=3.0,
        completions=[[["a"], ["b"]], [["c"], ["d"]], [["e"], ["f"]]],
        unsteered=["u"],
        prompts=["p"],
    )


def test_radius_sweep_recommendation_table_and_round_trip():
    sweep = _hand_sweep()
    assert sweep.recompute() == 4.0 and sweep.recommended == 4.0  # 40 > 3 x 2 collapses
    assert sweep.recompute(fluency_limit=25.0) == 8.0
    sweep.recompute(fluency_limit=3.0)
    table = sweep.table()
    lines = table.splitlines()
    assert "<- recommended" in lines[2] and "collapsed" in lines[3]
    assert "recommended R = 4.0" in lines[-1]
    back = RadiusSweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert back.to_dict() == sweep.to_dict()
    with pytest.raises(ValueError, match="unknown RadiusSweep fields"):
        RadiusSweep.from_dict({**sweep.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="diversity has 2 values for 3 radii"):
        RadiusSweep(**{**sweep.to_dict(), "diversity": [0.1, 0.2]})


# ------------------------------------------------------------------------- the sweep
CFG = MelboConfig(HookSite(1), HookSite(3), n_vectors=3, steps=15, seed=0)
PROMPTS = ["hello there", "what is two plus two?"]


@pytest.fixture(scope="module")
def sweep(tiny_tok_model):
    ps = PromptSet.from_texts(tiny_tok_model, PROMPTS)
    radii = [8.0, 1e-4, 2.0, 0.5]  # unsorted on purpose
    return select_radius(
        tiny_tok_model,
        ps,
        CFG,
        radii,
        max_new_tokens=6,
        fluency_limit=1.5,
        embed=char_embed,
        keep_vectors=True,
        progress=False,
    )


def test_sweep_shapes_and_objective_grows_with_radius(sweep):
    assert sweep.radii == [1e-4, 0.5, 2.0, 8.0]
    assert len(sweep.completions) == 4
    assert all(len(c) == CFG.n_vectors and len(c[0]) == len(PROMPTS) for c in sweep.completions)
    assert len(sweep.unsteered) == len(PROMPTS)
    # Planted: the best change at the target grows with the push at the source.
    assert all(a < b for a, b in zip(sweep.objective, sweep.objective[1:], strict=False))
    for k, vectors in enumerate(sweep.vectors):
        assert torch.allclose(vectors.vectors.norm(dim=-1), torch.full((3,), sweep.radii[k]))
        assert sweep.objective[k] == pytest.approx(float(vectors.objective.mean()))


def test_negligible_radius_reproduces_unsteered(sweep, tiny_tok_model):
    # R = 1e-4 cannot flip a greedy token here: every vector completes like the unsteered
    # model, so diversity is 0 and fluency equals the unsteered baseline exactly.
    assert all(c == sweep.unsteered for c in sweep.completions[0])
    assert sweep.diversity[0] == pytest.approx(0.0, abs=1e-12)
    assert sweep.variance[0] == pytest.approx(0.0, abs=1e-12)
    assert sweep.fluency[0] == pytest.approx(sweep.baseline_fluency)
    ps = PromptSet.from_texts(tiny_tok_model, PROMPTS)
    baseline = sorted(fluency(tiny_tok_model, ps, sweep.unsteered))
    assert sweep.baseline_fluency == pytest.approx(sum(baseline) / 2)  # median of two
    # A large radius changes the text.
    assert sweep.completions[-1] != [sweep.unsteered] * CFG.n_vectors
    assert sweep.diversity[-1] > 0


def test_sweep_recommendation_follows_the_rule(sweep):
    expected = recommend_radius(
        sweep.radii, sweep.diversity, sweep.fluency, sweep.baseline_fluency, 1.5
    )
    assert sweep.recommended == expected
    assert sweep.recommended is not None  # R = 1e-4 is always admissible (ratio 1)
    data = json.loads(json.dumps(sweep.to_dict()))
    assert data["radii"] == sweep.radii and "vectors" not in data
    assert data["settings"]["config"]["n_vectors"] == 3


def test_select_radius_input_errors(tiny_tok_model):
    ps = PromptSet.from_texts(tiny_tok_model, PROMPTS)
    one = MelboConfig(HookSite(1), HookSite(3), n_vectors=1, steps=1)
    with pytest.raises(ValueError, match="n_vectors >= 2"):
        select_radius(tiny_tok_model, ps, one, [1.0], embed=char_embed, progress=False)
    with pytest.raises(ValueError, match="radii must be"):
        select_radius(tiny_tok_model, ps, CFG, [1.0, -2.0], embed=char_embed, progress=False)
    with pytest.raises(TypeError, match="PromptSet"):
        select_radius(tiny_tok_model, PROMPTS, CFG, [1.0], embed=char_embed, progress=False)


# ------------------------------------------------------------------------- the command
@pytest.mark.integration
def test_sweep_command_on_smollm2(tmp_path, capsys):
    from melbo_lens.cli import main

    argv = ["sweep", "--radii", "64,1", "--n-vectors", "2", "--steps", "3"]
    argv += ["--max-new-tokens", "6", "--prompt", "How can I tame a wolf?"]
    argv += ["--out", str(tmp_path), "--quiet", "--save-vectors"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended R =" in out and "objective" in out
    data = json.loads((tmp_path / "sweep.json").read_text())
    sweep = RadiusSweep.from_dict(data)
    assert sweep.radii == [1.0, 64.0]
    assert sweep.objective[0] < sweep.objective[1]
    assert len(sweep.completions[1]) == 2 and len(sweep.unsteered) == 1
    assert (tmp_path / "radius_64.safetensors").exists()
    assert (tmp_path / "radius_1.safetensors").exists()
