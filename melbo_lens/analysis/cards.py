"""A card is what a learned perturbation means, asked the way a feature dashboard asks it
of an SAE latent (DESIGN.md: "a feature dashboard is the card of a latent; a vector card
is the card of a learned perturbation"). For each member of any perturbation:

(a) **where its direction is present** at the source: corpus tokens with the largest
    projection of the residual onto θ/||θ|| (steering vectors) or the largest
    ||h Ω_A|| of the MLP hidden activation (adapters: their input directions);
(b) **what it does to next-token predictions**: steered against unsteered log-softmax
    on corpus rows (the perturbation applied through its own hooks, at every position),
    averaged over positions >= 1: the tokens whose probability rises and falls most, each
    with its mean change in log-probability (ranking by that alone lists rare tokens whose
    log-probability moves from -30 to -20), and the mean KL(steered || unsteered);
(c) **which latents it turns on and off** at a later SAE's hook (by default the SAE
    at the perturbation's target), from the same runs: mean change in each latent's
    activation; each latent links to its dashboard in the views;
(d) **what it makes the model say**: greedy completions of held-out prompts, and the
    behaviour cluster (`classify_completions`) they fall into.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from melbo_lens.analysis.corpus import Corpus, load_corpus
from melbo_lens.analysis.streaming import Context, TopScores, windows_of
from melbo_lens.core.host import Host
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import mlp_hidden_name
from melbo_lens.generation import SteeredGenerations, generate
from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.base import Perturbation
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["PerturbationCard", "vector_cards"]


@dataclass
class PerturbationCard:
    """One member's card (see the module docstring); plain data, JSON-ready.

    Attributes:
        index: The member's index.
        label: Its name in views.
        site: The hook it acts at.
        contexts: Corpus windows where its direction is most present (a).
        promoted: (token, mean Δ log-prob, mean prob) of the tokens it raises most (b).
        suppressed: The same for the tokens it lowers most (b).
        kl: Mean KL(steered ‖ unsteered) over corpus positions (b).
        latents_on: (latent, mean change) of the SAE latents it turns on most (c).
        latents_off: The same for those it turns off (c).
        sae_hook: The SAE's hook (None without an SAE).
        completions: (prompt, completion) pairs under the perturbation (d).
        behavior: The behaviour cluster its completions fall into (d).
        notes: What could not be computed, and why.
    """

    index: int
    label: str
    site: str
    contexts: list[dict[str, Any]] = field(default_factory=list)  # (a) left/token/right/value
    # (b) (token, mean Δ log p, mean Δ p), ranked by mean Δ p
    promoted: list[tuple[str, float, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float, float]] = field(default_factory=list)
    kl: float | None = None  # mean KL(steered || unsteered), nats
    latents_on: list[tuple[int, float]] = field(default_factory=list)  # (c) latent, mean Δ act
    latents_off: list[tuple[int, float]] = field(default_factory=list)
    sae_hook: str | None = None
    completions: list[tuple[str, str]] = field(default_factory=list)  # (d) prompt, text
    behavior: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerturbationCard:
        d = dict(d)
        for key in ("promoted", "suppressed", "completions"):
            d[key] = [tuple(x) for x in d.get(key, [])]
        for key in ("latents_on", "latents_off"):
            d[key] = [(int(a), float(b)) for a, b in d.get(key, [])]
        return cls(**d)

    def summary(self) -> str:
        ups = ", ".join(repr(t[0]) for t in self.promoted[:5])
        where = "".join(self.contexts[0]["token"]) if self.contexts else "?"
        return f"{self.label}: present at {where!r}; promotes {ups}; behaviour {self.behavior}"


def _source_scores(perturbation: Any, indices: list[int]) -> tuple[str, Any] | None:
    """(hook name, scores(act) -> [tokens, members]) for (a), or None if it has no direction."""
    if isinstance(perturbation, SteeringVectors):
        units = torch.nn.functional.normalize(perturbation.vectors[indices].float(), dim=-1)
        return perturbation.site.name, lambda x: x.float() @ units.T.to(x.device)
    if isinstance(perturbation, SteeringAdapters):
        a = perturbation.omega_a[indices].float()  # [m, d_mlp, r]
        return mlp_hidden_name(perturbation.layer), lambda h: torch.einsum(
            "td,mdr->tmr", h.float(), a.to(h.device)
        ).norm(dim=-1)
    return None


def vector_cards(
    model: Host,
    perturbation: Perturbation,
    corpus: Corpus | str | Sequence[str] = "melbo-chat-prose",
    *,
    indices: Sequence[int] | None = None,
    sae: Any = None,
    prompts: Sequence[str] | None = None,
    generations: SteeredGenerations | None = None,
    labels: Sequence[str] | None = None,
    context_tokens: int = 16_384,
    effect_rows: int = 16,
    ctx: int | None = None,
    k: int = 10,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    progress: bool = False,
) -> list[PerturbationCard]:
    """The card of each chosen member of any perturbation (see the module docstring).

    (a) reads the first `context_tokens` tokens of `corpus`; (b) and (c) steer its first
    `effect_rows` held-out rows of `ctx` tokens (default 64, or the model's context; the
    train split when there is no held-out one); (c) needs `sae` (an sae-lens SAE at a hook
    after the perturbation's site); (d) completes `prompts` (chat-formatted when `chat`;
    None: when the tokenizer has a chat template), or reads `generations` when given.

    Args:
        model: the model the perturbation acts on.
        perturbation: any `Perturbation`.
        corpus: a packaged corpus name, a `Corpus` or texts.
        indices: the members to make cards for (default: all).
        sae: an SAE at a hook after the perturbation's site, for (c).
        prompts: prompts to complete for (d).
        generations: completions already made, instead of `prompts`.
        labels: the members' names on the cards.
        context_tokens: corpus tokens read for (a).
        effect_rows: held-out rows steered for (b) and (c).
        ctx: tokens per row.
        k: tokens and latents listed per part.
        max_new_tokens: tokens per completion.
        chat: chat-format `prompts` (None: when the tokenizer has a template).
        progress: show progress.

    Returns:
        One `PerturbationCard` per chosen member.

    Raises:
        IndexError: a member index out of range.

    Examples:
        >>> cards = vector_cards(model, vectors, ["the cat sat on a mat"] * 8, ctx=8,
        ...                      context_tokens=64, effect_rows=2, prompts=["hi"],
        ...                      max_new_tokens=2, chat=False)
        >>> len(cards), len(cards[0].promoted)
        (4, 10)
    """
    n = len(perturbation)
    chosen = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise IndexError(
            f"indices {bad} out of range: the perturbation has {n} members (0..{n - 1})"
        )
    if ctx is None:
        n_ctx = getattr(model.cfg, "n_ctx", None)
        ctx = min(64, n_ctx) if isinstance(n_ctx, int) else 64
    names = list(labels) if labels is not None else [f"member {i}" for i in range(n)]
    c = load_corpus(corpus)
    tok = model.tokenizer
    cards = [PerturbationCard(i, names[i], perturbation.site.name) for i in chosen]
    say = print if progress else (lambda *_: None)

    # (a) where the direction is present
    scorer = _source_scores(perturbation, chosen)
    if scorer is None:
        for card in cards:
            card.notes.append("no source direction: (a) is for vectors and adapters")
    else:
        say("  cards: contexts at the source")
        _contexts(model, c, tok, scorer, cards, context_tokens, ctx, k)

    # (b) + (c): next-token effects and SAE latents on held-out corpus rows
    say("  cards: next-token effects and latents")
    held = c.split("heldout") if c.counts().get("heldout") else c
    rows = held.token_rows(tok, ctx, max_tokens=effect_rows * ctx)
    _effects(model, perturbation, rows, cards, sae, k)

    # (d) completions and behaviours
    if generations is None and prompts:
        say("  cards: completions")
        if chat is None:
            chat = getattr(tok, "chat_template", None) is not None
        generations = generate(
            model,
            perturbation,
            list(prompts),
            indices=chosen,
            max_new_tokens=max_new_tokens,
            chat=chat,
        )
    if generations is not None:
        _behaviours(generations, cards)
    return cards


def _contexts(model, corpus, tok, scorer, cards, context_tokens, ctx, k) -> None:
    hook, score = scorer
    rows = corpus.token_rows(tok, ctx, max_tokens=context_tokens)
    acc = TopScores(len(cards), k=4 * k, n_sample=0, positive_only=False)
    dev = next(iter(model.parameters())).device
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16].to(dev)
        with torch.no_grad():
            x = run_to_site(model, batch, torch.ones_like(batch, dtype=torch.bool), hook)
        s = score(x[:, 1:].reshape(-1, x.shape[-1])).cpu()
        locs = (
            torch.arange(start, start + len(batch))[:, None] * ctx + torch.arange(1, ctx)
        ).flatten()
        acc.update(s, locs)
    windows = windows_of(rows.flatten(), acc.top_locations, 10, 5)
    for j, card in enumerate(cards):
        seen: set[tuple[int, ...]] = set()
        for w, v in zip(windows[j].tolist(), acc.top_values[j].tolist(), strict=True):
            if v == -math.inf or tuple(w) in seen or len(card.contexts) >= k:
                continue  # repeated text (a system prompt) is shown once
            seen.add(tuple(w))
            show = [tok.decode([i]) if i >= 0 else "" for i in w]
            card.contexts.append(asdict(Context(show[:10], show[10], show[11:], float(v))))


def _effects(model: Host, perturbation: Any, rows: Tensor, cards: list, sae: Any, k: int) -> None:
    dev = next(iter(model.parameters())).device
    rows = rows.to(dev)
    sae_hook = None
    if sae is not None:
        from melbo_lens.analysis.sae.loading import hook_name

        sae_hook = hook_name(sae)
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any = None) -> None:
        captured["x"] = act.detach()

    extra = [(sae_hook, grab)] if sae_hook else []
    with torch.no_grad():
        with model.hooks(fwd_hooks=extra):
            clean_lp = torch.log_softmax(model(rows)[:, 1:].float(), -1).flatten(0, 1)
        clean_f = _encode(sae, captured.pop("x")) if sae_hook else None
        # means over positions are linear: reduce each side once (no [pos, vocab] temporaries)
        clean_mean_lp, clean_mean_p = clean_lp.mean(0), clean_lp.exp().mean(0)
        for card in cards:
            hooks = perturbation.hooks(model, [card.index] * len(rows), 1.0)
            with model.hooks(fwd_hooks=[*hooks, *extra]):
                lp = torch.log_softmax(model(rows)[:, 1:].float(), -1).flatten(0, 1)
            p = lp.exp()
            dlogp = lp.mean(0) - clean_mean_lp
            dp = p.mean(0) - clean_mean_p
            lp -= clean_lp  # in place: log p_steered / p_unsteered
            card.kl = float((p * lp).sum() / len(lp))
            # ranked by probability moved, so a rare token whose log-probability rises from
            # -30 to -20 does not outrank what the model now says
            up, down = torch.topk(dp, k).indices, torch.topk(-dp, k).indices
            dec = model.tokenizer.decode
            card.promoted = [(dec([int(i)]), float(dlogp[i]), float(dp[i])) for i in up]
            card.suppressed = [(dec([int(i)]), float(dlogp[i]), float(dp[i])) for i in down]
            if clean_f is not None:
                change = (_encode(sae, captured.pop("x")) - clean_f).mean(0)
                on, off = torch.topk(change, k), torch.topk(-change, k)
                card.sae_hook = sae_hook
                card.latents_on = [
                    (int(i), float(v)) for i, v in zip(on.indices, on.values, strict=True) if v > 0
                ]
                card.latents_off = [
                    (int(i), -float(v))
                    for i, v in zip(off.indices, off.values, strict=True)
                    if v > 0
                ]
                if not card.latents_on and not card.latents_off:
                    card.notes.append(f"no latent at {sae_hook} changes: is it before the site?")


def _encode(sae: Any, x: Tensor) -> Tensor:
    """SAE activations at positions >= 1, flattened: [tokens, d_sae]."""
    return sae.encode(x[:, 1:].reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)).float()


def _behaviours(gens: SteeredGenerations, cards: list[PerturbationCard]) -> None:
    from melbo_lens.analysis.behaviors import classify_completions

    have = [card for card in cards if card.index in gens.indices]
    texts = [t for card in have for t in gens.for_vector(card.index)]
    if not texts:
        return
    report = classify_completions(texts)
    at = 0
    for card in have:
        mine = gens.for_vector(card.index)
        card.completions = list(zip(gens.labels or gens.prompts, mine, strict=True))
        labs = report.labels[at : at + len(mine)]
        at += len(mine)
        card.behavior = max(set(labs), key=labs.count)
