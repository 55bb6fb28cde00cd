"""The seeds' claims tested on the backdoored SmolLM2 (`melbo-lens evaluate miss |
finetune | features`): each scoring function against a hand computation or planted
truth on a tiny model, each committed page against its committed JSON, bad flags refused
before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from planted import planted_model

from melbo_lens import HookSite, PromptSet, SteeringVectors
from melbo_lens.analysis.deltas import perturbation_objectives
from melbo_lens.workflows.features_study import match_kl, mean_kl
from melbo_lens.workflows.miss_study import _ranks, choose, verdict

RESULTS = Path(__file__).resolve().parents[2] / "results"


@pytest.mark.parametrize(
    ("folder", "name", "page"),
    [
        ("cheese_miss", "miss", "melbo_lens.workflows.miss_study:miss_page"),
        ("finetune_traces", "finetune", "melbo_lens.workflows.finetune_study:finetune_page"),
        ("features_vs_vectors", "features", "melbo_lens.workflows.features_study:features_page"),
        ("adapters_backdoored", "planted", "melbo_lens.workflows.planted:planted_page"),
    ],
)
def test_each_committed_page_is_generated_from_its_json(folder, name, page):
    import importlib

    path = RESULTS / folder / f"{name}.json"
    if not path.exists():
        pytest.skip(f"no committed {name} study")
    module, fn = page.split(":")
    render = getattr(importlib.import_module(module), fn)
    expected = (path.parent / f"{name}.md").read_text(encoding="utf-8")
    assert render(json.loads(path.read_text(encoding="utf-8"))) == expected


def test_ranks_put_the_planted_direction_first_and_count_by_hand():
    """On the planted-direction model the planted direction ±R·u is MELBO's optimum: no
    random vector of the same norm beats it (rank 0), and a weaker direction's rank is
    the number of vectors whose objective exceeds its own, computed here by hand."""
    model, U = planted_model((12.0,), d_model=64)
    src, tgt, radius = HookSite(0), HookSite(2), 2.0
    prompts = PromptSet.from_tokens(model, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]])
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(16, 64, generator=gen)
    rand = SteeringVectors(radius * raw / raw.norm(dim=-1, keepdim=True), src, target=tgt)
    planted = SteeringVectors(radius * U[:1], src, target=tgt)
    weak = SteeringVectors(rand.vectors[3:4].clone(), src, target=tgt)
    out = _ranks(model, rand, {"planted": planted, "weak": weak}, prompts)
    assert out["planted"]["rank"] == 0 and out["planted"]["of_best"] > 1.0
    by_hand = perturbation_objectives(model, rand, prompts, tgt)
    value = float(perturbation_objectives(model, weak, prompts, tgt)[0])
    assert out["weak"]["rank"] == int((by_hand > value).sum())
    assert out["weak"]["rank"] < 16  # vector 3 itself does not beat its copy


def test_the_choice_and_the_verdict_follow_their_rules():
    def diag(ranks: dict[str, int]) -> dict:
        return {
            "candidates": {
                c: {"cheese": {"rank": r, "objective": 1.0}, "hate": {"rank": 0, "objective": 1.0}}
                for c, r in ranks.items()
            }
        }

    seeds = [diag({"default": 32, "last 3": 2}), diag({"default": 0, "last 3": 3}),
             diag({"default": 32, "last 3": 1})]  # fmt: skip
    assert choose(seeds) == "last 3"  # medians 32 against 2
    runs = [{"method": "melbo", "full": {"cheese": [1, 2], "hate": []}},
            {"method": "random", "full": {"cheese": [], "hate": []}}]  # fmt: skip
    assert verdict([{"runs": runs}, {"runs": runs}]) == {
        "melbo": {"cheese": 2, "hate": 0},
        "random": {"cheese": 0, "hate": 0},
    }


def test_mean_kl_matches_an_independent_kl_and_grows_with_the_norm(tiny_model):
    """KL(p_unsteered || p_steered) per real token, against torch's kl_div on the same
    logits; 0 for a zero vector; larger for a larger push along the same direction."""
    site = HookSite(1)
    ps = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4], [5, 6, 7]])
    direction = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    small = SteeringVectors(direction[None], site)
    with torch.no_grad():
        base = tiny_model(ps.tokens, attention_mask=ps.attention_mask.long()).log_softmax(-1)
        with small.apply(tiny_model, 0):
            steered = tiny_model(ps.tokens, attention_mask=ps.attention_mask.long())
    per_token = torch.nn.functional.kl_div(
        steered.log_softmax(-1), base, log_target=True, reduction="none"
    ).sum(-1)
    mask = ps.attention_mask
    expected = float((per_token * mask).sum() / mask.sum())
    # tol: float32 softmax over a 50-token vocabulary, two summation orders
    assert math.isclose(mean_kl(tiny_model, small, ps), expected, rel_tol=1e-5)
    assert mean_kl(tiny_model, SteeringVectors(0 * direction[None], site), ps) == 0.0
    assert mean_kl(tiny_model, SteeringVectors(4 * direction[None], site), ps) > expected


def test_match_kl_finds_the_norm_that_gives_the_target_kl(tiny_model):
    site = HookSite(1)
    ps = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4], [5, 6, 7]])
    unit = torch.nn.functional.normalize(torch.randn(tiny_model.cfg.d_model), dim=0)

    def kl_of(norm: float) -> float:
        return mean_kl(tiny_model, SteeringVectors(norm * unit[None], site), ps)

    norm, kl = match_kl(kl_of, 0.05, 0.1, 0.2, iters=12)
    # tol: 12 halvings of a bracket that spans at most a factor 2^k in norm
    assert math.isclose(kl, 0.05, rel_tol=0.02)
    assert math.isclose(kl_of(norm), kl, rel_tol=1e-6)
    with pytest.raises(ValueError, match="reaches KL"):
        match_kl(lambda x: 0.0, 1.0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("suite", "model", "message"),
    [
        ("miss", "smollm2-135m-instruct", "needs the planted phrases"),
        ("finetune", "smollm2-135m-instruct", "compares smollm2-135m-instruct"),
        ("features", "smollm2-135m-backdoored", "runs on smollm2-135m-instruct"),
    ],
)
def test_the_cli_refuses_other_models(tmp_path, capsys, suite, model, message):
    from melbo_lens.cli import main

    out = str(tmp_path / "a")
    assert main(["evaluate", suite, "--model", model, "--out", out]) == 2
    assert message in capsys.readouterr().err


def test_the_miss_cli_refuses_confirmation_seeds_that_overlap_the_selection(tmp_path, capsys):
    from melbo_lens.cli import main

    args = ["evaluate", "miss", "--seeds", "5", "--confirm-first-seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "overlap the selection seeds" in capsys.readouterr().err


def test_adapters_on_the_planted_benchmark_with_their_random_baseline_and_options():
    """`adapter_options` reach the trainer (the power solver, 2 steps), random adapters are
    the trained ones' own starting draw at the same R, and the page lists both."""
    from melbo_lens.models.toy import load_toy
    from melbo_lens.workflows.planted import evaluate_planted, planted_page

    kept: dict = {}
    report = evaluate_planted(
        load_toy(), n_vectors=2, seeds=[0], methods=["adapters", "random-adapters"],
        n_heldout=0, max_new_tokens=4, adapter_radius=3.0,
        adapter_options={"solver": "power", "steps": 2},
        on_vectors=lambda method, seed, art: kept.__setitem__(method, art),
    )  # fmt: skip
    trained, start = kept["adapters"], kept["random-adapters"]
    assert trained.config["solver"] == "power" and trained.config["steps"] == 2
    assert start.radius == trained.radius == 3.0
    assert not torch.equal(trained.omega_b, start.omega_b)  # trained moved off its start
    assert report.settings["adapter_options"] == {"solver": "power", "steps": 2}
    page = planted_page(report.to_dict() | {"command": "melbo-lens evaluate planted"})
    assert "| 0 | adapters | 3.00 |" in page and "| 0 | random-adapters | 3.00 |" in page


def test_a_resumed_benchmark_refuses_other_adapter_options(tmp_path, capsys):
    from melbo_lens.cli import main

    out = str(tmp_path / "p")
    base = ["evaluate", "planted", "--seeds", "1", "--n-vectors", "1", "--methods",
            "random-adapters", "--heldout", "0", "--max-new-tokens", "2", "--out", out]  # fmt: skip
    assert main([*base, "--adapter-steps", "2"]) == 0
    assert "Command: `melbo-lens evaluate planted" in (tmp_path / "p" / "planted.md").read_text()
    assert main([*base, "--adapter-steps", "3", "--resume"]) == 2
    assert "--adapter-steps / --adapter-solver" in capsys.readouterr().err


def test_the_study_commands_share_one_resume_check(tmp_path):
    """`saved_study`: nothing saved gives None; a saved result needs --resume or
    --overwrite; a resume names each differing setting; `defaults` fill older files."""
    import argparse

    from melbo_lens.cli.options import CliError
    from melbo_lens.cli.output import saved_study

    path = tmp_path / "s.json"
    now = {"model": "m", "n": 2, "command": "new"}

    def args(**kw):
        return argparse.Namespace(**{"resume": False, "overwrite": False, **kw})

    assert saved_study(path, args(), now, "a study", "its seeds") is None
    path.write_text(json.dumps({"settings": {"model": "m", "command": "old"}, "rows": [1]}))
    with pytest.raises(CliError, match="already holds a study"):
        saved_study(path, args(), now, "a study", "its seeds")
    assert saved_study(path, args(overwrite=True), now, "a study", "its seeds") is None
    with pytest.raises(CliError, match=r"other settings \(n\)"):
        saved_study(path, args(resume=True), now, "a study", "its seeds")
    kept = saved_study(path, args(resume=True), now, "a study", "x", defaults={"n": 2})
    assert kept is not None and kept["rows"] == [1]
