"""Contrast-pair activations: the residual stream of positive and negative prompts at one
site and one position per prompt (last token, mean over tokens, or the answer letter),
as the matrices P and N every supervised estimator reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, as_site, require_hook

__all__ = ["Position", "pair_activations"]


Position = Literal["last", "mean", "answer"] | int


# A PromptSet; plain strings (tokenized as they are: no chat template); chat conversations
# (lists of {"role", "content"} dicts: the chat template is applied); or token-id lists.
PromptsLike = (
    PromptSet | Sequence[str] | Sequence[Sequence[dict[str, str]]] | Sequence[Sequence[int]]
)


DEFAULT_ANSWER_LETTERS = ("A", "B", " A", " B")


# ---------------------------------------------------------------------- activations
def _as_prompt_set(model: Host, prompts: PromptsLike, name: str) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of prompts (one per pair), got a single string")
    items: list[Any] = list(prompts)
    if not items:
        raise ValueError(f"{name} is empty; give at least one contrast pair")
    if all(isinstance(p, str) for p in items):
        return PromptSet.from_texts(model, items)  # plain text: no chat template
    if isinstance(items[0], dict):
        raise TypeError(
            f"{name} looks like one conversation; give a list of them (one per contrast pair)"
        )
    if all(isinstance(p, list | tuple) and p and isinstance(p[0], dict) for p in items):
        return PromptSet.from_chat(model, items)  # conversations: the chat template
    if all(isinstance(p, list | tuple) and all(isinstance(t, int) for t in p) for p in items):
        return PromptSet.from_tokens(model, items)
    raise TypeError(
        f"{name} must be a PromptSet or a list of strings, chat conversations (lists of "
        "{'role', 'content'} dicts) or token-id lists, one kind throughout; got "
        f"{sorted({type(p).__name__ for p in items})}"
    )


def _answer_ids(model: Host, answer_tokens: Any) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if answer_tokens is None:
        if tokenizer is None:
            raise ValueError(
                'position="answer" needs answer_tokens (token ids) on a model without a tokenizer'
            )
        ids = []
        for letter in DEFAULT_ANSWER_LETTERS:
            enc = tokenizer(letter, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(int(enc[0]))
        if not ids:
            raise ValueError(
                f"none of {DEFAULT_ANSWER_LETTERS} is a single token for this tokenizer; "
                "pass answer_tokens explicitly"
            )
        return sorted(set(ids))
    if isinstance(answer_tokens, int | str):
        answer_tokens = [answer_tokens]
    ids = []
    for tok in answer_tokens:
        if isinstance(tok, str):
            if tokenizer is None:
                raise ValueError(f"answer token {tok!r} is a string but the model has no tokenizer")
            enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(
                    f"answer token {tok!r} encodes to {len(enc)} tokens {enc}; give strings "
                    "that are one token each, or token ids"
                )
            ids.append(int(enc[0]))
        elif isinstance(tok, int) and not isinstance(tok, bool):
            ids.append(tok)
        else:
            raise TypeError(f"answer tokens must be ints or strings, got {tok!r}")
    if not ids:
        raise ValueError("answer_tokens is empty; give at least one token id or string")
    return sorted(set(ids))


def _positions(
    prompts: PromptSet, position: Position, answer_ids: list[int] | None, name: str
) -> list[int] | None:
    """Per-prompt position index for single-token modes (None for "mean")."""
    lengths = prompts.lengths.tolist()
    if position == "mean":
        return None
    if position == "last":
        return [length - 1 for length in lengths]
    if position == "answer":
        assert answer_ids is not None
        ids = torch.tensor(answer_ids, device=prompts.tokens.device)
        hit = torch.isin(prompts.tokens, ids) & prompts.attention_mask
        out = []
        for i, row in enumerate(hit):
            where = torch.nonzero(row).flatten()
            if where.numel() == 0:
                raise ValueError(
                    f"{name} prompt {i} contains none of the answer tokens {answer_ids}; "
                    'position="answer" reads the last of them, so every prompt needs one '
                    "(or pass answer_tokens=...)"
                )
            out.append(int(where[-1]))
        return out
    if isinstance(position, int) and not isinstance(position, bool):
        out = []
        for i, length in enumerate(lengths):
            if not -length <= position < length:
                raise ValueError(
                    f"position {position} is outside {name} prompt {i}, which has {length} "
                    f"tokens; use an index in [-{length}, {length - 1}] or 'last'"
                )
            out.append(position % length)
        return out
    raise ValueError(f"position must be 'last', 'mean', 'answer' or an int, got {position!r}")


def _capture(model: Host, prompts: PromptSet, site: HookSite) -> Float[Tensor, "n pos d_model"]:
    """One forward pass, stopped once `site` is read."""
    with torch.no_grad():
        return run_to_site(model, prompts.tokens, prompts.attention_mask, site.name).detach()


def _site_activations(
    model: Host, prompts: PromptSet, site: HookSite, batch_size: int
) -> Float[Tensor, "n pos d_model"]:
    """Activation at `site` for every prompt (right-padded like the PromptSet)."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        z = _capture(model, prompts[start : start + batch_size], site)
        pad = prompts.tokens.shape[1] - z.shape[1]
        chunks.append(torch.nn.functional.pad(z, (0, 0, 0, pad)))
    return torch.cat(chunks)


def _read(
    model: Host,
    prompts: PromptSet,
    site: HookSite,
    position: Position,
    answer_ids: list[int] | None,
    batch_size: int,
    name: str,
) -> tuple[Float[Tensor, "n d_model"], list[int] | None]:
    index = _positions(prompts, position, answer_ids, name)
    acts = _site_activations(model, prompts, site, batch_size)
    if index is None:
        w = prompts.target_mask.to(acts.dtype)
        reduced = (acts * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    else:
        rows = torch.arange(len(prompts), device=acts.device)
        reduced = acts[rows, torch.tensor(index, device=acts.device)]
    return reduced, index


def pair_activations(
    model: Host,
    positive: PromptsLike,
    negative: PromptsLike,
    site: HookSite | str | int,
    *,
    position: Position = "last",
    answer_tokens: int | str | Sequence[int | str] | None = None,
    batch_size: int = 32,
) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"], dict[str, Any]]:
    """Activations (P, N) of each contrast pair at `site` and `position`, plus how read.

    Examples:
        >>> P, N, info = pair_activations(model, ["I love it"], ["I hate it"], 3)  # doctest: +SKIP
        >>> (P - N).mean(0)            # the mean-difference vector  # doctest: +SKIP
    """
    site = require_hook(model, as_site(site))
    pos = _as_prompt_set(model, positive, "positive")
    neg = _as_prompt_set(model, negative, "negative")
    if len(pos) != len(neg):
        raise ValueError(
            f"positive and negative must pair up one to one, got {len(pos)} positive and "
            f"{len(neg)} negative prompts"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answer_ids = _answer_ids(model, answer_tokens) if position == "answer" else None
    P, p_index = _read(model, pos, site, position, answer_ids, batch_size, "positive")
    N, n_index = _read(model, neg, site, position, answer_ids, batch_size, "negative")
    info: dict[str, Any] = {
        "site": site,
        "position": position,
        "n_pairs": len(pos),
        "positive": pos,
        "negative": neg,
        "positive_positions": p_index,
        "negative_positions": n_index,
        "answer_tokens": answer_ids,
    }
    return P, N, info
