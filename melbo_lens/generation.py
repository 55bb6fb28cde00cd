"""Steered generation: completions under many members of a perturbation in one batch.

`generate` lays out one batch row per (member, prompt) pair, plus one unsteered row per
prompt for reference, left-pads the prompts and decodes all rows together with the
key-value cache. Each row gets its own member through the perturbation's per-row hooks
(any `Perturbation`: vectors, adapters, directional edits, SAE-feature clamps), so V members
cost one batched decode rather than V separate ones. Greedy by default; sampling is
seeded and reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.checks import is_int, is_positive
from melbo_lens.core.host import Host, supports_kv_cache
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, as_site
from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.base import Perturbation, prompts_for, row_members
from melbo_lens.perturbations.vectors import SteeringVectors, steering_hook

__all__ = ["generate", "generate_steered", "generate_with_adapters", "SteeredGenerations"]


@dataclass
class SteeredGenerations:
    """Completions: `steered[v][i]` for vector `indices[v]` on prompt i.

    Attributes:
        prompts: The prompts.
        indices: The members used.
        steered: `steered[v][i]`, member `indices[v]` on prompt i.
        unsteered: The unsteered completions (None when not asked).
        scale: The multiplier used.
        settings: Sampling settings.
        labels: Names of the members.
    """

    prompts: list[str]
    indices: list[int]
    steered: list[list[str]]
    unsteered: list[str] | None
    scale: float
    settings: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None  # per prompt, what the table shows (last user message)

    def for_vector(self, index: int) -> list[str]:
        return self.steered[self.indices.index(index)]

    def table(self, width: int = 60) -> str:
        """Side-by-side text table: unsteered first, then each vector."""
        lines = []
        for i, prompt in enumerate(self.labels or self.prompts):
            lines.append(f"=== prompt {i}: {_short(prompt, width)}")
            if self.unsteered is not None:
                lines.append(f"  unsteered | {_short(self.unsteered[i], width)}")
            for v, k in enumerate(self.indices):
                lines.append(f"  vector {k:>3} | {_short(self.steered[v][i], width)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "indices": self.indices,
            "steered": self.steered,
            "unsteered": self.unsteered,
            "scale": self.scale,
            "settings": self.settings,
            "labels": self.labels,
        }


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


@torch.no_grad()
def generate_tokens(
    model: Host,
    site: HookSite | None,
    row_vectors: Float[Tensor, "rows d_model"] | None,
    tokens: Int[Tensor, "rows pos"],
    mask: Int[Tensor, "rows pos"],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float | None,
    seed: int,
    eos_token_id: int | None,
    use_kv_cache: bool | None = None,
    hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> Tensor:
    """Decode `max_new_tokens` for left-padded rows, adding one vector per row at `site`.

    `hooks` (TransformerLens `(name, fn)` pairs, e.g. per-row steering adapters) run in
    every forward pass as well; with `row_vectors=None` no vector is added.
    """
    rows = tokens.shape[0]
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    use_cache = supports_kv_cache(model) if use_kv_cache is None else use_kv_cache
    hooks = list(hooks)
    if row_vectors is not None:
        if site is None:
            raise ValueError("row_vectors need a site to be added at")
        hooks.insert(0, (site.name, steering_hook(row_vectors)))
    out = torch.zeros((rows, 0), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    with model.hooks(fwd_hooks=hooks):
        cache = None
        if use_cache:
            from transformer_lens import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, tokens.device, rows)
            logits = model(tokens, attention_mask=mask.long(), past_kv_cache=cache)
        else:
            logits = model(tokens, attention_mask=mask.long())
        for step in range(max_new_tokens):
            nxt = _pick(logits[:, -1, :].float(), do_sample, temperature, top_p, gen)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if step + 1 == max_new_tokens or (eos_token_id is not None and finished.all()):
                break
            if use_cache:
                ones = torch.ones((rows, 1), dtype=torch.long, device=tokens.device)
                logits = model(nxt[:, None], attention_mask=ones, past_kv_cache=cache)
            else:
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
                logits = model(tokens, attention_mask=mask.long())
    return out


def _pick(
    logits: Tensor, do_sample: bool, temperature: float, top_p: float | None, gen: torch.Generator
) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    if top_p is not None:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _generate_grid(
    model: Host,
    ps: PromptSet,
    n_groups: int,
    hooks_for: Callable[[Tensor], list[tuple[str, Any]]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float | None,
    seed: int,
    max_rows: int,
) -> list[list[str]]:
    """Decode n_groups × n rows (row = group r // n, prompt r % n); texts per group.

    `hooks_for(groups)` returns the hooks for a chunk of rows given each row's group.
    """
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens, mask = ps.left_padded(pad)
    n = len(ps)
    row_group = torch.arange(n_groups, device=tokens.device).repeat_interleave(n)
    row_prompt = torch.arange(n, device=tokens.device).repeat(n_groups)
    pieces = []
    for start in range(0, n_groups * n, max_rows):
        sl = slice(start, start + max_rows)
        pieces.append(
            generate_tokens(
                model,
                None,
                None,
                tokens[row_prompt[sl]],
                mask[row_prompt[sl]],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                seed=seed + start,
                eos_token_id=tok.eos_token_id,
                hooks=hooks_for(row_group[sl]),
            )
        )
    width = max(p.shape[1] for p in pieces)
    eos = tok.eos_token_id if tok.eos_token_id is not None else pad
    new = torch.cat(
        [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=eos) for p in pieces]
    )
    texts = [_decode(tok, row, tok.eos_token_id) for row in new]
    return [texts[g * n : (g + 1) * n] for g in range(n_groups)]


def generate(
    model: Host,
    perturbation: Perturbation | None,
    prompts: PromptSet | str | Sequence[Any],
    *,
    indices: Sequence[int] | None = None,
    scale: float = 1.0,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
    include_unsteered: bool = True,
    max_rows: int = 64,
) -> SteeredGenerations:
    """Complete each prompt under each chosen member of any perturbation (one batch, KV
    cache): steering vectors, adapters, directional edits, feature clamps: any `Perturbation`.

    Row layout: one unsteered reference row per prompt (unless `include_unsteered=False`),
    then one row per (member, prompt); each row gets its member through the
    perturbation's per-row hooks, and the reference rows get none. `perturbation=None`
    gives plain unsteered completions with the same batching and decoding. `chat=True`
    formats plain-string prompts with the tokenizer's chat template. Rows are decoded
    `max_rows` at a time to bound memory. `indices` choose members; negative ones count
    from the end as in Python, out-of-range ones are an error.

    Args:
        model: the model to complete with (it needs a tokenizer to decode).
        perturbation: any `Perturbation` (vectors, adapters, soft prompts, clamps), or
            None for unsteered completions only.
        prompts: a `PromptSet`, a string or a list of strings / chat conversations.
        indices: the members to use (default: all).
        scale: multiplies each member's edit (1.0: as trained).
        max_new_tokens: tokens generated per row.
        do_sample: sample instead of greedy decoding.
        temperature: the sampling temperature (with `do_sample`).
        top_p: nucleus sampling's mass (with `do_sample`; None: off).
        seed: the sampling generator's seed (sampled runs are reproducible).
        chat: format plain-string prompts with the chat template.
        include_unsteered: add one unsteered reference row per prompt.
        max_rows: rows decoded at a time.

    Returns:
        `SteeredGenerations`: `unsteered[p]` and `steered[k][p]` texts, with `table()`.

    Raises:
        ValueError: a prompt plus `max_new_tokens` longer than the context, an
            out-of-range index, or bad decoding settings, each named.

    Examples:
        >>> sv = SteeringVectors(torch.eye(50)[:2, :32] * 8.0, HookSite(1))
        >>> gens = generate(model, sv, "hello", max_new_tokens=4)
        >>> len(gens.steered), len(gens.unsteered)
        (2, 1)
    """
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("steered generation needs a model with a tokenizer to decode text")
    _check_decoding(scale, max_new_tokens, temperature, top_p, seed, max_rows)
    ps = prompts_for(perturbation, model, prompts, chat=chat)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    longest = int(ps.lengths.max())
    if isinstance(n_ctx, int) and longest + max_new_tokens > n_ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's context n_ctx={n_ctx}; lower max_new_tokens to at most "
            f"{max(n_ctx - longest, 0)} or shorten the prompt"
        )
    n_members = 0 if perturbation is None else len(perturbation)
    if indices is None:
        indices = list(range(n_members))
    # negative indices count from the end, as in Python (-1: the last member); anything
    # outside -n..n-1 is an error naming the valid range, never wrapped
    wanted = [int(k) + n_members if -n_members <= int(k) < 0 else int(k) for k in indices]
    members = [int(k) for k in row_members(wanted, n_members)] if wanted else []
    groups: list[int | None] = ([None] if include_unsteered else []) + members

    def hooks_for(row_group: Tensor) -> list[tuple[str, Any]]:
        rows = [groups[int(g)] for g in row_group]
        if perturbation is None or all(r is None for r in rows):
            return []
        return perturbation.hooks(model, rows, scale)

    decode = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    settings: dict[str, Any] = dict(decode)
    if perturbation is not None:
        settings["site"] = perturbation.site.name
    grid = (
        _generate_grid(
            model,
            ps,
            len(groups),
            hooks_for,
            max_rows=max_rows,
            **decode,  # type: ignore[arg-type]
        )
        if groups
        else []
    )
    unsteered = grid.pop(0) if include_unsteered else None
    tok = model.tokenizer
    texts = list(ps.texts) if ps.texts is not None else [tok.decode(t) for t in ps.token_lists()]
    labels = ps.display(tok)
    return SteeredGenerations(texts, members, grid, unsteered, scale, settings, labels)


def _check_decoding(
    scale: float,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    max_rows: int,
) -> None:
    """Each decoding setting in its range, or a ValueError naming it."""
    problems = []
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        problems.append(f"scale must be a finite number, got {scale!r}")
    if not is_int(max_new_tokens, 0):
        problems.append(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not is_positive(temperature):
        problems.append(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_p is not None and not (is_positive(top_p) and top_p <= 1):
        problems.append(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not (is_int(seed, 0) and seed < 2**63):
        problems.append(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not is_int(max_rows, 1):
        problems.append(f"max_rows must be an int >= 1, got {max_rows!r}")
    if problems:
        raise ValueError("; ".join(problems))


def generate_steered(
    model: Host,
    vectors: SteeringVectors,
    prompts: PromptSet | str | Sequence[Any],
    *,
    site: HookSite | str | None = None,
    **kwargs: Any,
) -> SteeredGenerations:
    """`generate` for steering vectors; `site` moves them to another hook site.

    Args:
        model: The model.
        vectors: The steering vectors.
        prompts: A `PromptSet`, a string, or a list of prompts.
        site: Another site to add them at (default: their own).
        **kwargs: Everything `generate` takes.

    Returns:
        The steered (and unsteered) completions.

    Examples:
        >>> gens = generate_steered(model, vectors, "Tell me a story", chat=True,
        ...                         max_new_tokens=8)
        >>> gens.table().splitlines()[1].split("|")[0].strip()
        'unsteered'
    """
    if site is not None:
        vectors = replace(vectors, site=as_site(site))
    return generate(model, vectors, prompts, **kwargs)


def generate_with_adapters(
    model: Host,
    adapters: SteeringAdapters,
    prompts: PromptSet | str | Sequence[Any],
    **kwargs: Any,
) -> SteeredGenerations:
    """`generate` for steering adapters (kept as a name for existing code).

    Args:
        model: The model.
        adapters: The steering adapters.
        prompts: A `PromptSet`, a string, or a list of prompts.
        **kwargs: Everything `generate` takes.

    Returns:
        The steered (and unsteered) completions.
    """
    return generate(model, adapters, prompts, **kwargs)


def _decode(tokenizer: Any, row: Tensor, eos: int | None) -> str:
    ids = row.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
