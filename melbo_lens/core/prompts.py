# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""A prompt set is a padded batch of prompts together with the positions that count.

MELBO's objective sums, for each prompt i, over a set of target positions I_i. A
`PromptSet` holds the tokens of n prompts right-padded to a common length, the attention
mask (True on real tokens), and the target mask (True on the positions in I_i, always a
subset of the real tokens). Right padding keeps every real token at the position it has
when its prompt runs alone, so a batch gives the same activations as one-by-one runs.

Target positions are given per prompt relative to the prompt's own real tokens:
`None` (all of them), a `slice` (`slice(-3, None)` = the last three), a list of ints
(negative ints count from the end), or a list with one such entry per prompt.

Why one module over ~400 lines: `PromptSet` is one class; its coercion from texts or
chats, padding and target-position rules all maintain its invariants.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from melbo_lens.core.host import Host

__all__ = ["PromptSet", "TargetPositions", "parse_positions"]

PositionSpec = slice | Sequence[int] | None
TargetPositions = PositionSpec | Sequence[PositionSpec]


def _positions_for(spec: PositionSpec, length: int, prompt_index: int) -> list[int]:
    if spec is None:
        return list(range(length))
    if isinstance(spec, slice):
        chosen = list(range(length))[spec]
    else:
        chosen = []
        for p in spec:
            if isinstance(p, bool) or not isinstance(p, int):
                raise TypeError(f"target position {p!r} of prompt {prompt_index} is not an int")
            if not -length <= p < length:
                raise ValueError(
                    f"target position {p} is outside prompt {prompt_index}, which has "
                    f"{length} tokens; use positions in [-{length}, {length - 1}]"
                )
            chosen.append(p % length)
    if not chosen:
        raise ValueError(
            f"prompt {prompt_index} ({length} tokens) has no target positions under {spec!r}; "
            "every prompt needs at least one position where the change is measured"
        )
    return sorted(set(chosen))


def _is_per_prompt(spec: Any, n: int) -> bool:
    """A per-prompt list has one slice / None / list entry per prompt; a list that has
    such entries but not one per prompt is an error, not a spec for every prompt."""
    if spec is None or isinstance(spec, slice | str):
        return False
    entries = list(spec)
    if not any(s is None or isinstance(s, slice | list | tuple) for s in entries):
        return False  # a plain list of ints: the same positions in every prompt
    if len(entries) != n:
        raise ValueError(
            f"target_positions has {len(entries)} per-prompt entries for {n} prompts; give "
            "one entry per prompt, or a single slice / list of ints for all of them"
        )
    return True


def _check_rows(model: Host | None, rows: list[list[int]]) -> None:
    """Token ids within the model's vocabulary and prompts within its context."""
    cfg = getattr(model, "cfg", None)
    d_vocab = getattr(cfg, "d_vocab", None)
    n_ctx = getattr(cfg, "n_ctx", None)
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty (0 tokens); remove it or give it text")
        low, high = min(row), max(row)
        if low < 0:
            raise ValueError(f"prompt {i} has a negative token id {low}; token ids are >= 0")
        if isinstance(d_vocab, int) and high >= d_vocab:
            raise ValueError(
                f"prompt {i} has token id {high}, outside the model's vocabulary "
                f"(d_vocab={d_vocab}, ids 0..{d_vocab - 1}); was it tokenized for another model?"
            )
        if isinstance(n_ctx, int) and len(row) > n_ctx:
            raise ValueError(
                f"prompt {i} has {len(row)} tokens but the model's context is n_ctx={n_ctx}; "
                "shorten the prompt (or split it into several) to at most "
                f"{n_ctx} tokens"
            )


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Right-padded prompts with attention and target masks.

    Args:
        tokens: [n, pos] right-padded token ids.
        attention_mask: [n, pos] the real tokens.
        target_mask: [n, pos] the positions the objective reads.
        texts: The prompts' texts, when known.
        target_spec: How `target_mask` was made (saved with artifacts).
        labels: A name per prompt.

    Examples:
        >>> import torch
        >>> ps = PromptSet.from_tokens(None, [[5, 6, 7], [8, 9]], target_positions=slice(-1, None))
        >>> ps.tokens.tolist(), ps.target_mask.tolist()
        ([[5, 6, 7], [8, 9, 0]], [[False, False, True], [False, True, False]])
    """

    tokens: Int[Tensor, "n pos"]
    attention_mask: Bool[Tensor, "n pos"]
    target_mask: Bool[Tensor, "n pos"]
    texts: tuple[str, ...] | None = None
    target_spec: Any = field(default=None, compare=False)
    # what to show a reader for each prompt: the last user message of a conversation,
    # the text itself otherwise (None: show `texts`)
    labels: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [n, pos], got shape {tuple(self.tokens.shape)}")
        shape = self.tokens.shape
        for name in ("attention_mask", "target_mask"):
            mask = getattr(self, name)
            if mask.shape != shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"{name} must be a bool tensor of shape {tuple(shape)} like tokens, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
        if shape[0] == 0:
            raise ValueError("a PromptSet needs at least one prompt; got none")
        if (self.target_mask & ~self.attention_mask).any():
            raise ValueError("target positions must be real tokens, not padding")
        if not self.attention_mask[:, 0].all():
            raise ValueError("prompts must be right-padded: position 0 of every row is real")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        model: Host | None,
        tokens: Sequence[Sequence[int]] | Int[Tensor, "n pos"],
        *,
        target_positions: TargetPositions = None,
        attention_mask: Bool[Tensor, "n pos"] | None = None,
        texts: Sequence[str] | None = None,
        pad_token_id: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> PromptSet:
        """Build from token ids (no tokenizer needed); `model` may be None.

        A tensor with an `attention_mask` may be left- or right-padded; it is re-padded on
        the right. Lists of different lengths are padded for you.
        """
        if isinstance(tokens, Tensor):
            if tokens.ndim == 1:
                tokens = tokens[None]
            mask = (
                torch.ones_like(tokens, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.to(torch.bool)
            )
            rows = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with a token tensor")
            rows = [list(map(int, r)) for r in tokens]
        if not rows:
            raise ValueError("no prompts given; pass at least one prompt")
        _check_rows(model, rows)
        if pad_token_id is None:
            pad_token_id = _pad_id(model)
        n, length = len(rows), max(len(r) for r in rows)
        out = torch.full((n, length), pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, length), dtype=torch.bool)
        target = torch.zeros((n, length), dtype=torch.bool)
        specs: Sequence[Any] = (
            target_positions  # type: ignore[assignment]
            if _is_per_prompt(target_positions, n)
            else [target_positions] * n
        )
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
            attn[i, : len(row)] = True
            target[i, _positions_for(specs[i], len(row), i)] = True
        device = _model_device(model)
        return cls(
            out.to(device),
            attn.to(device),
            target.to(device),
            tuple(texts) if texts is not None else None,
            target_positions,
            tuple(labels) if labels is not None else None,
        )

    @classmethod
    def coerce(
        cls,
        model: Host,
        prompts: PromptSet | str | Sequence[Any],
        *,
        chat: bool = False,
        target_positions: TargetPositions = None,
    ) -> PromptSet:
        """The one way every public function turns user prompts into a `PromptSet`.

        A `PromptSet` is returned as it is; a string is one prompt; a list of strings is
        several (formatted with the chat template as user turns when `chat=True`, else
        tokenized as plain text); a conversation (list of `{"role", "content"}` dicts) or
        a list of conversations always goes through the chat template.

        Examples:
            >>> ps = PromptSet.from_tokens(model, [[1, 2]])
            >>> PromptSet.coerce(model, ps) is ps
            True
        """
        if isinstance(prompts, PromptSet):
            return prompts
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None or len(prompts) == 0:
            raise ValueError("no prompts given; pass a PromptSet or at least one text")
        items = list(prompts)
        if isinstance(items[0], dict) or any(not isinstance(p, str) for p in items):
            return cls.from_chat(model, items, target_positions=target_positions)
        if chat:
            return cls.from_chat(model, items, target_positions=target_positions)
        return cls.from_texts(model, items, target_positions=target_positions)

    @classmethod
    def from_texts(
        cls,
        model: Host,
        texts: str | Sequence[str],
        *,
        target_positions: TargetPositions = None,
        prepend_bos: bool | None = None,
    ) -> PromptSet:
        """Tokenize plain texts with the model's tokenizer (TransformerLens BOS rules).

        Examples:
            >>> ps = PromptSet.from_texts(model, ["Hello there", "Hi"])
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no prompts given; pass at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise ValueError(f"prompt {i} is empty or not a string: {t!r}")
        tokenizer = _tokenizer(model)
        if prepend_bos is None:
            prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
        rows = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            if prepend_bos and tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id, *ids]
            rows.append(ids)
        return cls.from_tokens(model, rows, target_positions=target_positions, texts=texts)

    @classmethod
    def from_chat(
        cls,
        model: Host,
        conversations: Sequence[Sequence[dict[str, str]]]
        | Sequence[dict[str, str]]
        | Sequence[str]
        | str,
        *,
        target_positions: TargetPositions = None,
        add_generation_prompt: bool = True,
    ) -> PromptSet:
        """Format conversations with the tokenizer's chat template.

        A bare string is one user turn; a list of `{"role", "content"}` dicts is one
        conversation; a list of strings or of conversations is several.

        Examples:
            >>> ps = PromptSet.from_chat(model, "Tell me a story")
        """
        tokenizer = _tokenizer(model)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the model's tokenizer has no chat template; use PromptSet.from_texts instead"
            )
        items: list[Any]
        if isinstance(conversations, str):
            items = [conversations]
        elif conversations and isinstance(conversations[0], dict):
            items = [conversations]
        else:
            items = list(conversations)
        # a plain string in the list is one user turn
        convs: list[Any] = [
            [{"role": "user", "content": c}] if isinstance(c, str) else c for c in items
        ]
        conversations = convs
        if not conversations:
            raise ValueError("no conversations given; pass at least one")
        for i, conv in enumerate(conversations):
            _check_conversation(i, conv)
        texts = [
            tokenizer.apply_chat_template(
                list(conv), tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for conv in conversations
        ]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        labels = [_last_user_message(conv) for conv in conversations]
        return cls.from_tokens(
            model, rows, target_positions=target_positions, texts=texts, labels=labels
        )

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> Int[Tensor, " n"]:
        return self.attention_mask.sum(-1)

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> PromptSet:
        if isinstance(index, int):
            index = [index]
        idx = torch.arange(len(self))[index]
        length = int(self.attention_mask[idx].sum(-1).max())
        texts = None if self.texts is None else tuple(self.texts[int(i)] for i in idx)
        labels = None if self.labels is None else tuple(self.labels[int(i)] for i in idx)
        return PromptSet(
            self.tokens[idx, :length],
            self.attention_mask[idx, :length],
            self.target_mask[idx, :length],
            texts,
            self.target_spec,
            labels,
        )

    def to(self, device: torch.device | str) -> PromptSet:
        return PromptSet(
            self.tokens.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.texts,
            self.target_spec,
            self.labels,
        )

    def left_padded(self, pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
        """Tokens and attention mask re-padded on the left (for batched generation)."""
        length = self.tokens.shape[1]
        lengths = self.lengths
        shift = (length - lengths)[:, None]
        src = (torch.arange(length, device=self.tokens.device)[None] - shift) % length
        tokens = torch.gather(self.tokens, 1, src)
        mask = torch.arange(length, device=self.tokens.device)[None] >= shift
        return torch.where(mask, tokens, torch.full_like(tokens, pad_token_id)), mask

    def display(self, tokenizer: Any = None) -> list[str]:
        """One readable line per prompt: its label (last user message), else its text,
        else its decoded tokens."""
        if self.labels is not None:
            return list(self.labels)
        if self.texts is not None:
            return list(self.texts)
        if tokenizer is None:
            return [str(t) for t in self.token_lists()]
        return [tokenizer.decode(t) for t in self.token_lists()]

    @classmethod
    def with_continuations(
        cls,
        model: Host,
        prompts: PromptSet | str | Sequence[Any],
        continuations: str | Sequence[str],
        *,
        chat: bool = True,
    ) -> PromptSet:
        """Prompts followed by given continuations (teacher forcing), the target positions
        being those that predict a continuation token: what a log-probability objective
        scores. One continuation for all prompts, or one per prompt.

        Examples:
            >>> ps = PromptSet.with_continuations(model, "hi", "ok", chat=False)
            >>> len(ps.token_lists()[0]) == len(ps.target_lists()[0]) + 1 + 1
            True
        """
        base = cls.coerce(model, prompts, chat=chat)
        texts = (
            [continuations] * len(base) if isinstance(continuations, str) else list(continuations)
        )
        if len(texts) != len(base):
            raise ValueError(
                f"continuations: got {len(texts)} for {len(base)} prompts; give one for all "
                "or one per prompt"
            )
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("continuations are text: the model needs a tokenizer")
        rows, positions = [], []
        for row, text in zip(base.token_lists(), texts, strict=True):
            cont = list(tokenizer.encode(text, add_special_tokens=False))
            if not cont:
                raise ValueError(f"continuation {text!r} has no tokens")
            rows.append(row + cont)
            positions.append(list(range(len(row) - 1, len(row) + len(cont) - 1)))
        shown = [f"{p} -> {t}" for p, t in zip(base.display(tokenizer), texts, strict=True)]
        return cls.from_tokens(model, rows, target_positions=positions, labels=shown)

    def token_lists(self) -> list[list[int]]:
        return [t[m].tolist() for t, m in zip(self.tokens, self.attention_mask, strict=True)]

    def target_lists(self) -> list[list[int]]:
        """Target positions of each prompt, relative to its own tokens."""
        return [torch.nonzero(m).flatten().tolist() for m in self.target_mask]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the tokens, the target positions as resolved, the texts, the labels
        shown to a reader, and the target-position spec as given (its repr when it is not
        plain JSON, such as a slice; the resolved positions are what round-trips).

        Examples:
            >>> ps = PromptSet.from_tokens(None, [[5, 6]], target_positions=slice(-1, None),
            ...                            labels=["hi"])
            >>> d = ps.to_dict(); d["targets"], d["labels"], d["target_spec"]
            ([[1]], ['hi'], 'slice(-1, None, None)')
            >>> PromptSet.from_dict(d).labels
            ('hi',)
        """
        try:
            spec = json.loads(json.dumps(self.target_spec))
        except TypeError:  # a slice, or a list holding one
            spec = repr(self.target_spec)
        return {
            "tokens": self.token_lists(),
            "targets": self.target_lists(),
            "texts": list(self.texts) if self.texts is not None else None,
            "labels": list(self.labels) if self.labels is not None else None,
            "target_spec": spec,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], model: Host | None = None) -> PromptSet:
        return cls.from_tokens(
            model,
            data["tokens"],
            target_positions=data["targets"],
            texts=data.get("texts"),
            labels=data.get("labels"),
        )


def _last_user_message(conv: Sequence[dict[str, str]]) -> str:
    """What a reader recognises a conversation by: its last user message."""
    users = [m["content"] for m in conv if m.get("role") == "user"]
    return users[-1] if users else conv[-1]["content"]


def _check_conversation(i: int, conv: Any) -> None:
    ok = (
        isinstance(conv, list | tuple)
        and len(conv) > 0
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in conv
        )
    )
    if not ok:
        raise ValueError(
            f"conversation {i} is {conv!r}; each prompt must be a string (one user turn) or a "
            "non-empty list of {'role': str, 'content': str} messages"
        )


POSITION_SPECS = (
    "'auto' (all but outlier-norm positions, for MELBO training), 'all', 'N:' (positions N "
    "on), 'last:N' (the last N) or '0,3,-1'"
)


def parse_positions(spec: str) -> TargetPositions:
    """A target-position spec written as text (as on the command line or in a sweep
    grid) -> the form `PromptSet` takes.

    "auto" is None (no positions given: MELBO training leaves out the outlier-norm
    positions, `methods.defaults`); "all" is every real token, explicitly.

    Examples:
        >>> parse_positions("last:3"), parse_positions("1:"), parse_positions("0,-1")
        (slice(-3, None, None), slice(1, None, None), [0, -1])
        >>> parse_positions("auto"), parse_positions("all")
        (None, slice(None, None, None))
    """
    try:
        if spec == "auto":
            return None
        if spec == "all":
            return slice(None)
        if spec.startswith("last:"):
            n = int(spec.split(":", 1)[1])
            if n < 1:
                raise ValueError
            return slice(-n, None)
        if spec.endswith(":"):  # "1:" = every position from 1 on (skips the first token)
            return slice(int(spec[:-1]), None)
        return [int(p) for p in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"{spec!r} is not a position spec; use {POSITION_SPECS} (last:N needs N >= 1)"
        ) from None


def _tokenizer(model: Host) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "the model has no tokenizer; build prompts with PromptSet.from_tokens instead"
        )
    return tokenizer


def _pad_id(model: Host | None) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return 0


def _model_device(model: Host | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    cfg = getattr(model, "cfg", None)
    device = getattr(cfg, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def bundled_prompts(key: str = "demo") -> list[str]:
    """Prompts shipped with the package (`demo` or `varied`).

    Examples:
        >>> len(bundled_prompts("demo")) >= 1
        True
    """
    import json
    from importlib import resources

    text = resources.files("melbo_lens").joinpath("data/prompts.json").read_text()
    return list(json.loads(text)[key])
