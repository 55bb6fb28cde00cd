"""The command line: argument errors are clear, compare works on saved files."""

from __future__ import annotations

import json

import pytest
import torch

from melbo_lens import HookSite, SteeringVectors
from melbo_lens.cli import build_parser, main
from melbo_lens.cli.options import target_positions_option


def test_target_position_specs():
    assert target_positions_option("auto") is None  # MELBO's default: outlier-norm positions out
    assert target_positions_option("all") == slice(None)
    assert target_positions_option("last:3") == slice(-3, None)
    assert target_positions_option("0,2,-1") == [0, 2, -1]
    assert target_positions_option("1:") == slice(1, None)
    # the demo uses the defaults: positions, sites and R chosen for the model
    demo = build_parser().parse_args(["demo"])
    assert (demo.target_positions, demo.radius, demo.source, demo.target) == ("auto",) * 4


def test_adapters_need_an_mlp_source(capsys):
    code = main(["train", "--method", "adapters", "--source", "blocks.7.hook_resid_post"])
    assert code == 2
    assert "adapters perturb a block's MLP" in capsys.readouterr().err


def test_supervised_methods_need_pairs(capsys, monkeypatch):
    monkeypatch.setattr("melbo_lens.cli.methods.load_model", lambda *a, **k: object())
    assert main(["train", "--method", "mean-diff"]) == 2
    assert "--positive-file and --negative-file" in capsys.readouterr().err


def test_generate_refuses_a_pickle(tmp_path, capsys):
    path = tmp_path / "v.pt"
    torch.save({"vectors": torch.zeros(2, 4)}, path)
    assert main(["generate", str(path)]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_compare_two_saved_sets(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    SteeringVectors(a, HookSite(1)).save(tmp_path / "a.safetensors")
    SteeringVectors(-a[[2, 0, 1]], HookSite(1)).save(tmp_path / "b.safetensors")
    assert (
        main(
            [
                "compare",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"),
                "--json",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    assert "nearest match" in capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    # b is a permuted, sign-flipped copy of a: the table recovers the permutation and sign
    assert result["nearest"]["index"] == [1, 2, 0]
    assert result["nearest"]["sign"] == [-1, -1, -1]
    assert max(result["angles"]["degrees"]) < 1e-3


def test_every_subcommand_has_help():
    parser = build_parser()
    for command in ("train", "demo", "generate", "bench", "compare"):
        assert (
            parser.parse_args(
                [
                    command,
                    *(["x"] if command == "generate" else []),
                    *(["x", "y"] if command == "compare" else []),
                ]
            ).command
            == command
        )


def test_version(capsys):
    import melbo_lens

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"melbo-lens {melbo_lens.__version__}"
    assert melbo_lens.__version__ == "0.1.0"  # pyproject's version, from the install


def test_the_planted_command_recorded_for_a_real_model_is_the_one_it_ran():
    """On any model but the toy `evaluate planted` runs on the defaults, so the command
    its page records says --defaults and leaves out the toy's site and step flags."""
    from melbo_lens.cli import build_parser
    from melbo_lens.cli.evaluate import _command

    args = build_parser().parse_args(
        ["evaluate", "planted", "--model", "smollm2-135m-backdoored", "--out", "o"]
    )
    real, toy = _command(args, toy=False), _command(args, toy=True)
    assert "--defaults" in real and "--source" not in real and "--steps" not in real
    assert "--defaults" not in toy and "--source 1" in toy
