# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Soft prompts: m learned input embeddings, put where m placeholder tokens stand.

A soft prompt member is m vectors e_1..e_m in the token-embedding space. Prompts carry m
*placeholder* tokens (`SoftPrompts.prepare` prepends them to each prompt's user turn;
the placeholder is a special token that ordinary text does not contain, `<|endoftext|>`
on SmolLM2), and the perturbation replaces the embedding of the j-th placeholder of a
row with e_j at `hook_embed` (before positional embeddings are added, so absolute and
rotary models alike see e_j as that token's embedding). With `scale` s the embedding is
e_pl + s·(e_j − e_pl), e_pl being the placeholder's own embedding: s = 1 replaces it.

The hook finds the placeholders from the activations alone (a row of `hook_embed` equal
to the placeholder's embedding, bit for bit: an embedding lookup copies its row), so it
needs no positions and works for left-padded generation with a KV cache as for
right-padded `PromptSet`s: a row with exactly m placeholders gets the member, a row with
none is left alone (the cached decoding steps), any other count is an error.

`nearest_tokens` reads a learned embedding back as the vocabulary tokens closest to it
in cosine similarity (the usual retrodiction of a soft prompt).
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.io import ArtifactError, read_artifact
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.artifact import ArtifactRows, loaded_fields, register_format
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members

__all__ = ["SOFT_PROMPTS_FORMAT", "SoftPrompts", "default_placeholder", "placeholder_embedding"]

SOFT_PROMPTS_FORMAT = "melbo_lens.soft_prompts/1"


def default_placeholder(model: Host) -> int:
    """The token that marks soft-prompt positions: the tokenizer's unknown token, else a
    special token that is not padding, BOS or EOS (so padding is never taken for it)."""
    tok: Any = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("soft prompts need a model with a tokenizer (to place placeholders)")
    taken = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    candidates = [tok.unk_token_id, *getattr(tok, "all_special_ids", [])]
    for pid in candidates:
        if pid is not None and pid not in taken:
            return int(pid)
    raise ValueError(
        "this tokenizer has no special token free to mark soft-prompt positions (its unknown "
        "token is padding, BOS or EOS); pass placeholder=<token id> explicitly"
    )


@torch.no_grad()
def placeholder_embedding(model: Host, placeholder: int) -> Float[Tensor, " d_model"]:
    """What `hook_embed` outputs for the placeholder token (the model's own embedding)."""
    embed: Any = getattr(model, "embed", None)
    if embed is None:
        raise ValueError(
            "soft prompts replace token embeddings at hook_embed and need a HookedTransformer "
            f"(with .embed); got {type(model).__name__}"
        )
    device = next(iter(embed.parameters())).device
    return embed(torch.tensor([[placeholder]], device=device))[0, 0]


def _replace_hook(embeddings: Tensor, members: Tensor, reference: Tensor, scale: float):
    """hook_embed: row-block g's placeholders get member members[g]'s embeddings."""
    m = embeddings.shape[1]

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        found = (act == reference.to(act.device, act.dtype)).all(-1)  # [rows, pos]
        counts = found.sum(-1)
        groups, rows = members.shape[0], act.shape[0]
        if rows % groups:
            raise ValueError(f"{groups} soft-prompt members for a batch of {rows} rows")
        owner = members.to(act.device).repeat_interleave(rows // groups)
        bad = (counts != 0) & (counts != m) & (owner >= 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"batch row {row} holds {int(counts[row])} soft-prompt placeholders, expected "
                f"{m}; build the prompts with SoftPrompts.prepare(model, prompts)"
            )
        use = (counts == m) & (owner >= 0)
        if not bool(use.any()):
            return act
        table = pick_members(embeddings.to(act.device), owner)  # [rows, m, d]; -1: zeros
        slot = found.cumsum(-1) - 1  # j-th placeholder of its row
        where = found & use[:, None]
        index = slot.clamp(0, m - 1)[..., None].expand(*slot.shape, act.shape[-1])
        new = table.gather(1, index)
        ref = reference.to(act.device, new.dtype)
        value = ref + scale * (new - ref)
        return torch.where(where[..., None], value.to(act.dtype), act)

    return hook


@register_format(SOFT_PROMPTS_FORMAT)
@dataclass
class SoftPrompts(ArtifactRows):
    """n soft prompts of m tokens each, with provenance (see the module docstring).

    Examples:
        >>> sp = SoftPrompts(torch.randn(2, 3, 32), placeholder=0)
        >>> len(sp), sp.n_tokens, sp[1].embeddings.shape
        (2, 3, torch.Size([1, 3, 32]))
    """

    embeddings: Float[Tensor, "n m d_model"]
    placeholder: int
    target: HookSite | None = None
    method: str = "soft_prompt"
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    prompts: dict[str, Any] | None = None
    losses: Float[Tensor, "n steps"] | None = None
    objective: Float[Tensor, " n"] | None = None
    steps_done: Int[Tensor, " n"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    resume_state: dict[str, Tensor] = field(default_factory=dict, repr=False)

    _ITEMS = ("embeddings",)
    _NOUN = "soft prompt"

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 3:
            raise ValueError(
                f"embeddings must be [n, m, d_model], got {tuple(self.embeddings.shape)}"
            )
        if isinstance(self.placeholder, bool) or not isinstance(self.placeholder, int):
            raise ValueError(f"placeholder must be a token id (int), got {self.placeholder!r}")
        self._check_rows()

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[1]

    @property
    def d_model(self) -> int:
        return self.embeddings.shape[2]

    @property
    def site(self) -> HookSite:
        """Where a soft prompt enters the residual stream: the input of block 0."""
        return HookSite(0, "resid_pre")

    @property
    def norms(self) -> Float[Tensor, " n"]:
        """Size of each member: the root-mean-square norm of its m embeddings."""
        return self.embeddings.float().norm(dim=-1).pow(2).mean(-1).sqrt()

    # ------------------------------------------------------------------ prompts
    def prepare(
        self, model: Host, prompts: PromptSet | str | Sequence[Any], *, chat: bool = True
    ) -> PromptSet:
        """`prompts` with the m placeholders at the start of each user turn (texts), or a
        `PromptSet` that already holds exactly m per row, unchanged.

        Examples:
            >>> sp = SoftPrompts(torch.randn(1, 2, 32), placeholder=0)
            >>> ps = sp.prepare(model, ["hi"], chat=False)
            >>> ps.token_lists()[0]  # two placeholders (id 0), then "h", "i"
            [0, 0, 15, 16]
        """
        if isinstance(prompts, PromptSet):
            rows = prompts.token_lists()
            counts = {sum(t == self.placeholder for t in row) for row in rows}
            if counts != {self.n_tokens}:
                raise ValueError(
                    f"a PromptSet for these soft prompts must hold {self.n_tokens} placeholder "
                    f"tokens (id {self.placeholder}) per row, found {sorted(counts)}; pass the "
                    "prompts as texts so prepare() can place them"
                )
            return prompts
        tok: Any = model.tokenizer
        if tok is None:
            raise ValueError("soft prompts need a model with a tokenizer to place placeholders")
        mark = tok.convert_ids_to_tokens(self.placeholder) * self.n_tokens
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("SoftPrompts.prepare takes prompt texts (or a prepared PromptSet)")
        ps = PromptSet.coerce(model, [mark + t for t in texts], chat=chat)
        for i, row in enumerate(ps.token_lists()):
            found = [p for p, t in enumerate(row) if t == self.placeholder]
            if len(found) != self.n_tokens or found != list(
                range(found[0], found[0] + self.n_tokens)
            ):
                raise ValueError(
                    f"prompt {i} does not tokenise to {self.n_tokens} consecutive placeholders "
                    f"(token {mark!r}); does the text contain that token itself?"
                )
        return ps

    # ------------------------------------------------------------------ use
    @contextmanager
    def apply(
        self, model: Host, index: int | Sequence[int] = 0, *, scale: float = 1.0
    ) -> Generator[Any, None, None]:
        """Soft prompt `index` in place of the placeholders of every row (or one member
        per block of rows for a list); run the model on `prepare`d prompts inside."""
        with apply(model, self, index, scale=scale) as m:
            yield m

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]:
        """The `hook_embed` hook putting member `rows[i]` in row block i's placeholders."""
        members = row_members(rows, len(self), "soft prompt")
        emb = self.embeddings.float()
        if not torch.isfinite(emb).all():
            raise ValueError("soft-prompt embeddings contain NaN or inf")
        reference = placeholder_embedding(model, self.placeholder)
        return [("hook_embed", _replace_hook(emb, members, reference, scale))]

    def nearest_tokens(self, model: Host, k: int = 5) -> list[list[list[tuple[str, float]]]]:
        """For each member and soft token, the k vocabulary tokens whose embeddings are
        closest in cosine similarity: [(token, cosine), ...] (the readout).

        Examples:
            >>> sp = SoftPrompts(model.W_E[[5, 9]][None].detach(), placeholder=0)
            >>> [row[0][0] for row in sp.nearest_tokens(model, k=1)[0]] == [
            ...     model.tokenizer.decode([5]), model.tokenizer.decode([9])]
            True
        """
        w_e: Any = getattr(model, "W_E", None)
        if w_e is None:
            raise ValueError("nearest_tokens reads the embedding matrix W_E of the model")
        table = torch.nn.functional.normalize(w_e.detach().float(), dim=-1)
        emb = torch.nn.functional.normalize(self.embeddings.float().to(table.device), dim=-1)
        cos = emb @ table.T  # [n, m, vocab]
        values, ids = cos.topk(min(k, table.shape[0]), dim=-1)
        tok: Any = model.tokenizer
        return [
            [
                [(tok.decode([int(i)]), round(float(v), 4)) for v, i in zip(vs, is_, strict=True)]
                for vs, is_ in zip(vrow, irow, strict=True)
            ]
            for vrow, irow in zip(values, ids, strict=True)
        ]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors) with JSON metadata; atomic."""
        return self._save(path, SOFT_PROMPTS_FORMAT, {"placeholder": self.placeholder})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SoftPrompts:
        """Read an artifact written by `save`. Never unpickles."""
        tensors, meta = read_artifact(path, SOFT_PROMPTS_FORMAT)
        info = json.loads(meta["json"])
        if "embeddings" not in tensors:
            raise ArtifactError(f"{path} has no 'embeddings' tensor; the file is incomplete")
        try:
            placeholder = int(info["placeholder"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt placeholder metadata: {err!r}") from err
        return cls(
            embeddings=tensors["embeddings"],
            placeholder=placeholder,
            **loaded_fields(path, info, tensors, "soft_prompt"),
        )

    def __repr__(self) -> str:
        return (
            f"SoftPrompts(n={len(self)}, n_tokens={self.n_tokens}, "
            f"d_model={self.embeddings.shape[-1]}, placeholder={self.placeholder}, "
            f"method={self.method!r}, model={self.model_name!r})"
        )
