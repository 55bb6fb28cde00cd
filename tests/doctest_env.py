"""A pytest plugin (`-p doctest_env` in pyproject.toml): the doctest namespace of the
package's `Examples:` blocks, built on tiny models from configs (seconds, offline), so the
examples run instead of being skipped. `model` is the 4-layer tiny model with the
in-memory character tokenizer; `vectors` / `adapters` are small random artifacts on it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def _doctest_objects() -> dict:
    from conftest import make_tiny, make_tiny_tokenizer

    import melbo_lens
    from melbo_lens import HookSite, PromptSet, SteeringAdapters, SteeringVectors

    torch.set_num_threads(1)
    model = make_tiny(n_layers=8)
    model.set_tokenizer(make_tiny_tokenizer())
    gen = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    vectors = SteeringVectors(
        4.0 * unit(torch.randn(4, 32, generator=gen), dim=-1),
        HookSite(1),
        target=HookSite(3),
        method="random",
    )
    adapters = SteeringAdapters(
        unit(torch.randn(2, 64, 1, generator=gen), dim=1),
        unit(torch.randn(2, 32, 1, generator=gen), dim=1),
        layer=1,
        radius=4.0,
        target=HookSite(3),
    )
    names = {name: getattr(melbo_lens, name) for name in melbo_lens.__all__}
    import json

    from analysis.test_sae import make_sae  # a planted-decoder sae-lens SAE at blocks.1

    direction = unit(torch.randn(32, generator=gen), dim=-1)
    return {
        **names,
        "torch": torch,
        "model": model,
        "prompts": PromptSet.from_texts(model, ["hello there", "a cat"]),
        "tokens": torch.tensor([[1, 2, 3, 4]]),
        "vectors": vectors,
        "adapters": adapters,
        "theta": vectors.vectors,
        "vecs": vectors,
        "melbo": vectors,
        "supervised": vectors[2:],
        "sae": make_sae(),
        "json": json,
        "r": direction,
        "refusal_dir": direction,
        "reference": PromptSet.from_texts(model, ["the dog", "a day"]),
        "pos_texts": ["i love it", "great day", "so happy"],
        "neg_texts": ["i hate it", "awful day", "so sad"],
        "random_objs": [1.0, 2.0, 1.5],
        "config": melbo_lens.MelboConfig(
            HookSite(1), HookSite(3), n_vectors=2, radius=4.0, steps=3
        ),
    }


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace) -> None:
    if "doctest" in type(request.node).__name__.lower():
        doctest_namespace.update(request.getfixturevalue("_doctest_objects"))
