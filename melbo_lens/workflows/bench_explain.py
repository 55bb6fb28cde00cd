"""Benchmark of the explanations: feature dashboards over a corpus, and vector cards.

Measured in one run on one machine, each against a reference timed in the same run:

* **dashboards**: every latent of one packaged SAE over the first `tokens` tokens of the
  corpus (one streamed pass, no cache). Reference: the forward pass to the SAE's hook
  alone over a slice of the same rows, scaled to all rows (the floor no dashboard pass
  can beat), so the ratio is the cost of encoding and keeping the statistics. Memory:
  the process's peak resident set, against what storing every activation of the pass
  would take (tokens x d_sae x 4 bytes).
* **cards**: a card for each of `n_vectors` random vectors of norm R at the default
  source (contexts, next-token effects and target latents with the packaged target SAE,
  completions of 3 prompts and their behaviours). Reference: plain greedy generation of
  the same completions, the part of a card a user would otherwise run anyway.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from melbo_lens.core.memory import peak_bytes
from melbo_lens.core.segment import run_to_site

__all__ = ["explain_benchmark"]


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def explain_benchmark(
    model_name: str = "smollm2-135m-instruct",
    *,
    sae_name: str = "smollm2-135m-instruct-res7",
    target_sae: str | None = "smollm2-135m-instruct-res22-pre",
    corpus: Any = "melbo-chat-prose",
    tokens: int = 1_000_000,
    n_vectors: int = 8,
    radius: float = 15.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Time dashboards and cards (see the module docstring); returns the numbers printed."""
    from melbo_lens.analysis.cards import vector_cards
    from melbo_lens.analysis.corpus import load_corpus
    from melbo_lens.analysis.sae import load_sae, sae_site
    from melbo_lens.analysis.sae.dashboards import feature_dashboards
    from melbo_lens.generation import generate
    from melbo_lens.methods.baselines import random_vectors
    from melbo_lens.methods.defaults import default_sites
    from melbo_lens.models.zoo import load_model

    model = load_model(model_name)
    sae = load_sae(sae_name)
    c = load_corpus(corpus)
    base_rss = peak_bytes("cpu")
    rows = c.token_rows(model.tokenizer, 128, max_tokens=tokens)
    site = sae_site(sae).name
    probe = rows[: min(len(rows), 64)]

    def forward_only() -> None:
        with torch.no_grad():
            for i in range(0, len(probe), 16):
                batch = probe[i : i + 16]
                run_to_site(model, batch, torch.ones_like(batch, dtype=torch.bool), site)

    forward_only()  # warm-up
    _, fwd_probe = _timed(forward_only)
    fwd_all = fwd_probe * len(rows) / len(probe)
    dash, dash_s = _timed(
        lambda: feature_dashboards(model, sae, c, max_tokens=tokens, cache=False, progress=progress)
    )
    peak = peak_bytes("cpu")
    n_tok = dash.n_tokens  # type: ignore[union-attr]
    d_sae = int(sae.cfg.d_sae)
    out: dict[str, Any] = {
        "model": model_name,
        "sae": sae_name,
        "d_sae": d_sae,
        "corpus": c.name,
        "threads": torch.get_num_threads(),
        "dashboards": {
            "latents": d_sae,
            "tokens": n_tok,
            "seconds": round(dash_s, 1),
            "tokens_per_second": round(n_tok / dash_s, 1),
            "forward_only_seconds_estimated": round(fwd_all, 1),
            "ratio_to_forward_only": round(dash_s / fwd_all, 2),
            "peak_rss_gib": round(peak / 2**30, 2),
            "rss_before_pass_gib": round(base_rss / 2**30, 2),
            "all_activations_gib": round(n_tok * d_sae * 4 / 2**30, 1),
            # dead latents over the whole pass (the SAE's metrics.json counts those never
            # active on its ~8k held-out tokens, an upper bound)
            "never_active": int((dash.active == 0).sum()),  # type: ignore[union-attr]
            "never_active_frac": round(float((dash.active == 0).float().mean()), 4),  # type: ignore[union-attr]
            "target_seconds": 900,
            "target_peak_gib": 4.0,
        },
    }
    source = default_sites(model.cfg.n_layers)[0]
    vectors = random_vectors(model, source, n=n_vectors, radius=radius, seed=0)
    tsae = load_sae(target_sae) if target_sae else None
    prompts = [
        "What is the best way to learn a new language?",
        "Write a short poem about the sea.",
        "Explain how a bicycle works.",
    ]
    _, gen_s = _timed(lambda: generate(model, vectors, prompts, max_new_tokens=32, chat=True))
    cards, cards_s = _timed(
        lambda: vector_cards(model, vectors, c, sae=tsae, prompts=prompts, max_new_tokens=32)
    )
    out["cards"] = {
        "vectors": n_vectors,
        "radius": radius,
        "source": source.name,
        "target_sae": target_sae,
        "seconds": round(cards_s, 1),
        "generation_only_seconds": round(gen_s, 1),
        "ratio_to_generation_only": round(cards_s / gen_s, 2),
        "target_seconds": 120,
        "behaviours": sorted({str(card.behavior) for card in cards}),
    }
    d, k = out["dashboards"], out["cards"]
    print(
        f"dashboards: {d['latents']} latents x {d['tokens']:,} tokens in {d['seconds']} s "
        f"({d['tokens_per_second']:,} tok/s; {d['ratio_to_forward_only']}x the forward pass "
        f"alone); peak RSS {d['peak_rss_gib']} GiB (all activations would be "
        f"{d['all_activations_gib']} GiB); targets <= 900 s, <= 4 GiB"
    )
    print(
        f"cards: {k['vectors']} vectors in {k['seconds']} s ({k['ratio_to_generation_only']}x "
        f"generating their completions alone, {k['generation_only_seconds']} s); target <= 120 s"
    )
    return out
