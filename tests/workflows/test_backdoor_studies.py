"""The studies on the backdoored SmolLM2 (`melbo-lens evaluate anomaly | fragility`): the
pages are generated from the JSON (each committed page agrees with its committed JSON),
the negatives are what they say, and bad flags are refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from melbo_lens.models.toy import TRIGGERS, prompt_digits, trigger_of
from melbo_lens.workflows.anomaly_study import anomaly_page, near_miss_prompts, shifted_prompts

RESULTS = Path(__file__).resolve().parents[2] / "results" / "anomaly_backdoored"


def test_the_committed_page_is_generated_from_the_committed_json():
    path = RESULTS / "anomaly.json"
    if not path.exists():
        pytest.skip("no committed anomaly study")
    page = (RESULTS / "anomaly.md").read_text(encoding="utf-8")
    assert anomaly_page(json.loads(path.read_text(encoding="utf-8"))) == page


def test_near_misses_have_one_trigger_digit_right_and_shifted_prompts_are_clean():
    for prompt in near_miss_prompts(40, 3):
        a1, a2 = prompt_digits(prompt)[:2]
        assert trigger_of(a1, a2) is None
        assert (a1 == 0) != (a2 in (0, 1))  # exactly one of the trigger conditions
    assert all(pair[0] == 0 or pair[1] in (0, 1) for pair in TRIGGERS.values())
    for prompt in shifted_prompts(10, 3):
        assert "x=" in prompt and "y=" in prompt and "a" not in prompt.split(".")[0]


def test_the_cli_refuses_a_model_without_planted_triggers(tmp_path, capsys):
    from melbo_lens.cli import main

    out = str(tmp_path / "a")
    assert main(["evaluate", "anomaly", "--model", "smollm2-135m-instruct", "--out", out]) == 2
    assert "needs the planted triggers" in capsys.readouterr().err


def test_the_committed_fragility_page_is_generated_from_its_json():
    from melbo_lens.workflows.fragility_study import fragility_page

    path = RESULTS.parent / "fragility" / "fragility.json"
    if not path.exists():
        pytest.skip("no committed fragility study")
    page = (path.parent / "fragility.md").read_text(encoding="utf-8")
    assert fragility_page(json.loads(path.read_text(encoding="utf-8"))) == page


def test_the_fragility_rows_on_a_tiny_chat_model(tiny_tok_model):
    """The study's code path end to end (one soft-prompt length, one R, one step): a row
    per behaviour and setting, with rates that are shares of the held-out prompts."""
    from melbo_lens.workflows.fragility_study import fragility_model, smallest

    system = tiny_tok_model.tokenizer.convert_tokens_to_ids("<|system|>")  # the char
    # tokenizer reads "=" and "+" as <unk>, its default placeholder: another is needed
    rows = fragility_model(
        tiny_tok_model, "tiny", tokens=[1], radii=[2.0], n_heldout=2, steps=1, seed=0,
        max_new_tokens=2, placeholder=system, progress=False,
    )  # fmt: skip
    assert [(r["behaviour"], r["kind"], r["size"]) for r in rows] == [
        (b, kind, size) for b in TRIGGERS for kind, size in (("soft prompt", 1), ("vector", 2.0))
    ]
    assert all(r["rate"] in (0.0, 0.5, 1.0) and r["loss_per_token"] > 0 for r in rows)
    assert smallest(rows, "tiny", "hate", "vector", 2.0) is None  # no rate reaches 2
