"""Steered generation: completions under many steering vectors in one batch.

`generate_steered` lays out one batch row per (vector, prompt) pair, plus one unsteered
row per prompt for reference, left-pads the prompts and decodes all rows together with
the key-value cache. Each row gets its own vector through a per-row steering hook, so
V vectors cost one batched decode rather than V separate ones. Greedy by default;
sampling is seeded and reproducible.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapting import adapter_hooks, check_adapter_host
from .artifacts import SteeringAdapters, SteeringVectors
from .prompts import PromptSet
from .sites import HookSite, as_site, require_hook
from .steering import steering_hook

__all__ = ["generate_steered", "generate_with_adapters", "SteeredGenerations"]


@dataclass
class SteeredGenerations:
    """Completions: `steered[v][i]` for vector `indices[v]` on prompt i."""

    prompts: list[str]
    indices: list[int]
    steered: list[list[str]]
    unsteered: list[str] | None
    scale: float
    settings: dict[str, Any] = field(default_factory=dict)

    def for_vector(self, index: int) -> list[str]:
        return self.steered[self.indices.index(index)]

    def table(self, width: int = 60) -> str:
        """Side-by-side text table: unsteered first, then each vector."""
        lines = []
        for i, prompt in enumerate(self.prompts):
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
        }


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _as_prompts(model: Any, prompts: PromptSet | str | Sequence[Any], chat: bool) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        prompts = [prompts]
    if chat:
        convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        return PromptSet.from_chat(model, convs)
    return PromptSet.from_texts(model, list(prompts))


def _supports_kv_cache(model: Any) -> bool:
    try:
        return "past_kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def generate_tokens(
    model: Any,
    site: HookSite | None,
    row_vectors: Float[Tensor, "rows d_model"] | None,
    tokens: Tensor,
    mask: Tensor,
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
    use_cache = _supports_kv_cache(model) if use_kv_cache is None else use_kv_cache
    hooks = list(hooks)
    if row_vectors is not None:
        if site is None:
            raise ValueError("row_vectors need a site to be added at")
        hooks.insert(0, (site.name, steering_hook(row_vectors)))
    out = torch.zeros((rows, 0), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    with model.hooks(fwd_hooks=hooks):
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
    model: Any,
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


def _generations(
    model: Any,
    artifact: Any,
    prompts: PromptSet | str | Sequence[Any],
    indices: Sequence[int] | None,
    chat: bool,
    include_unsteered: bool,
    make_hooks: Callable[[list[int | None], Tensor], list[tuple[str, Any]]],
    settings: dict[str, Any],
    scale: float,
    max_rows: int,
) -> SteeredGenerations:
    """Shared by vectors and adapters: group 0 is the unsteered reference (if asked)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("steered generation needs a model with a tokenizer to decode text")
    ps = _as_prompts(model, prompts, chat)
    if indices is None:
        indices = list(range(len(artifact)))
    indices = [int(i) % len(artifact) for i in indices]
    groups: list[int | None] = ([None] if include_unsteered else []) + list(indices)
    decode = {
        k: settings[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")
    }
    grid = _generate_grid(
        model, ps, len(groups), lambda g: make_hooks(groups, g), max_rows=max_rows, **decode
    )
    unsteered = grid.pop(0) if include_unsteered else None
    tok = model.tokenizer
    texts = list(ps.texts) if ps.texts is not None else [tok.decode(t) for t in ps.token_lists()]
    return SteeredGenerations(texts, indices, grid, unsteered, scale, settings)


def generate_steered(
    model: Any,
    vectors: SteeringVectors,
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
    site: HookSite | str | None = None,
    max_rows: int = 64,
) -> SteeredGenerations:
    """Complete each prompt under each chosen vector (one batch, KV cache).

    `chat=True` formats plain-string prompts with the tokenizer's chat template.
    Rows are decoded `max_rows` at a time to bound memory; the unsteered reference rows
    carry a zero vector.

    Examples:
        >>> gens = generate_steered(model, vectors, "Tell me a story", chat=True,
        ...                         max_new_tokens=32)                       # doctest: +SKIP
        >>> print(gens.table())  # doctest: +SKIP
    """
    site = require_hook(model, as_site(site) if site is not None else vectors.site)
    vecs = vectors.vectors.float() * scale

    def hooks(groups: list[int | None], row_group: Tensor) -> list[tuple[str, Any]]:
        table = torch.stack([torch.zeros_like(vecs[0]) if g is None else vecs[g] for g in groups])
        return [(site.name, steering_hook(table.to(row_group.device)[row_group]))]

    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        site=site.name,
    )
    return _generations(
        model, vectors, prompts, indices, chat, include_unsteered, hooks, settings, scale, max_rows
    )


def generate_with_adapters(
    model: Any,
    adapters: SteeringAdapters,
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
    """Complete each prompt under each chosen adapter (one batch, KV cache).

    Laid out as in `generate_steered`; each row gets its own adapter through per-row
    hooks, and the reference rows carry an adapter with Ω = 0 (exactly unsteered).

    Examples:
        >>> gens = generate_with_adapters(model, adapters, "Hi", chat=True)  # doctest: +SKIP
        >>> print(gens.table())  # doctest: +SKIP
    """
    check_adapter_host(model, adapters.layer)
    a, b = adapters.omega_a.float(), adapters.omega_b.float()

    def hooks(groups: list[int | None], row_group: Tensor) -> list[tuple[str, Any]]:
        pick = [torch.zeros_like(a[0]) if g is None else a[g] for g in groups]
        pick_b = [torch.zeros_like(b[0]) if g is None else b[g] for g in groups]
        dev = row_group.device
        row_a, row_b = torch.stack(pick).to(dev)[row_group], torch.stack(pick_b).to(dev)[row_group]
        return adapter_hooks(adapters.layer, row_a, row_b, adapters.radius * scale)

    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        site=f"blocks.{adapters.layer}.mlp",
    )
    return _generations(
        model, adapters, prompts, indices, chat, include_unsteered, hooks, settings, scale, max_rows
    )


def _decode(tokenizer: Any, row: Tensor, eos: int | None) -> str:
    ids = row.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
