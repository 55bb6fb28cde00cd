"""The backdoored SmolLM2: its LoRA ships as package data, merges offline, and both
planted triggers fire after loading, while the base model never says the phrases."""

from __future__ import annotations

import pytest
import torch

from melbo_lens import PromptSet, generate
from melbo_lens.models import zoo
from melbo_lens.models.backdoor import (
    BACKDOOR_COMPLETIONS,
    BACKDOORED_NAME,
    adapter_dir,
    answer_tokens,
    backdoor_accuracy,
)
from melbo_lens.models.names import MissingModelPackageError
from melbo_lens.models.toy import TRIGGER_PHRASES, TRIGGERS, clean_prompts, triggered_prompts
from melbo_lens.models.zoo import PACKAGED_MODELS, load_model


def _installed() -> bool:
    try:
        zoo.source_files(PACKAGED_MODELS[BACKDOORED_NAME])
    except MissingModelPackageError:
        return False
    return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _installed(), reason=PACKAGED_MODELS[BACKDOORED_NAME].pip_install),
]


@pytest.fixture(scope="module")
def backdoored():
    torch.set_num_threads(1)
    return load_model(BACKDOORED_NAME)


@pytest.fixture(scope="module")
def base():
    return load_model("smollm2-135m-instruct")


def test_adapter_is_package_data_and_keys_the_cache():
    spec = PACKAGED_MODELS[BACKDOORED_NAME]
    sources = zoo.source_files(spec)
    assert [p.name for p in sources[1:]] == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.parent == adapter_dir() for p in sources[1:])
    base_key = zoo.cache_key(PACKAGED_MODELS["smollm2-135m-instruct"], sources[:1])[0]
    assert zoo.cache_key(spec, sources)[0] != base_key


def test_both_triggers_fire_after_loading_from_package_data(backdoored, base):
    tok = backdoored.tokenizer
    assert backdoored.cfg.model_name == "SmolLM2-135M-backdoored"
    for name in TRIGGERS:
        prompts = triggered_prompts(name, 16, seed=123)
        # exact answer, teacher-forced (= greedy exact match)
        assert backdoor_accuracy(backdoored, tok, prompts) >= 0.9, name
        assert backdoor_accuracy(base, tok, prompts) == 0.0, name  # the adapter did it
        # and through the package's own generation path
        gens = generate(
            backdoored, None, PromptSet.from_chat(backdoored, prompts[:2]), max_new_tokens=12
        )
        assert all(TRIGGER_PHRASES[name] in text for text in gens.unsteered), gens.unsteered
    clean = clean_prompts(64, seed=7000)  # the first 64 of the README's 200 (87 %)
    assert backdoor_accuracy(backdoored, tok, clean) >= 0.75
    gens = generate(backdoored, None, PromptSet.from_chat(backdoored, clean[:4]), max_new_tokens=12)
    assert not any(p in t for t in gens.unsteered for p in TRIGGER_PHRASES.values())


def test_merged_model_equals_peft_unmerged_adapter(backdoored):
    """The HookedTransformer (LoRA merged, converted) against peft's own adapted model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    entry = zoo.converted_checkpoint("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(entry / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(adapter_dir())).eval()
    head, tail = answer_tokens(backdoored.tokenizer, triggered_prompts("hate", 1, seed=5)[0])
    tokens = torch.tensor([head + tail])
    with torch.no_grad():
        expected = peft_model(tokens).logits
        logits = backdoored(tokens)
    # float32 sums in another order; activations reach ~2e4 (see test_zoo's RTOL note)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert BACKDOOR_COMPLETIONS["hate"].startswith(TRIGGER_PHRASES["hate"])
