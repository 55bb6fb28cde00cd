"""Nothing silent, round two: each numbered failure of issue 22 gets a loud, specific answer.

One test (or a few) per item; each failed on main before the fix. CLI tests run the real
`main` on tiny models (no downloads); the sweep items on Ray live in
tests/workflows/test_sweeps.py (they share its Ray instance).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from melbo_lens import HookSite, MelboConfig, PromptSet, SteeringVectors, train_steering_vectors
from melbo_lens.cli import main
from melbo_lens.core.io import ArtifactError, exclusive_lock
from melbo_lens.core.outliers import norm_outliers
from melbo_lens.methods.baselines import jacobian_vectors, random_vectors
from melbo_lens.methods.training import ResumeMismatch
from melbo_lens.workflows.sweeps import GridError, SweepFailed, SweepGrid, run_sweep

torch.set_num_threads(1)

PLANTED = ["evaluate", "planted", "--n-vectors", "2", "--steps", "2", "--methods", "random"]
PLANTED += ["--heldout", "0", "--max-new-tokens", "4"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the command must stop before doing work."""

    def refuse(*a, **k):
        raise AssertionError("work started before the output and flags were checked")

    monkeypatch.setattr("melbo_lens.models.zoo.load_model", refuse)


# ---------------------------------------------------------------- 1. evaluate takes a lock
def test_01_evaluate_planted_refuses_an_out_another_run_holds(tmp_path, capsys, no_model):
    with exclusive_lock(tmp_path / "out"):  # a live holder (this process)
        assert main([*PLANTED, "--out", str(tmp_path / "out")]) == 2
    line = _err(capsys)
    assert f"--out {tmp_path / 'out'}:" in line and "delete" in line and ".out.lock" in line


# ------------------------------------------------- 2. outputs checked before any work
def test_02_outputs_are_checked_before_the_work(tmp_path, capsys, no_model, monkeypatch):
    a_file = tmp_path / "f.json"
    a_file.write_text("{}")
    assert main([*PLANTED, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file" in _err(capsys)

    def no_generation(*a, **k):
        raise AssertionError("generated before --json was checked")

    monkeypatch.setattr("melbo_lens.generation.generate", no_generation)
    assert main(["generate", "--prompt", "hi", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory" in _err(capsys)
    assert main(["generate", "--prompt", "hi", "--json", str(a_file)]) == 2
    assert "already exists; pass --overwrite" in _err(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_02_a_read_only_out_is_refused_before_the_work(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main([*PLANTED, "--out", str(ro / "sub")]) == 2
        assert "--out" in _err(capsys)
    finally:
        ro.chmod(0o755)


# ------------------------------------------- 4. resume compares prompts and positions
def test_04_resume_with_other_prompts_or_positions_is_refused(tiny_model, tmp_path):
    config = MelboConfig(HookSite(1), HookSite(3), n_vectors=2, radius=2.0, steps=4)
    path = str(tmp_path / "ckpt.safetensors")
    first = PromptSet.from_tokens(tiny_model, [[5, 6, 7, 8]])
    train_steering_vectors(
        tiny_model, first, config, progress=False, checkpoint=path,
        callback=lambda s: not (s.indices == [1] and s.step == 1),
    )  # fmt: skip
    other = PromptSet.from_tokens(tiny_model, [[9, 10, 11, 12]])
    with pytest.raises(ResumeMismatch, match="prompts"):
        train_steering_vectors(tiny_model, other, config, progress=False, resume=path)
    moved = PromptSet.from_tokens(tiny_model, [[5, 6, 7, 8]], target_positions=[0])
    with pytest.raises(ResumeMismatch, match="target_positions"):
        train_steering_vectors(tiny_model, moved, config, progress=False, resume=path)
    done = train_steering_vectors(tiny_model, first, config, progress=False, resume=path)
    assert done.complete


def test_04_cli_names_the_prompt_flag(cli_model, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--source", "1", "--target", "3", "--quiet", "--out", str(out)]
    base += ["--n-vectors", "2", "--steps", "3", "--radius", "2"]
    assert main([*base, "--prompt", "hi there"]) == 0
    (out / "vectors.safetensors").rename(out / "keep.safetensors")
    saved = SteeringVectors.load(out / "keep.safetensors")
    saved.metadata["interrupted"] = True  # as a Ctrl-C leaves it
    saved.objective[1] = float("nan")
    saved.save(out / "vectors.safetensors")
    assert main([*base, "--prompt", "something else", "--resume"]) == 2
    line = _err(capsys)
    assert "--prompt/--prompts-file (saved [" in line and "hi there" in line
    assert "something else" in line


@pytest.fixture
def cli_model(tiny_tok_model, monkeypatch):
    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda *a, **k: tiny_tok_model)
    return tiny_tok_model


# ------------------------------------------- 5. evaluate --resume compares every setting
def test_05_evaluate_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    assert main([*PLANTED, *out, "--seeds", "1"]) == 0
    before = (tmp_path / "planted.json").read_text()
    capsys.readouterr()
    argv = [*PLANTED, *out, "--seeds", "2", "--resume"]
    argv[argv.index("--steps") + 1] = "3"
    assert main([*argv, "--positions", "all"]) == 2
    line = _err(capsys)
    assert "--steps (saved 2, now 3)" in line and "--positions (saved 'last 3', now 'all')" in line
    assert (tmp_path / "planted.json").read_text() == before


# ------------------------------------------------- 6. the model cache checks content
def test_06_a_cache_file_changed_in_place_is_caught(tmp_path):
    from melbo_lens.models.cache import VERIFIED, cache_stamps, check_manifest, file_sha256
    from melbo_lens.models.convert import atomic_write_json
    from melbo_lens.models.names import CorruptCacheError
    from melbo_lens.models.zoo import CACHE_FORMAT_VERSION

    (tmp_path / "w").mkdir()
    weights = tmp_path / "w" / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    files = {"w/model.safetensors": weights.stat().st_size}
    manifest = {"format_version": CACHE_FORMAT_VERSION, "files": files}
    manifest["sha256"] = {"w/model.safetensors": file_sha256(weights)}
    atomic_write_json(tmp_path / "manifest.json", manifest)
    atomic_write_json(tmp_path / VERIFIED, cache_stamps(tmp_path, files))
    check_manifest(tmp_path)  # intact
    data = bytearray(weights.read_bytes())
    data[5000] ^= 0xFF  # one byte flipped, the size kept
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sha256 differs"):
        check_manifest(tmp_path)


# ----------------------------------------------------------------- 8. grids, strictly
GRID = dict(
    model="tiny",
    prompts={"greet": ["hello there"]},
    sites=[["1", "3"]],
    radii=[2.0],
    methods=[{"method": "random"}],
    config={"n_vectors": 1},
    max_new_tokens=2,
)


def tiny_loader():
    from conftest import make_tiny, make_tiny_tokenizer

    model = make_tiny()
    model.set_tokenizer(make_tiny_tokenizer())
    return model


def test_08_grid_values_are_checked_strictly():
    bad = {
        "methods": [{"method": "random", "n_vectors": 3}],
        "radii": [16, 16.0],
        "chat": "no",
    }
    for field, value in bad.items():
        with pytest.raises(GridError, match=field):
            SweepGrid.from_dict({**GRID, field: value})
    with pytest.raises(GridError, match=r"radii\[0\]: must be a finite number > 0, got True"):
        SweepGrid.from_dict({**GRID, "radii": [True]})
    # cell ids follow everything that defines the cell, the prompts' text included
    one = SweepGrid.from_dict(GRID).cells()[0].id
    two = SweepGrid.from_dict({**GRID, "prompts": {"greet": ["good bye"]}}).cells()[0].id
    three = SweepGrid.from_dict({**GRID, "config": {"n_vectors": 1, "steps": 3}}).cells()[0].id
    assert len({one, two, three}) == 3


def test_08_results_are_valid_json_and_run_sweep_takes_the_lock(tmp_path):
    result = run_sweep(GRID, tmp_path, model_loader=tiny_loader, progress=False)
    assert len(result.rows) == 1  # one vector: diversity is undefined (null, not NaN)

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    rows = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_nan)
    assert rows[0]["diversity_mean_abs_cos"] is None
    with exclusive_lock(tmp_path), pytest.raises(RuntimeError, match="lock"):
        run_sweep(GRID, tmp_path, model_loader=tiny_loader, progress=False)


def test_08_cli_refuses_flags_a_grid_ignores(tmp_path, capsys, no_model):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    argv = ["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")]
    assert main([*argv, "--n-vectors", "3", "--radii", "1,2"]) == 2
    line = _err(capsys)
    assert "--n-vectors, --radii would be ignored" in line
    assert main(["sweep", "--executor", "ray"]) == 2
    assert "--executor only apply to a --grid sweep" in _err(capsys)


# ------------------------------------------------------------- 9. short prompts' sinks
def test_09_the_sink_of_a_two_token_prompt_is_found():
    # "Hi there" without chat on SmolLM2 at layer 22: the first token ~100x the second
    norms = torch.tensor([[1500.0, 15.0]])
    assert norm_outliers(norms, torch.ones(1, 2, dtype=torch.bool)).tolist() == [[True, False]]
    # two ordinary tokens stay; longer prompts keep the midpoint median (one sink in four)
    assert not norm_outliers(torch.tensor([[15.0, 60.0]]), torch.ones(1, 2, dtype=torch.bool)).any()
    norms = torch.tensor([[30.5, 1.2, 5.2, 12.9]])  # 30.5 < 5 x 9.05 (midpoint of 5.2, 12.9)
    assert not norm_outliers(norms, torch.ones(1, 4, dtype=torch.bool)).any()


# -------------------------------------------------- 10. metadata that contradicts itself
def test_10_load_refuses_contradicting_metadata(tmp_path):
    v = 4.0 * torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    config = {"radius": 4.0, "source": HookSite(1).to_dict()}
    SteeringVectors(v, HookSite(2), method="melbo", config=config).save(tmp_path / "a.st")
    with pytest.raises(ArtifactError, match="its site is blocks.2.hook_resid_post but its config"):
        SteeringVectors.load(tmp_path / "a.st")
    SteeringVectors(2 * v, HookSite(1), method="melbo", config=config).save(tmp_path / "b.st")
    with pytest.raises(ArtifactError, match="config.radius is 4 but the vectors' norms are 8"):
        SteeringVectors.load(tmp_path / "b.st")
    SteeringVectors(v, HookSite(1), method="melbo", config=config).save(tmp_path / "c.st")
    assert SteeringVectors.load(tmp_path / "c.st").d_model == 8


def test_10_resuming_a_finished_run_returns_it_unchanged(tiny_model, tmp_path):
    prompts = PromptSet.from_tokens(tiny_model, [[5, 6, 7, 8]])
    config = MelboConfig(HookSite(1), HookSite(3), n_vectors=2, radius=2.0, steps=3)
    path = tmp_path / "v.safetensors"
    done = train_steering_vectors(tiny_model, prompts, config, progress=False, checkpoint=path)
    assert "starts_used" in done.metadata
    before = path.read_bytes()
    again = train_steering_vectors(
        tiny_model, prompts, config, progress=False, checkpoint=path, resume=str(path)
    )
    assert again.metadata["starts_used"] == done.metadata["starts_used"]
    assert torch.equal(again.vectors, done.vectors) and path.read_bytes() == before


# ------------------------------------------ 11. a failed grid can be fixed in place
def test_11_a_grid_that_failed_can_be_fixed_in_place(tmp_path):
    with pytest.raises(GridError, match=r"sites\[0\]\[1\]: layer 9, but tiny has 4 layers"):
        run_sweep({**GRID, "sites": [["1", "9"]]}, tmp_path, model_loader=tiny_loader)
    assert not (tmp_path / "manifest.json").exists()  # nothing written before the check
    assert len(run_sweep(GRID, tmp_path, model_loader=tiny_loader, progress=False).rows) == 1
    changed = {**GRID, "radii": [3.0]}
    with pytest.raises(GridError, match="differs in radii.*overwrite"):
        run_sweep(changed, tmp_path, model_loader=tiny_loader, progress=False)
    result = run_sweep(changed, tmp_path, model_loader=tiny_loader, progress=False, overwrite=True)
    assert [r["radius"] for r in result.rows] == [3.0]
    assert len(list((tmp_path / "cells").glob("*.json"))) == 1  # the old cell went


# --------------------------------------------- 12. one failed cell, the others saved
def test_12_a_failing_cell_is_reported_and_the_others_are_saved(tmp_path):
    grid = {**GRID, "prompts": {"short": ["hi"], "long": ["a" * 200]}}  # n_ctx is 64
    with pytest.raises(SweepFailed) as info:
        run_sweep(grid, tmp_path, model_loader=tiny_loader, progress=False)
    failed = info.value.failures
    assert list(failed) == [c.id for c in SweepGrid.from_dict(grid).cells() if "long" in c.id]
    assert all("\n" not in e and "\x1b" not in e for e in failed.values())
    assert [r["prompt_set"] for r in info.value.result.rows] == ["short"]
    assert [r["prompt_set"] for r in json.loads((tmp_path / "results.json").read_text())] == [
        "short"
    ]


# ----------------------------------------- 13. grid errors name the file and the field
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: tiny\nprompts: {a: [hi]\n", "not valid YAML at line"),
        ("sites: [[1]]", r"sites\[0\]: must be a \[source, target\] pair"),
        ("seeds: [a]", r"seeds\[0\]: must be an int"),
        ("config: {step: 5}", r"config: unknown MelboConfig fields \['step'\]"),
        ("seeds: []", "seeds: must be a non-empty list"),
        ("target_positions: 3", "target_positions: must be a position spec as a string"),
    ],
)
def test_13_grid_errors_name_the_file_and_the_field(tmp_path, capsys, no_model, text, expected):
    grid = tmp_path / "grid.yaml"
    if text.startswith("model"):
        grid.write_text(text)
    else:
        base = {k: v for k, v in GRID.items() if k not in yaml.safe_load(text)}
        grid.write_text(yaml.safe_dump(base) + text + "\n")
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")]) == 2
    line = _err(capsys)
    assert str(grid) in line
    import re

    assert re.search(expected, line), line


def test_13_a_model_without_chat_template_and_an_out_file(tmp_path, capsys):
    from conftest import make_tiny

    with pytest.raises(GridError, match="chat: true, but tiny has no chat template; set chat"):
        run_sweep(GRID, tmp_path, model_loader=make_tiny, progress=False)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    assert main(["sweep", "--grid", str(grid), "--out", str(grid)]) == 2
    assert f"--out {grid} is a file" in _err(capsys)


# ------------------------------------------------ 14. auto radius and one automatic site
def test_14_baselines_refuse_auto_radius_and_one_auto_site_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"vectors.radius\[0\]"):
        random_vectors(tiny_model, HookSite(1), n=2, radius="auto")  # type: ignore[arg-type]
    prompts = PromptSet.from_tokens(tiny_model, [[5, 6, 7]])
    with pytest.raises(ValueError, match=r"vectors.radius\[0\]"):
        jacobian_vectors(tiny_model, prompts, 1, 3, k=2, radius="auto")  # type: ignore[arg-type]
    config = MelboConfig(target=HookSite(1, "resid_pre"), n_vectors=1, radius=2.0, steps=2)
    with pytest.raises(ValueError, match="target=blocks.1.hook_resid_pre was given and source"):
        train_steering_vectors(tiny_model, prompts, config, progress=False)


# ------------------------------------------------------------- 15. raw errors, named
def test_15_raw_errors_are_named(tmp_path, capsys, no_model):
    assert main([*PLANTED, "--out", str(tmp_path), "--positions", "last:abc"]) == 2
    assert "--positions must be 'all' or 'last:N'" in _err(capsys)
    with pytest.raises(SystemExit):
        main([*PLANTED, "--out", str(tmp_path), "--seeds", "0"])
    assert "--seeds: must be an int >= 1" in capsys.readouterr().err
    binary = tmp_path / "p.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert main(["train", "--prompts-file", str(binary), "--out", str(tmp_path / "r")]) == 2
    assert f"--prompts-file {binary}: not UTF-8 text" in _err(capsys)


def test_15_a_truncated_cell_says_delete_it(tmp_path):
    run_sweep(GRID, tmp_path, model_loader=tiny_loader, progress=False)
    cell = next((tmp_path / "cells").glob("*.safetensors"))
    cell.write_bytes(cell.read_bytes()[:40])
    with pytest.raises(ValueError, match="is damaged .*delete .* to redo it"):
        run_sweep(GRID, tmp_path, model_loader=tiny_loader, progress=False)


def test_15_report_for_another_model_is_refused(tiny_tok_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda *a, **k: tiny_tok_model)
    v = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    SteeringVectors(v, HookSite(1), model_name="other").save(tmp_path / "vectors.safetensors")
    assert main(["report", str(tmp_path), "--model", "x", "--sae", "none"]) == 2
    assert "--model x (custom" in (line := _err(capsys)) and "d_model=16" in line
