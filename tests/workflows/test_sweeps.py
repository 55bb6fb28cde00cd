"""Grid sweeps: cells saved atomically with a manifest, resumable, and the same on Ray
(a local instance started here) as in-process, also when a worker dies mid-cell."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from melbo_lens.workflows.sweeps import SweepGrid, run_sweep

TESTS = Path(__file__).resolve().parents[1]

GRID = dict(
    model="tiny",
    prompts={"greet": ["hello there", "what is two?"]},
    sites=[["1", "3"]],
    radii=[1.0, 4.0],
    seeds=[0],
    methods=[{"method": "melbo", "solver": "power"}, {"method": "random"}],
    config={"n_vectors": 2, "steps": 4},
    behaviors={"says_e": "e"},
    chat=True,
    max_new_tokens=3,
)


def tiny_loader(kill_marker: str | None = None):
    """The tiny chat model (what a worker loads once). With `kill_marker`, the first
    forward pass after loading kills the worker process unless the marker file exists:
    a worker that dies mid-cell, once."""
    import sys

    sys.path.insert(0, str(TESTS))
    from conftest import make_tiny, make_tiny_tokenizer

    torch.set_num_threads(1)
    model = make_tiny()
    model.set_tokenizer(make_tiny_tokenizer())
    if kill_marker is not None and not os.path.exists(kill_marker):

        def die(module, args):
            Path(kill_marker).write_text("killed once")
            os._exit(1)

        model.embed.register_forward_pre_hook(die)
    return model


def test_local_sweep_writes_cells_table_and_resumes(tmp_path, capsys):
    result = run_sweep(GRID, tmp_path, model_loader=tiny_loader)
    assert len(result.rows) == 4 and len(result.ran) == 4
    for row in result.rows:
        assert (tmp_path / "cells" / f"{row['cell']}.safetensors").is_file()
        assert row["objective_mean"] > 0 and row["behaviors"].keys() == {"says_e"}
    melbo = [r for r in result.rows if r["method"] == "melbo"]
    random = [r for r in result.rows if r["method"] == "random"]
    for m, r in zip(melbo, random, strict=True):  # trained beats drawn at the same radius
        assert m["objective_mean"] > r["objective_mean"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cells"] == [row["cell"] for row in result.rows]
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    frame = result.to_pandas()
    assert list(frame["radius"]) == [1.0, 1.0, 4.0, 4.0] and "behavior:says_e" in frame
    again = run_sweep(GRID, tmp_path, model_loader=tiny_loader)
    assert again.ran == [] and again.rows == result.rows  # finished cells are skipped
    with pytest.raises(ValueError, match="another grid .*differs in radii"):
        run_sweep({**GRID, "radii": [2.0]}, tmp_path, model_loader=tiny_loader)


def test_a_killed_local_sweep_loses_only_the_cell_in_flight(tmp_path):
    first = GRID["methods"][0]
    cells = SweepGrid.from_dict(GRID).cells()
    done = run_sweep({**GRID, "methods": [first]}, tmp_path / "a", model_loader=tiny_loader)
    # a cell whose measurements were never written (killed before) does not count
    victim = tmp_path / "a" / "cells" / f"{done.rows[0]['cell']}.json"
    victim.unlink()
    again = run_sweep({**GRID, "methods": [first]}, tmp_path / "a", model_loader=tiny_loader)
    assert again.ran == [done.rows[0]["cell"]] and len(cells) == 4


def test_grid_errors_name_the_field():
    with pytest.raises(ValueError, match=r"methods\[0\]: needs method: one of"):
        SweepGrid.from_dict({**GRID, "methods": [{"method": "magic"}]})
    with pytest.raises(ValueError, match="unknown fields"):
        SweepGrid.from_dict({**GRID, "radius": 3})
    with pytest.raises(ValueError, match="target_positions: 'x' is not a position spec"):
        SweepGrid.from_dict({**GRID, "target_positions": "x"})


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    here = Path(__file__).resolve().parent  # pytest imports this file as `test_sweeps`
    path = os.pathsep.join([str(TESTS), str(here), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


def test_ray_executor_matches_local_and_survives_a_killed_worker(local_ray, tmp_path):
    local = run_sweep(GRID, tmp_path / "local", model_loader=tiny_loader, progress=False)
    marker = tmp_path / "killed"
    remote = run_sweep(
        GRID,
        tmp_path / "ray",
        executor="ray",
        model_loader=functools.partial(tiny_loader, str(marker)),
        workers=2,
        progress=False,
    )
    assert marker.read_text() == "killed once"  # a worker died mid-cell and was replaced
    assert [r["cell"] for r in remote.rows] == [r["cell"] for r in local.rows]
    for a, b in zip(local.rows, remote.rows, strict=True):
        torch.testing.assert_close(
            remote.artifact(b["cell"]).vectors, local.artifact(a["cell"]).vectors
        )
        assert b["objective_mean"] == pytest.approx(a["objective_mean"], rel=1e-6)
        assert b["completions"] == a["completions"]
    rerun = run_sweep(GRID, tmp_path / "ray", executor="ray", model_loader=tiny_loader)
    assert rerun.ran == []


def test_ray_refuses_resources_the_cluster_lacks(local_ray, tmp_path):
    from melbo_lens.workflows.sweeps_ray import ResourcesUnavailable

    with pytest.raises(
        ResourcesUnavailable,
        match="asks for 1 CPU and 1 GPU, but the Ray cluster has 2 CPU and 0 GPU",
    ):
        run_sweep(GRID, tmp_path, executor="ray", model_loader=tiny_loader, num_gpus=1)
    assert not (tmp_path / "manifest.json").exists()


def test_ray_reports_a_failed_cell_in_one_line_and_saves_the_others(local_ray, tmp_path):
    from melbo_lens.workflows.sweeps import SweepFailed

    grid = {**GRID, "prompts": {"short": ["hi"], "long": ["a" * 200]}, "radii": [1.0]}
    grid["methods"] = [{"method": "random"}]
    with pytest.raises(SweepFailed) as info:
        run_sweep(grid, tmp_path, executor="ray", model_loader=tiny_loader, progress=False)
    ((cell, error),) = info.value.failures.items()
    assert "long" in cell and "\n" not in error and "\x1b" not in error and "Traceback" not in error
    assert [r["prompt_set"] for r in info.value.result.rows] == ["short"]
    assert (tmp_path / "cells" / f"{info.value.result.rows[0]['cell']}.safetensors").is_file()


def test_sweep_command_runs_a_yaml_grid_and_writes_the_report(tmp_path, monkeypatch, capsys):
    import yaml

    from melbo_lens.cli import main

    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda name, **kw: tiny_loader())
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "methods": [{"method": "random"}]}))
    out = tmp_path / "out"
    argv = ["sweep", "--grid", str(grid), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 cells (2 run now)" in printed and "objective_mean" in printed
    html = (out / "report.html").read_text()
    assert '<section id="sweep">' in html and html.count("<tr>") == 3  # head + 2 cells
    assert main(argv) == 0 and "2 cells (0 run now)" in capsys.readouterr().out
    grid.write_text("radii: [1]\n")
    assert main(argv) == 2
    assert "--grid" in capsys.readouterr().err
