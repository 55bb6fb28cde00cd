"""The one training loop, run through each family: what holds for every trainable
perturbation (interrupt + resume is bit-exact, finished members stay final)."""

from __future__ import annotations

import pytest
import torch

from melbo_lens import (
    AdapterConfig,
    HookSite,
    MelboConfig,
    PromptSet,
    SteeringAdapters,
    SteeringVectors,
    train_steering_adapters,
    train_steering_vectors,
)

TOKENS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]

# family -> (trainer, config factory, artifact class, parameter tensors)
FAMILIES = {
    "vectors": (
        train_steering_vectors,
        # fixed steps per slot, so the interrupt points below are reached (a run stopped on
        # a slot's plateau resumes exactly too: tests/methods/test_window.py)
        lambda **kw: MelboConfig(
            HookSite(0), HookSite(2), n_vectors=3, radius=2.0, steps=20, slot_tol=0, **kw
        ),
        SteeringVectors,
        ("vectors",),
    ),
    "adapters": (
        train_steering_adapters,
        lambda **kw: AdapterConfig(
            1, HookSite(3), n_adapters=3, rank=2, radius=2.0, steps=20, **kw
        ),
        SteeringAdapters,
        ("omega_a", "omega_b"),
    ),
}


@pytest.mark.parametrize(
    "family,orthogonal,stop_at",
    [
        ("vectors", "sequential", (1, 7)),
        ("vectors", "simultaneous", (0, 13)),
        ("adapters", "sequential", (1, 7)),
        ("adapters", "none", (0, 13)),
    ],
)
def test_interrupt_and_resume_equals_uninterrupted(
    tiny_model, tmp_path, family, orthogonal, stop_at
):
    train, make_config, artifact_cls, names = FAMILIES[family]
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    config = make_config(orthogonal=orthogonal)
    reference = train(tiny_model, prompts, config, progress=False)

    def ctrl_c(state):
        if state.indices[0] == stop_at[0] and state.step == stop_at[1]:
            raise KeyboardInterrupt  # what Ctrl-C does inside the loop

    ckpt = tmp_path / "run.safetensors"
    partial = train(
        tiny_model,
        prompts,
        config,
        progress=False,
        callback=ctrl_c,
        checkpoint=str(ckpt),
        checkpoint_every=5,
    )
    assert not partial.complete and partial.metadata["interrupted"]
    assert torch.equal(artifact_cls.load(ckpt).steps_done, partial.steps_done)
    if orthogonal == "sequential":  # members finished before the interrupt are final
        assert partial.steps_done.tolist()[:1] == [20]
        for name in names:
            torch.testing.assert_close(getattr(partial, name)[0], getattr(reference, name)[0])
    resumed = train(tiny_model, prompts, config, progress=False, resume=str(ckpt))
    assert resumed.complete and not resumed.metadata["interrupted"]
    for name in names:
        # tol: resume is bit-exact up to ulps of O(1) entries
        torch.testing.assert_close(
            getattr(resumed, name), getattr(reference, name), rtol=0, atol=1e-6
        )
    torch.testing.assert_close(resumed.losses, reference.losses, equal_nan=True)


@pytest.mark.parametrize(
    "family,orthogonal,max_rows",
    [
        ("vectors", "simultaneous", 5),  # whole members: 2 per pass (2 prompts each)
        ("vectors", "soft", 2),  # one member per pass
        ("vectors", "none", 1),  # one (member, prompt) row per pass
        ("adapters", "none", 3),
    ],
)
def test_split_passes_equal_one_pass(tiny_model, family, orthogonal, max_rows):
    """Gradient accumulation over passes of `max_rows` rows gives one pass's result."""
    train, make_config, _, names = FAMILIES[family]
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    config = make_config(orthogonal=orthogonal)
    whole = train(tiny_model, prompts, config, progress=False)
    split = train(tiny_model, prompts, config, progress=False, max_rows_per_pass=max_rows)
    assert split.metadata["rows_per_pass"] == max_rows
    assert whole.metadata["rows_per_pass"] == 3 * len(TOKENS)
    # step 0's objective is one forward pass: equal up to float rounding of the sums
    torch.testing.assert_close(split.losses[:, 0], whole.losses[:, 0], rtol=1e-6, atol=0)
    for name in names:  # 20 steps of AMSGrad carry that rounding along; entries are O(1)
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=1e-4, atol=1e-5)


def test_soft_deltas_cannot_be_split(tiny_model):
    train, make_config, _, _ = FAMILIES["vectors"]
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    config = make_config(orthogonal="soft", soft_on="deltas")
    with pytest.raises(ValueError, match="soft_on='deltas' compares every member"):
        train(tiny_model, prompts, config, progress=False, max_rows_per_pass=2)
