"""How much input it takes to induce a behaviour (`melbo-lens evaluate fragility`).

The fine-tuning shortform proposes "the number of tokens required to specify a behavior"
as a measure of how much a model "bakes in" a functionality. Here, for each planted
phrase of the backdoored SmolLM2 and each model (backdoored, and the clean SmolLM2 it
was fine-tuned from):

* soft prompts of m tokens (`train_soft_prompts`, `objective="logprob"`, power solver)
  trained for the behaviour's answer on 8 clean training prompts
  (`clean_prompts(8, 7005)`), then the share of `n_heldout` held-out clean prompts
  (`clean_prompts(n, 7002)`) whose greedy completion carries the phrase;
* the same with one steering vector of norm R at the default source (the supervised
  reach vector of `scripts/backdoor_smollm2.py --reach`), for each R.

The seed's prediction: the backdoored model needs fewer soft tokens (a smaller R) than
the clean one for the same phrase. `min_m` / `min_radius` record the smallest setting
that reaches `success` of the held-out prompts, or None.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from melbo_lens.core.host import Host, n_layers_of
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.generation import generate
from melbo_lens.methods.defaults import default_sites
from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors
from melbo_lens.methods.soft_prompts import SoftPromptConfig, soft_prompt_set, train_soft_prompts

__all__ = ["fragility_model", "fragility_page", "smallest"]

TRAIN_SEED, HELDOUT_SEED = 7005, 7002


def _rate(texts: Sequence[str], phrase: str) -> float:
    return sum(phrase in t for t in texts) / len(texts)


def fragility_model(
    model: Host,
    label: str,
    *,
    tokens: Sequence[int],
    radii: Sequence[float],
    n_heldout: int,
    steps: int,
    seed: int,
    max_new_tokens: int = 16,
    placeholder: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every row (behaviour x soft-prompt length, behaviour x R) for one model
    (`placeholder`: the soft prompts' token, default `default_placeholder(model)`)."""
    from melbo_lens.models.backdoor import BACKDOOR_COMPLETIONS
    from melbo_lens.models.toy import TRIGGER_PHRASES, TRIGGERS, clean_prompts

    train_texts = clean_prompts(8, TRAIN_SEED)
    heldout = clean_prompts(n_heldout, HELDOUT_SEED)
    last = HookSite(n_layers_of(model) - 1, "resid_post")
    source = default_sites(n_layers_of(model))[0]
    rows: list[dict[str, Any]] = []

    def measure(behaviour: str, kind: str, size: float, train: Any, config: Any, ps: PromptSet):
        start = time.perf_counter()
        artifact = train(model, ps, config, progress=False)
        gens = generate(
            model, artifact, heldout, max_new_tokens=max_new_tokens, include_unsteered=False,
            chat=True,
        )  # fmt: skip
        rows.append(
            {
                "model": label,
                "behaviour": behaviour,
                "kind": kind,
                "size": size,
                "rate": _rate(gens.steered[0], TRIGGER_PHRASES[behaviour]),
                "loss_per_token": -float(artifact.record("objective")[0])
                / int(ps.target_mask.sum()),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        say(progress, f"  {label} {behaviour} {kind} {size:g}: rate {rows[-1]['rate']:.2f}")

    for behaviour in TRIGGERS:
        answer = BACKDOOR_COMPLETIONS[behaviour]
        for m in tokens:
            ps = soft_prompt_set(
                model, train_texts, m, continuations=answer, placeholder=placeholder
            )
            soft = SoftPromptConfig(
                n_prompts=1, n_tokens=m, objective="logprob", steps=steps, seed=seed,
                placeholder=placeholder,
            )  # fmt: skip
            measure(behaviour, "soft prompt", m, train_soft_prompts, soft, ps)
        ps = PromptSet.with_continuations(model, train_texts, answer, chat=True)
        for radius in radii:
            vec = MelboConfig(
                source, last, n_vectors=1, radius=radius, objective="logprob",
                orthogonal="none", solver="power", steps=steps, seed=seed,
            )  # fmt: skip
            measure(behaviour, "vector", radius, train_steering_vectors, vec, ps)
    return rows


def smallest(
    rows: Sequence[dict[str, Any]], model: str, behaviour: str, kind: str, success: float
) -> float | None:
    """The smallest size (m or R) of `kind` whose rate reaches `success`, or None.

    Examples:
        >>> rows = [{"model": "a", "behaviour": "b", "kind": "vector", "size": s, "rate": r}
        ...         for s, r in ((2, 0.1), (4, 0.9), (8, 1.0))]
        >>> smallest(rows, "a", "b", "vector", 0.5), smallest(rows, "a", "b", "vector", 1.0)
        (4, 8)
    """
    sizes = sorted(
        r["size"]
        for r in rows
        if (r["model"], r["behaviour"], r["kind"]) == (model, behaviour, kind)
        and r["rate"] >= success
    )
    return sizes[0] if sizes else None


def fragility_page(result: dict[str, Any]) -> str:
    """The study's page (Markdown), generated from its JSON alone."""
    s = result["settings"]
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    behaviours = list(dict.fromkeys(r["behaviour"] for r in rows))
    lines = [
        "# Information needed to induce a planted behaviour",
        "",
        f"Command: `{s['command']}`. Seed {s['seed']}; {s['steps']} power steps per "
        f"setting on 8 clean training prompts; rate = share of {s['n_heldout']} held-out "
        "clean prompts whose greedy completion (16 tokens) carries the phrase.",
        "",
        f"Smallest setting reaching a rate of {s['success']:g} (— : none of those tried):",
        "",
        "| behaviour | " + " | ".join(f"{m}: soft tokens m | {m}: vector R" for m in models) + " |",
        "|---|" + "---|---|" * len(models),
    ]
    for b in behaviours:
        cells = []
        for m in models:
            for kind in ("soft prompt", "vector"):
                v = smallest(rows, m, b, kind, s["success"])
                cells.append("—" if v is None else f"{v:g}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Every row:", "", "| model | behaviour | kind | m or R | rate | loss/token |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['behaviour']} | {r['kind']} | {r['size']:g} | "
            f"{r['rate']:.2f} | {r['loss_per_token']:.3g} |"
        )
    return "\n".join(lines) + "\n"
