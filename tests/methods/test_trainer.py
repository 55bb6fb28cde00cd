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
        lambda **kw: MelboConfig(HookSite(0), HookSite(2), n_vectors=3, radius=2.0, steps=20, **kw),
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
    torch.testing.assert_close(resumed.losses, reference.losses)
