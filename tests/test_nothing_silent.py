"""Nothing silent: each numbered failure of issue 11 gets a loud, specific answer.

One test (or a few) per item; each failed on main before the fix (see the issue note).
CLI tests run the real `main` on the tiny character-tokenizer model (no downloads).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from melbo_lens import (
    HookSite,
    MelboConfig,
    PromptSet,
    SteeringVectors,
    TrainingError,
    generate,
    train_steering_vectors,
)
from melbo_lens.cli import build_parser, main
from melbo_lens.core.io import ArtifactError, OutputExists, read_metadata
from melbo_lens.perturbations.artifact import load_artifact

torch.set_num_threads(1)

TINY = ["--source", "1", "--target", "3", "--prompt", "hi there", "--quiet"]


@pytest.fixture
def cli_model(tiny_tok_model, monkeypatch):
    """The CLI's model loader answers with the tiny chat model, whatever the name."""
    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda *a, **k: tiny_tok_model)
    return tiny_tok_model


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _random_vectors(model, n=3, radius=4.0):
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(n, model.cfg.d_model, generator=gen), dim=-1)
    return SteeringVectors(v * radius, HookSite(1), model_name="tiny")


# ---------------------------------------------------------------- 1. indices never wrap
def test_01_out_of_range_indices_are_an_error_naming_the_range(cli_model, tmp_path, capsys):
    path = tmp_path / "v.safetensors"
    _random_vectors(cli_model).save(path)
    argv = ["generate", str(path), "--prompt", "hi", "--max-new-tokens", "2", "--indices"]
    assert main([*argv, "9"]) == 2
    line = _err_line(capsys)
    assert "--indices 9: [9] out of range; the file has 3 members, indices 0..2" in line
    with pytest.raises(IndexError, match="out of range"):
        generate(cli_model, _random_vectors(cli_model), "hi", indices=[3], max_new_tokens=1)
    # negative indices are Python's (documented): -1 is the last member
    last = generate(cli_model, _random_vectors(cli_model), "hi", indices=[-1], max_new_tokens=2)
    assert last.indices == [2]


# ---------------------------------------------------------------- 2. no silent overwrite
def test_02_train_refuses_to_overwrite_a_finished_run(cli_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(out), "--n-vectors", "2", "--steps", "3"]
    assert main(argv) == 0
    before = (out / "vectors.safetensors").read_bytes()
    assert main([*argv, "--steps", "2"]) == 2
    line = _err_line(capsys)
    assert "already holds a finished melbo run (2 vectors x 3 steps)" in line
    assert "--overwrite" in line
    assert (out / "vectors.safetensors").read_bytes() == before  # untouched
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0
    assert load_artifact(out / "vectors.safetensors").config["steps"] == 2


def test_02_library_training_refuses_to_overwrite_a_checkpoint(tiny_model, tmp_path):
    ps = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4]])
    cfg = MelboConfig(HookSite(1), HookSite(3), n_vectors=1, radius=4.0, steps=2)
    path = tmp_path / "ckpt.safetensors"
    train_steering_vectors(tiny_model, ps, cfg, progress=False, checkpoint=str(path))
    with pytest.raises(OutputExists, match="finished melbo run .* overwrite=True"):
        train_steering_vectors(tiny_model, ps, cfg, progress=False, checkpoint=str(path))
    train_steering_vectors(
        tiny_model, ps, cfg, progress=False, checkpoint=str(path), overwrite=True
    )


def test_02_a_second_writer_of_one_output_fails_naming_the_holder(cli_model, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".run.lock"
        info = {"pid": holder.pid, "host": socket.gethostname(), "started": "now", "command": "x"}
        lock.write_text(json.dumps(info))
        argv = ["train", *TINY, "--out", str(out), "--n-vectors", "1", "--steps", "2"]
        assert main(argv) == 2
        assert f"being written by another run (pid {holder.pid}" in _err_line(capsys)
        assert not (out / "vectors.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; the lock is removed after
    assert main(argv) == 0
    assert not lock.exists()


# ---------------------------------------------------------------- 3. resume says what it does
def test_03_resume_without_checkpoint_says_so(cli_model, tmp_path, capsys):
    argv = ["train", *TINY, "--out", str(tmp_path / "r"), "--n-vectors", "1", "--steps", "2"]
    assert main([*argv, "--resume"]) == 0
    assert "no checkpoint at" in capsys.readouterr().err


def test_03_resume_with_other_settings_names_the_flags(cli_model, tmp_path, capsys):
    argv = ["train", *TINY, "--out", str(tmp_path / "r"), "--n-vectors", "1", "--steps", "2"]
    argv += ["--radius", "4"]
    assert main(argv) == 0
    assert main([*argv, "--resume", "--radius", "2", "--seed", "3"]) == 2
    line = _err_line(capsys)
    assert "--radius (saved 4.0, now 2.0)" in line and "--seed (saved 0, now 3)" in line


# ---------------------------------------------------------------- 4. checked every step
def _poison(step: int, value: float):
    def callback(state):
        if state.step == step:
            state.vectors[0].fill_(value)  # the live parameters (a detached view)

    return callback


@pytest.mark.parametrize("value,problem", [(float("nan"), "NaN/inf"), (0.0, "zero")])
def test_04_bad_values_stop_training_at_their_step(tiny_model, tmp_path, value, problem):
    ps = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4]])
    # fixed steps: the poisoned step 12 must come before the slot could plateau
    cfg = MelboConfig(HookSite(1), HookSite(3), n_vectors=1, radius=4.0, steps=30, slot_tol=0)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(
        TrainingError, match=rf"at step 13 for vector 0 \(start 0\): objective is .*{problem}"
    ):
        train_steering_vectors(
            tiny_model,
            ps,
            cfg,
            progress=False,
            callback=_poison(12, value),
            checkpoint=str(path),
            checkpoint_every=5,
        )
    saved = SteeringVectors.load(path)  # the step-10 checkpoint: finite, non-zero
    assert int(saved.steps_done[0]) == 10
    assert bool(torch.isfinite(saved.vectors).all()) and float(saved.vectors.norm()) > 0


# ---------------------------------------------------------------- 5. boundary validation
@pytest.mark.parametrize(
    "field,value,words",
    [
        ("q", float("inf"), "q must be a finite number > 0"),
        ("seed", 2**64, "seed must be an int in [0, 2**32)"),
        ("n_vectors", True, "n_vectors must be an int >= 1, got True"),
        ("lr", 1e38, "lr must be 'auto' or a number in (0, 4]"),
        ("lr", 1e30, "lr must be 'auto' or a number in (0, 4]"),
        ("radius", "big", "radius must be 'auto' or a finite number > 0, got 'big'"),
        ("radius", float("nan"), "radius must be 'auto' or a finite number > 0, got nan"),
    ],
)
def test_05_config_fields_are_validated(field, value, words):
    with pytest.raises(ValueError) as err:
        MelboConfig(HookSite(1), HookSite(3), **{"radius": 4.0, field: value})
    assert words in str(err.value)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"max_new_tokens": -5}, "max_new_tokens must be an int >= 0, got -5"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ],
)
def test_05_generation_settings_are_validated(tiny_tok_model, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        generate(tiny_tok_model, _random_vectors(tiny_tok_model), "hi", **kwargs)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["generate", "x", "--scale", "nan"], "--scale: must be a finite number"),
        (["generate", "x", "--max-new-tokens", "-5"], "--max-new-tokens: must be an int >= 0"),
        (["train", "--seed", str(2**64)], "--seed: must be an int in [0, 2**32)"),
        (["train", "--n-vectors", "0"], "--n-vectors: must be an int >= 1"),
    ],
)
def test_05_cli_values_are_validated_by_the_parser(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["last:0", "foo", "1,x"])
def test_05_target_position_specs_are_validated(cli_model, tmp_path, capsys, spec):
    argv = ["train", *TINY, "--out", str(tmp_path / "r"), "--target-positions", spec]
    assert main(argv) == 2
    assert f"--target-positions {spec!r} is not a position spec" in _err_line(capsys)


# ---------------------------------------------------------------- 6. prompts vs the model
def test_06_prompts_are_checked_against_the_model(tiny_tok_model):
    n_ctx, d_vocab = tiny_tok_model.cfg.n_ctx, tiny_tok_model.cfg.d_vocab
    with pytest.raises(ValueError, match=f"70 tokens but the model's context is n_ctx={n_ctx}"):
        PromptSet.from_tokens(tiny_tok_model, [[5] * 70])
    with pytest.raises(ValueError, match="negative token id -1"):
        PromptSet.from_tokens(tiny_tok_model, [[5, -1]])
    with pytest.raises(ValueError, match=f"token id {d_vocab}, outside the model's vocabulary"):
        PromptSet.from_tokens(tiny_tok_model, [[5, d_vocab]])
    with pytest.raises(ValueError, match="conversation 0 is None"):
        PromptSet.from_chat(tiny_tok_model, [None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 per-prompt entries for 3 prompts"):
        PromptSet.from_tokens(tiny_tok_model, [[1, 2], [3, 4], [5, 6]], target_positions=[[0], [1]])


def test_06_cli_too_long_prompt_names_length_and_context(cli_model, tmp_path, capsys):
    argv = ["train", *TINY, "--prompt", "a" * 80, "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "but the model's context is n_ctx=64" in _err_line(capsys)


# ---------------------------------------------------------------- 7. prompts files
@pytest.mark.parametrize(
    "name,content,words",
    [
        ("blank.txt", "\n  \n\n", "no prompts in the file"),
        ("obj.json", '{"items": ["a"]}', 'a JSON object needs a "prompts" list'),
        ("bad.json", "[1, 2", "not valid JSON"),
    ],
)
def test_07_bad_prompts_files_are_errors_naming_the_file(
    cli_model, tmp_path, capsys, name, content, words
):
    path = tmp_path / name
    path.write_text(content)
    argv = ["train", "--source", "1", "--target", "3", "--prompts-file", str(path)]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    line = _err_line(capsys)
    assert f"--prompts-file {path}" in line and words in line


# ---------------------------------------------------------------- 8. no orphans
def test_08_a_killed_save_leaves_nothing_the_next_save_keeps(tmp_path):
    target = tmp_path / "big.safetensors"
    script = textwrap.dedent(
        f"""
        import time
        from melbo_lens.core.io import atomic_write
        def write(tmp):
            tmp.write_bytes(b"x" * 1_000_000)
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, write)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(f".big.safetensors.{proc.pid}.")
    _random_vectors(types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=8))).save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


# ---------------------------------------------------------------- 9. metadata on load
def test_09_metadata_types_are_checked_on_load(tmp_path):
    path = tmp_path / "v.safetensors"
    _random_vectors(types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=8))).save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    info = json.loads(meta["json"])
    info["config"] = "oops"
    save_file(tensors, str(path), metadata={**meta, "json": json.dumps(info)})
    with pytest.raises(ArtifactError, match="'config' must be dict, got str"):
        SteeringVectors.load(path)


def test_09_a_directory_is_named_as_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ArtifactError, match="is a directory.*holds no .safetensors file"):
        read_metadata(run)
    (run / "vectors.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match="pass one of its artifact files: .*vectors"):
        read_metadata(run)


# ---------------------------------------------------------------- 10. one line, non-zero
def test_10_any_error_exits_non_zero_with_one_line(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise KeyError("no such key")

    monkeypatch.setattr("melbo_lens.models.zoo.load_model", broken)
    argv = ["train", *TINY, "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", *argv])
    with pytest.raises(KeyError):
        main([*argv, "--debug"])


# ---------------------------------------------------------------- 11. sweep progress, resume
def test_11_sweep_announces_radii_saves_each_and_resumes(tiny_tok_model, tmp_path, capsys):
    from melbo_lens.workflows import radius as radius_module

    ps = PromptSet.from_texts(tiny_tok_model, ["hello there"])
    cfg = MelboConfig(HookSite(1), HookSite(3), n_vectors=2, radius=4.0, steps=4)
    embed = lambda texts: torch.ones(len(texts), 3)  # noqa: E731  (diversity is not tested)
    kwargs = dict(max_new_tokens=3, embed=embed, save_dir=tmp_path)
    trained = []
    real = radius_module.train_steering_vectors

    def counted(model, prompts, config, **kw):
        trained.append(config.radius)
        if config.radius == 2.0 and len(trained) == 2:
            raise KeyboardInterrupt  # killed during the second radius
        return real(model, prompts, config, **kw)

    radius_module.train_steering_vectors = counted
    try:
        with pytest.raises(KeyboardInterrupt):
            radius_module.select_radius(tiny_tok_model, ps, cfg, [1.0, 2.0], **kwargs)
        assert (tmp_path / "radius_1.json").is_file()
        assert "radius 1 of 2: R=1, 2 vectors x 4 steps" in capsys.readouterr().err
        resumed = radius_module.select_radius(tiny_tok_model, ps, cfg, [1.0, 2.0], **kwargs)
    finally:
        radius_module.train_steering_vectors = real
    assert trained == [1.0, 2.0, 2.0]  # R = 1 was not trained again
    assert "radius 1 of 2: R=1 (saved, reused)" in capsys.readouterr().err
    fresh = radius_module.select_radius(
        tiny_tok_model, ps, cfg, [1.0, 2.0], max_new_tokens=3, embed=embed, progress=False
    )
    assert resumed.objective == pytest.approx(fresh.objective, rel=1e-6)
    assert resumed.completions == fresh.completions
    with pytest.raises(ValueError, match=r"other settings \(config.steps\)"):
        radius_module.select_radius(
            tiny_tok_model,
            ps,
            MelboConfig(HookSite(1), HookSite(3), n_vectors=2, radius=4.0, steps=5),
            [1.0],
            **kwargs,
        )


# ---------------------------------------------------------------- 12. conversations
def test_12_supervised_vectors_take_conversations(tiny_tok_model):
    from melbo_lens.methods.supervised import mean_difference_vectors

    pos = [[{"role": "user", "content": "i love it"}], [{"role": "user", "content": "great"}]]
    neg = [[{"role": "user", "content": "i hate it"}], [{"role": "user", "content": "awful"}]]
    got = mean_difference_vectors(tiny_tok_model, pos, neg, 1)
    want = mean_difference_vectors(
        tiny_tok_model,
        PromptSet.from_chat(tiny_tok_model, pos),
        PromptSet.from_chat(tiny_tok_model, neg),
        1,
    )
    torch.testing.assert_close(got.vectors, want.vectors)
    plain = mean_difference_vectors(
        tiny_tok_model, ["i love it", "great"], ["i hate it", "awful"], 1
    )
    assert not torch.allclose(plain.vectors, got.vectors)  # strings: no chat template


# ---------------------------------------------------------------- 13. plain generation
def test_13_plain_unsteered_generation(cli_model, capsys):
    plain = generate(cli_model, None, ["hi", "ok"], max_new_tokens=4)
    steered = generate(cli_model, _random_vectors(cli_model), ["hi", "ok"], max_new_tokens=4)
    assert plain.steered == [] and plain.unsteered == steered.unsteered
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert "unsteered |" in capsys.readouterr().out


# ---------------------------------------------------------------- 14. labels
def test_14_table_shows_the_last_user_message(tiny_tok_model):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why sky"}]
    gens = generate(tiny_tok_model, None, [conv], max_new_tokens=2)
    assert gens.table().splitlines()[0] == "=== prompt 0: why sky"


def test_14_compare_labels_two_default_runs_by_directory(tmp_path, capsys):
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=8))
    for run in ("run_a", "run_b"):
        _random_vectors(model).save(tmp_path / run / "vectors.safetensors")
    argv = ["compare", *(str(tmp_path / r / "vectors.safetensors") for r in ("run_a", "run_b"))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "run_a" in out and "run_b" in out


# ---------------------------------------------------------------- 15. help
def _subparsers():
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_15_help_lists_every_command_and_every_option_has_help():
    import argparse

    parser, subs = _subparsers()
    top = parser.format_help()
    assert all(name in top for name in subs)
    for name, sub in subs.items():
        assert "--threads" in sub._option_string_actions, name
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)
    train = subs["train"].format_help()
    assert "300 with AMSGrad (default: auto)" in train  # defaults are shown
    for group in ("prompts:", "training (MELBO vectors and adapters):", "--method adapters:"):
        assert group in train


def test_15_a_model_without_chat_template_points_to_no_chat(
    tiny_tok_model, monkeypatch, tmp_path, capsys
):
    import copy

    plain = copy.copy(tiny_tok_model)
    plain.tokenizer = copy.deepcopy(tiny_tok_model.tokenizer)
    plain.tokenizer.chat_template = None
    monkeypatch.setattr("melbo_lens.models.zoo.load_model", lambda *a, **k: plain)
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "pass --no-chat" in _err_line(capsys)


# ---------------------------------------------------------------- 16. unknown model
def test_16_unknown_model_lists_the_packaged_names_first():
    from melbo_lens.models.names import PACKAGED_MODELS, ModelUnavailableError
    from melbo_lens.models.zoo import load_model

    with pytest.raises(ModelUnavailableError) as err:
        load_model("no-such-model")
    text = str(err.value)
    assert len(text) < 600
    assert text.index(next(iter(PACKAGED_MODELS))) < text.index("official names")


# ---------------------------------------------------------------- 17. report
def test_17_token_heatmap_labels_cells_with_their_tokens():
    from melbo_lens.analysis.tokens import TokenDeltas
    from melbo_lens.views.figures.tokens import token_delta_heatmap

    rows = [
        TokenDeltas("v0", ["hi", " there", " cat"], [0.1, 0.2, 0.3], 2, [True] * 3, "s"),
        TokenDeltas("v1", ["hi", " there", " dog"], [0.1, 0.2, 0.4], 2, [True] * 3, "s"),
    ]
    trace = token_delta_heatmap(rows).data[0]
    assert trace.texttemplate == "%{customdata}"
    assert [list(r) for r in trace.customdata] == [
        ["hi", "·there", "·cat"],
        ["hi", "·there", "·dog"],
    ]


def test_17_random_mean_label_sits_over_the_random_box():
    from melbo_lens.views.figures.runs import objective_vs_random

    sv = SteeringVectors(torch.eye(2) * 4.0, HookSite(0), objective=torch.tensor([3.0, 2.0]))
    fig = objective_vs_random(sv, [1.0, 1.5])
    note = next(a for a in fig.layout.annotations if "random mean" in a.text)
    # the bars start at the left edge; the label ends at the right one, over the box
    assert (note.x, note.xref, note.xanchor) == (1, "x domain", "right")


def test_17_orthogonal_vectors_show_delta_similarity_not_the_identity():
    from melbo_lens.analysis.similarity import cosine_matrix
    from melbo_lens.views.report import Page, similarity_section

    eye = torch.eye(3)
    deltas = cosine_matrix(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    run = types.SimpleNamespace(
        labels=["0", "1", "2"],
        vector_similarity=cosine_matrix(eye),
        delta_similarity=deltas,
        token_deltas=None,
        decompositions=None,
    )
    page = Page()
    html = similarity_section(run, page) + json.dumps(page.figs)  # type: ignore[arg-type]
    assert "mutually orthogonal" in html and "cosine similarity of vectors" not in html
    assert "cosine similarity of target deltas" in html
    skew = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    run.vector_similarity, run.delta_similarity = cosine_matrix(skew), None
    run.labels = ["0", "1"]
    page = Page()
    html = similarity_section(run, page) + json.dumps(page.figs)  # type: ignore[arg-type]
    assert "cosine similarity of vectors" in html and "mutually orthogonal" not in html


def test_15_the_first_load_says_its_conversion_is_one_time(tmp_path, monkeypatch, capsys):
    from melbo_lens.models import cache
    from melbo_lens.models.names import PACKAGED_MODELS

    def convert(spec, sources, work):  # stands in for the minute-long GGUF conversion
        (work / "hooked_transformer").mkdir()

    monkeypatch.setattr(cache, "convert_into", convert)
    spec = next(iter(PACKAGED_MODELS.values()))
    entry = tmp_path / "models" / spec.name / "key"
    cache.build_entry(spec, [], entry, {"k": 1})
    err = capsys.readouterr().err
    assert f"first use of {spec.name}: converting it to a HookedTransformer once" in err
    assert (entry / "manifest.json").is_file()
    assert [p.name for p in entry.parent.iterdir()] == ["key"]  # no temporary left
