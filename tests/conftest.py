"""Shared fixtures: tiny models built from configs (seconds), a seeded RNG."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

torch.set_num_threads(1)


def tiny_config(**overrides) -> HookedTransformerConfig:
    cfg = dict(
        n_layers=4,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        seed=0,
        default_prepend_bos=False,
    )
    cfg.update(overrides)
    return HookedTransformerConfig(**cfg)


def make_tiny(**overrides) -> HookedTransformer:
    torch.manual_seed(overrides.pop("init_seed", 0))
    model = HookedTransformer(tiny_config(**overrides))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    return make_tiny()


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# Tiny offline tokenizer: one token per character plus a few special / chat-marker tokens,
# exactly d_vocab=50 entries so it fits `make_tiny()`. No hub, built in memory.
TINY_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
TINY_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHARS = (
    list("abcdefghijklmnopqrstuvwxyz") + [" ", "\n", ".", ",", "!", "?"] + list("0123456789")
)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + TINY_MARKERS + TINY_CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        # name_or_path + add_bos_token=True: TransformerLens's set_tokenizer then keeps this
        # object instead of re-loading it from the hub.
        name_or_path="tiny-char",
        add_bos_token=True,
    )
    tok.add_tokens(TINY_MARKERS)  # already in the vocab: matched whole, decoded as text
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_tok_model() -> HookedTransformer:
    """`make_tiny()` with the in-memory character tokenizer (pad=3, bos=1, eos=2)."""
    model = make_tiny()
    model.set_tokenizer(make_tiny_tokenizer())
    assert len(model.tokenizer) == model.cfg.d_vocab
    return model


def interrupted_then_resumed(train, model, prompts, config, tmp_path, *, after: int = 3):
    """Train with a checkpoint, stop after `after` steps through the callback, then resume
    from the checkpoint: (the interrupted artifact, the resumed one). Resume tests compare
    the resumed artifact with an uninterrupted run."""
    calls: list[int] = []
    path = tmp_path / "run.safetensors"
    part = train(
        model,
        prompts,
        config,
        progress=False,
        checkpoint=path,
        callback=lambda s: calls.append(1) or len(calls) < after,
    )
    assert part.metadata["interrupted"]
    return part, train(model, prompts, config, progress=False, resume=str(path))
