"""Feature clamping against steering vectors, compared fairly (`melbo-lens evaluate features`).

The steering-vector comments: a published comparison of SAE feature clamping with
steering vectors was not done well, and mean-difference vectors "generally require
averaging over at least 32 contrast pairs". The comparison here, on the clean
SmolLM2-135M-Instruct at MELBO's default source (`blocks.7.hook_resid_post`, where the
packaged SAE `smollm2-135m-instruct-res7` reads):

* **Behaviour: talking about weddings** (ActAdd's example). The clean model can express
  it, it is off-topic for every neutral prompt, and a completion shows it or not by its
  words (`WEDDING`), so no classifier model is needed and the rate is unambiguous.
* **Contrast pairs** (`contrast_pairs`): 128 chat prompts, each a template with a wedding
  topic against the same template with a matched everyday topic; activations averaged
  over each prompt's tokens (`position="mean"`: at the last token, the assistant turn's
  start, the 128-pair vector elicited no wedding at any norm up to a KL of 5 nats in a
  trial run, while the mean over the prompt carries the topic).
* **Perturbations**: difference-of-means vectors from n = 1, 2, 4, ..., 128 pairs
  (`draws` random subsets per n below 128); a logistic probe direction (all pairs); and
  the best single SAE latent clamped (`FeatureClamp`): candidates are the latents whose
  decoder is closest to the 128-pair vector and those whose activation rises most on the
  positive side; the best is chosen by its rate on the *dev* prompts at the matched KL,
  then measured on the evaluation prompts like everything else.
* **Matched effect**: each is scaled (vectors: the norm; the clamp: its value) so that
  the mean next-token KL(unsteered || steered) over the dev prompts' real tokens equals
  each target in `kl_targets` (bisection in log scale, `match_kl`).
* **Measured** on `NEUTRAL_PROMPTS[16:]` (32 evaluation prompts, disjoint from the dev
  ones): the share of greedy completions that mention weddings, and the fluency cost,
  the mean log-perplexity of the steered completion under the unsteered model minus
  that of the unsteered completion (`analysis.diversity.fluency`).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from melbo_lens.analysis.diversity import fluency
from melbo_lens.analysis.sae.clamps import FeatureClamp
from melbo_lens.core.host import Host
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, as_site
from melbo_lens.generation import generate
from melbo_lens.methods.contrast import pair_activations
from melbo_lens.methods.estimators import logistic_probe, mean_difference
from melbo_lens.perturbations.base import Perturbation, apply
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "NEUTRAL_PROMPTS",
    "WEDDING",
    "contrast_pairs",
    "features_page",
    "features_study",
    "match_kl",
    "mean_kl",
]

WEDDING = re.compile(
    r"\b(weddings?|brides?|bridal|grooms?|marriages?|married|marry|ceremony|vows|honeymoon)\b",
    re.IGNORECASE,
)
"""A completion talks about weddings when it contains one of these words."""

_TEMPLATES = (
    "Tell me about {}.",
    "I keep thinking about {}.",
    "Let's talk about {}.",
    "My favourite subject is {}.",
    "Yesterday I read an article about {}.",
    "Write a short paragraph about {}.",
    "What do you know about {}?",
    "The podcast today is about {}.",
    "He could not stop talking about {}.",
    "Write a short story about {}.",
    "The book I am reading is about {}.",
    "Our conversation turned to {}.",
    "Give me three facts about {}.",
    "I dreamed about {} last night.",
    "Everyone at work was discussing {}.",
    "Explain {} to a child.",
)
_TOPICS = (
    ("weddings", "taxes"),
    ("a wedding ceremony", "a board meeting"),
    ("the bride and groom", "the buyer and seller"),
    ("getting married", "getting groceries"),
    ("wedding dresses", "winter coats"),
    ("the wedding reception", "the train station"),
    ("marriage vows", "parking rules"),
    ("a wedding cake", "a chocolate cake"),
)

NEUTRAL_PROMPTS: tuple[str, ...] = (
    # dev (16): KL calibration and the latent's selection
    "Give me some advice for a productive morning.",
    "Describe your favourite city.",
    "How do I fix a flat bicycle tyre?",
    "What should I cook for dinner tonight?",
    "Explain how rain forms.",
    "Write a sentence about the ocean.",
    "What is a good book to read on holiday?",
    "How can I learn to play the guitar?",
    "Tell me something interesting about space.",
    "What are the benefits of walking every day?",
    "Describe a busy market.",
    "How do plants grow?",
    "What is your opinion on modern art?",
    "Give me tips for a job interview.",
    "Write a short note to a neighbour.",
    "What makes a good cup of coffee?",
    # evaluation (32)
    "What is the best way to spend a rainy Sunday afternoon?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "Describe a walk in the forest.",
    "What should I pack for a camping trip?",
    "Explain how a bicycle works.",
    "Tell me about your favourite season.",
    "How can I improve my handwriting?",
    "What is a healthy breakfast?",
    "Describe the view from a mountain top.",
    "Give me ideas for a birthday present for my brother.",
    "How do computers store information?",
    "What is the history of the piano?",
    "Write a short description of a cat.",
    "How do I start running?",
    "What are some fun things to do in a city?",
    "Explain why the sky is blue.",
    "Tell me a fact about elephants.",
    "How do I keep my houseplants alive?",
    "Describe a thunderstorm.",
    "What is a good hobby to pick up?",
    "Write a few lines about the moon.",
    "How should I organise my desk?",
    "What do bees do in winter?",
    "Describe your ideal weekend.",
    "How do trains work?",
    "Give me advice on saving money.",
    "What is the tallest building in the world like?",
    "Describe a quiet library.",
    "How do I bake bread?",
    "Tell me about the history of chess.",
    "What makes a good friend?",
)
N_DEV = 16


def contrast_pairs() -> tuple[list[str], list[str]]:
    """The 128 (positive, negative) prompts: every template with every topic pair.

    Examples:
        >>> pos, neg = contrast_pairs()
        >>> len(pos), pos[0], neg[0]
        (128, 'Tell me about weddings.', 'Tell me about taxes.')
    """
    pairs = [(t.format(a), t.format(b)) for t in _TEMPLATES for a, b in _TOPICS]
    return [p for p, _ in pairs], [n for _, n in pairs]


@torch.no_grad()
def mean_kl(model: Host, perturbation: Perturbation, prompts: PromptSet) -> float:
    """Mean over the prompts' real tokens of KL(p_unsteered || p_steered) (next token)."""
    tokens, attn = prompts.tokens, prompts.attention_mask
    base = model(tokens, attention_mask=attn.long()).log_softmax(-1)
    with apply(model, perturbation, 0):
        steered = model(tokens, attention_mask=attn.long()).log_softmax(-1)
    kl = (base.exp() * (base - steered)).sum(-1)
    return float((kl * attn).sum() / attn.sum())


def match_kl(
    kl_of: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    iters: int = 6,
) -> tuple[float, float]:
    """(x, kl_of(x)) with kl_of(x) ≈ target, by bisection in log scale on [lo, hi]
    (`kl_of` increasing); `hi` is doubled until it passes the target (at most 20 times).

    Examples:
        >>> x, kl = match_kl(lambda s: s * s, 4.0, 0.1, 1.0)
        >>> round(x, 1), round(kl, 1)
        (2.0, 4.0)
    """
    for _ in range(20):
        if kl_of(hi) >= target:
            break
        lo, hi = hi, 2 * hi
    else:
        raise ValueError(f"no value up to {hi:g} reaches KL {target:g}")
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if kl_of(mid) < target:
            lo = mid
        else:
            hi = mid
    x = math.sqrt(lo * hi)
    return x, kl_of(x)


def _vector(direction: torch.Tensor, site: HookSite, norm: float, method: str) -> SteeringVectors:
    unit = direction.float().flatten() / direction.float().norm()
    return SteeringVectors((unit * norm)[None], site, method=method)


def _measure(
    model: Host, perturbation: Perturbation, prompts: PromptSet, max_new_tokens: int
) -> tuple[list[str], list[float]]:
    gens = generate(
        model, perturbation, prompts, max_new_tokens=max_new_tokens, include_unsteered=False
    )
    texts = list(gens.steered[0])
    return texts, [math.log(x) for x in fluency(model, prompts, texts)]


def features_study(
    model: Host,
    sae: Any,
    *,
    kl_targets: Sequence[float],
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    draws: int = 3,
    n_candidates: int = 8,
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The study (see the module docstring); returns its JSON record."""
    site = as_site(sae.cfg.metadata.hook_name)
    dev = PromptSet.from_chat(model, list(NEUTRAL_PROMPTS[:N_DEV]))
    evaluation = PromptSet.from_chat(model, list(NEUTRAL_PROMPTS[N_DEV:]))
    pos, neg = contrast_pairs()
    P, N, _ = pair_activations(
        model, PromptSet.from_chat(model, pos), PromptSet.from_chat(model, neg), site,
        position="mean",
    )  # fmt: skip
    full = mean_difference(P, N).flatten()
    probe, probe_info = logistic_probe(P, N, 1e-2, 500)
    rng = random.Random(seed)
    directions: list[tuple[str, int, torch.Tensor]] = []
    for n in sizes:
        for _ in range(1 if n >= len(pos) else draws):
            idx = rng.sample(range(len(pos)), n)
            directions.append(("mean_difference", n, mean_difference(P[idx], N[idx]).flatten()))
    directions.append(("probe", len(pos), probe.flatten()))

    # latent candidates: decoder closest to the 128-pair vector, activation rising most
    w_dec = sae.W_dec.detach().float()
    cos = torch.nn.functional.cosine_similarity(w_dec, full.float()[None], dim=-1)
    with torch.no_grad():
        f_pos, f_neg = sae.encode(P.float()), sae.encode(N.float())
    rise = (f_pos - f_neg).mean(0)
    half = n_candidates // 2
    by_cos = cos.argsort(descending=True)[:half].tolist()
    candidates = list(dict.fromkeys(by_cos + rise.argsort(descending=True)[:half].tolist()))
    unsteered = generate(model, None, evaluation, max_new_tokens=max_new_tokens)
    base_texts = list(unsteered.unsteered or [])
    base_logppl = [math.log(x) for x in fluency(model, evaluation, base_texts)]
    out: dict[str, Any] = {
        "site": site.name,
        "n_pairs": len(pos),
        "probe": {k: v for k, v in probe_info.items() if isinstance(v, (int, float))},
        "candidates": [
            {"latent": i, "cos": round(float(cos[i]), 4), "rise": round(float(rise[i]), 4)}
            for i in candidates
        ],
        "unsteered": {
            "rate": sum(bool(WEDDING.search(t)) for t in base_texts) / len(base_texts),
            "mean_log_ppl": sum(base_logppl) / len(base_logppl),
            "examples": base_texts[:3],
        },
        "levels": [],
    }

    def row(kind: str, n: int, pert: Perturbation, knob: float, kl: float) -> dict[str, Any]:
        texts, logppl = _measure(model, pert, evaluation, max_new_tokens)
        cost = [a - b for a, b in zip(logppl, base_logppl, strict=True)]
        return {
            "kind": kind,
            "n_pairs": n,
            "knob": round(knob, 4),
            "kl": round(kl, 4),
            "rate": sum(bool(WEDDING.search(t)) for t in texts) / len(texts),
            "fluency_cost": sum(cost) / len(cost),
            "examples": texts[:2],
        }

    for target in kl_targets:
        say(progress, f"KL {target}: vectors")
        rows = []
        for kind, n, direction in directions:
            norm, kl = match_kl(
                lambda r, d=direction, k=kind: mean_kl(model, _vector(d, site, r, k), dev),
                target, 8.0, 16.0,
            )  # fmt: skip
            rows.append(row(kind, n, _vector(direction, site, norm, kind), norm, kl))
            say(progress, f"  {kind} n={n}: norm {norm:.1f}, rate {rows[-1]['rate']:.2f}")
        say(progress, f"KL {target}: {len(candidates)} latent candidates on the dev prompts")
        dev_rates = {}
        for latent in candidates:
            try:
                value, kl = match_kl(
                    lambda v, i=latent: mean_kl(model, FeatureClamp(sae, [i], [v]), dev),
                    target, 1.0, 4.0,
                )  # fmt: skip
            except ValueError:  # the clamp cannot move the output that far
                continue
            texts = list(generate(model, FeatureClamp(sae, [latent], [value]), dev,
                                  max_new_tokens=max_new_tokens, include_unsteered=False
                                  ).steered[0])  # fmt: skip
            dev_rates[latent] = (sum(bool(WEDDING.search(t)) for t in texts) / len(texts), value)
        if not dev_rates:
            raise ValueError(f"no latent candidate reaches KL {target}; lower kl_targets")
        best = max(dev_rates, key=lambda i: (dev_rates[i][0], -candidates.index(i)))
        value = dev_rates[best][1]
        clamp = FeatureClamp(sae, [best], [value])
        rows.append(row("sae_latent", best, clamp, value, mean_kl(model, clamp, dev)))
        out["levels"].append(
            {
                "kl_target": target,
                "dev_rates": {str(i): r for i, (r, _) in dev_rates.items()},
                "best_latent": best,
                "rows": rows,
            }
        )
    return out


def _summary(rows: list[dict[str, Any]], kind: str, n: int) -> tuple[float, float, float, float]:
    picked = [r for r in rows if r["kind"] == kind and r["n_pairs"] == n]
    rates = [r["rate"] for r in picked]
    costs = [r["fluency_cost"] for r in picked]
    return sum(rates) / len(rates), min(rates), max(rates), sum(costs) / len(costs)


def features_page(result: dict[str, Any]) -> str:
    """The study's page (Markdown), generated from its JSON alone."""
    s, r = result["settings"], result["result"]
    u = r["unsteered"]
    lines = [
        f"# Feature clamping against steering vectors ({s['model']}, weddings)",
        "",
        f"Command: `{s['command']}`. Site `{r['site']}`, SAE `{s['sae']}`; {r['n_pairs']} "
        f"contrast pairs; {s['draws']} random subsets per size; rates on "
        f"{len(NEUTRAL_PROMPTS) - N_DEV} evaluation prompts, {s['max_new_tokens']} new tokens; "
        f"unsteered rate {u['rate']:.2f}.",
        "",
        "Fluency cost = mean log-perplexity of the steered completion under the unsteered "
        "model minus the unsteered completion's. Every row is scaled to the same mean "
        "next-token KL on the dev prompts.",
    ]
    for level in r["levels"]:
        rows = level["rows"]
        lines += [
            "",
            f"## KL = {level['kl_target']}",
            "",
            "| perturbation | pairs | wedding rate (mean; min–max over subsets) | fluency cost |",
            "|---|---|---|---|",
        ]
        seen: list[tuple[str, int]] = []
        for x in rows:
            key = (x["kind"], x["n_pairs"])
            if key in seen:
                continue
            seen.append(key)
            mean, lo, hi, cost = _summary(rows, *key)
            spread = f" ({lo:.2f}–{hi:.2f})" if lo != hi else ""
            name = {"sae_latent": f"SAE latent {x['n_pairs']} clamped to {x['knob']:.2f}"}.get(
                x["kind"], x["kind"].replace("_", " ")
            )
            pairs = "—" if x["kind"] == "sae_latent" else str(x["n_pairs"])
            lines.append(f"| {name} | {pairs} | {mean:.2f}{spread} | {cost:+.2f} |")
        dev = ", ".join(f"{i}: {v:.2f}" for i, v in level["dev_rates"].items())
        lines += ["", f"Latent candidates' dev rates: {dev}."]
    return "\n".join(lines) + "\n"
