"""Per-token data behind the token views: where along a text a steering vector acts.

A steering vector θ is added at its source site at every position, but the change it
causes at the target site, Δ_t = Z_t(θ) − Z_t(0), differs from token to token. Reading
‖Δ_t‖₂ along a prompt and the completion the vector itself produced shows where the
vector bites: on the prompt, only on the completion, on particular words.

* `token_delta_norms`: ‖Δ_t‖₂ at the target for each vector, on the prompt followed by
  that vector's own completion (from `generate_steered`) or on given texts;
* `feature_token_activations`: one SAE feature's activation per token, with and without
  a vector, to see where the vector switches it on;
* `top_activating_tokens`: for hover text, the tokens of a corpus on which each feature
  fires most, with a little left context.

Results are plain dataclasses of lists (`TokenDeltas`, `TokenActivations`) with
`to_dict` / `from_dict`; `melbo_lens.views` renders them. sae-lens is reached only through
`melbo_lens.analysis.sae`, imported inside the functions that need an SAE.

Why one module over ~400 lines: per-token views (target-delta norms, feature activations
with and without a perturbation) share the generation and capture code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import HookSite, as_site, require_hook
from melbo_lens.generation import SteeredGenerations
from melbo_lens.perturbations.base import Perturbation
from melbo_lens.perturbations.vectors import SteeringVectors, steering_hook

__all__ = [
    "TokenActivations",
    "TokenDeltas",
    "feature_token_activations",
    "token_delta_norms",
    "top_activating_tokens",
]

# A text to read: a whole text (all prompt), or a (prompt, completion) pair.
Text = str | tuple[str, str]


# ---------------------------------------------------------------------- results
@dataclass
class TokenDeltas:
    """‖Δ_t‖₂ at `site` per token of one text, Δ = steered − unsteered activation.

    `tokens[:n_prompt]` is the prompt, the rest the completion; `steered[t]` says
    whether the vector was added at position t (every position, unless asked otherwise).

    Attributes:
        label: The vector's name.
        tokens: The text's tokens.
        norms: ‖Δ_t‖₂ per token.
        n_prompt: Prompt tokens at the start of `tokens`.
        steered: Per token, whether the vector was added there.
        site: Where Δ was read.
        index: The vector's member index.
        source: Where the vector was added.
    """

    label: str
    tokens: list[str]
    norms: list[float]
    n_prompt: int
    steered: list[bool]
    site: str
    index: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.norms) != n or len(self.steered) != n:
            raise ValueError(
                f"TokenDeltas needs one norm and one steered flag per token: {n} tokens, "
                f"{len(self.norms)} norms, {len(self.steered)} steered flags"
            )
        if not 0 <= self.n_prompt <= n:
            raise ValueError(
                f"n_prompt must be in [0, {n}] (the number of tokens), got {self.n_prompt}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "tokens": list(self.tokens),
            "norms": list(self.norms),
            "n_prompt": self.n_prompt,
            "steered": list(self.steered),
            "site": self.site,
            "index": self.index,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenDeltas:
        return cls(
            label=str(data["label"]),
            tokens=[str(t) for t in data["tokens"]],
            norms=[float(x) for x in data["norms"]],
            n_prompt=int(data["n_prompt"]),
            steered=[bool(s) for s in data["steered"]],
            site=str(data["site"]),
            index=None if data.get("index") is None else int(data["index"]),
            source=data.get("source"),
        )


@dataclass
class TokenActivations:
    """SAE feature `feature`'s activation per token, with (`steered`) and without
    (`unsteered`) vector `index`; `tokens[:n_prompt]` is the prompt.

    Attributes:
        label: The vector's name.
        feature: The SAE latent.
        tokens: The text's tokens.
        steered: The latent's activation per token with the vector.
        unsteered: The same without it.
        n_prompt: Prompt tokens at the start of `tokens`.
        site: The SAE's site.
        index: The vector's member index.
    """

    label: str
    feature: int
    tokens: list[str]
    steered: list[float]
    unsteered: list[float]
    n_prompt: int
    site: str = ""
    index: int | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.steered) != n or len(self.unsteered) != n:
            raise ValueError(
                f"TokenActivations needs one value per token in each run: {n} tokens, "
                f"{len(self.steered)} steered, {len(self.unsteered)} unsteered"
            )
        if not 0 <= self.n_prompt <= n:
            raise ValueError(
                f"n_prompt must be in [0, {n}] (the number of tokens), got {self.n_prompt}"
            )

    @property
    def change(self) -> list[float]:
        """steered − unsteered per token."""
        return [a - b for a, b in zip(self.steered, self.unsteered, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "feature": self.feature,
            "tokens": list(self.tokens),
            "steered": list(self.steered),
            "unsteered": list(self.unsteered),
            "n_prompt": self.n_prompt,
            "site": self.site,
            "index": self.index,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenActivations:
        return cls(
            label=str(data["label"]),
            feature=int(data["feature"]),
            tokens=[str(t) for t in data["tokens"]],
            steered=[float(x) for x in data["steered"]],
            unsteered=[float(x) for x in data["unsteered"]],
            n_prompt=int(data["n_prompt"]),
            site=str(data.get("site", "")),
            index=None if data.get("index") is None else int(data["index"]),
        )


# ---------------------------------------------------------------------- tokens
def _tokenizer(model: Host) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "per-token views need a model with a tokenizer (to turn texts into tokens and "
            "back); set one with model.set_tokenizer(...)"
        )
    return tok


def token_ids(model: Host, text: Text, prepend_bos: bool | None) -> tuple[list[int], int]:
    """Token ids of prompt + completion and the number of prompt tokens.

    The prompt is tokenized as `PromptSet.from_texts` does (BOS per the model's
    `default_prepend_bos`, not added twice to a text that already starts with it, e.g. a
    chat-formatted one); the completion separately, so the boundary stays exact.
    """
    tok = _tokenizer(model)
    prompt, completion = (text, "") if isinstance(text, str) else text
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    bos = tok.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    n_prompt = len(ids)
    if completion:
        ids += list(tok(completion, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"the text {text!r} has no tokens; give a non-empty prompt or completion")
    return ids, n_prompt


def _str_tokens(model: Host, ids: Sequence[int]) -> list[str]:
    tok = _tokenizer(model)
    return [tok.decode([int(i)]) for i in ids]


def _texts_for(
    texts_or_generations: SteeredGenerations | Text | Sequence[Text],
    indices: list[int],
    prompt: int,
) -> list[Text]:
    """One text per chosen vector."""
    src = texts_or_generations
    if isinstance(src, SteeredGenerations):
        if not 0 <= prompt < len(src.prompts):
            raise ValueError(f"prompt={prompt} but the generations hold {len(src.prompts)} prompts")
        missing = [k for k in indices if k not in src.indices]
        if missing:
            raise ValueError(
                f"no completions for vectors {missing}; the generations cover vectors "
                f"{src.indices}. Generate for them, or pass indices= from that list"
            )
        return [(src.prompts[prompt], src.for_vector(k)[prompt]) for k in indices]
    if isinstance(src, str | tuple):
        return [cast(Text, src)] * len(indices)
    texts = list(src)
    if len(texts) == 1:
        return texts * len(indices)
    if len(texts) != len(indices):
        raise ValueError(
            f"{len(texts)} texts for {len(indices)} vectors; pass one text for all vectors "
            "or one per vector"
        )
    return texts


# ---------------------------------------------------------------------- deltas
def _masked_hook(vectors: Float[Tensor, "rows d_model"], mask: Bool[Tensor, "rows pos"]):
    def hook(act: Tensor, hook: Any = None) -> Tensor:
        v = vectors.to(act)[:, None, :] * mask.to(act.device, act.dtype)[..., None]
        return act + v

    return hook


def _run_rows(
    model: Host,
    source: HookSite,
    target: HookSite,
    ps: PromptSet,
    rows: Float[Tensor, "rows d_model"],
    steer_mask: Bool[Tensor, "rows pos"] | None,
) -> Float[Tensor, "rows pos d_model"]:
    """Target activations with row r steered by rows[r] (at the positions in steer_mask)."""
    add = steering_hook(rows) if steer_mask is None else _masked_hook(rows, steer_mask)
    with torch.no_grad():
        return run_to_site(model, ps.tokens, ps.attention_mask, target.name, [(source.name, add)])


def token_delta_norms(
    model: Host,
    vectors: SteeringVectors | Perturbation,
    texts_or_generations: SteeredGenerations | Text | Sequence[Text],
    *,
    indices: Sequence[int] | None = None,
    target: HookSite | str | int | None = None,
    prompt: int = 0,
    positions: Literal["all", "completion"] = "all",
    scale: float = 1.0,
    prepend_bos: bool | None = None,
    max_rows: int = 32,
    labels: Sequence[str] | None = None,
) -> list[TokenDeltas]:
    """‖Z_t(θ_k) − Z_t(0)‖₂ at the target for every token t of each vector k's text.

    With `SteeredGenerations`, vector k reads prompt `prompt` followed by its own
    completion (re-tokenized from the decoded text); otherwise `texts_or_generations` is
    one text for all vectors or one per vector, each a string (all prompt) or a
    `(prompt, completion)` pair. The vector (times `scale`) is added at its source site at
    every position (`positions="all"`, as in generation) or only on the completion
    (`"completion"`). The target defaults to `vectors.target`. Steered and unsteered rows
    of up to `max_rows // 2` vectors run in one batch. `labels` names the vectors (one
    per vector of `vectors`; default `metadata["labels"]`, else `method[k]`).

    Args:
        model: The model.
        vectors: Steering vectors or any perturbation.
        texts_or_generations: `SteeredGenerations`, one text, or one text per vector.
        indices: The members to read (default: all).
        target: Where Δ is read (default: `vectors.target`).
        prompt: Which prompt of `SteeredGenerations` to read.
        positions: `"all"` or `"completion"`: where the vector is added.
        scale: Multiplier of the vector.
        prepend_bos: Prepend BOS (default: the model's setting).
        max_rows: Batch rows per forward pass.
        labels: Names of the vectors.

    Returns:
        One `TokenDeltas` per vector read.

    Raises:
        ValueError: No target is given or known, the texts or labels do not match the
            vectors, or `positions` / `max_rows` is invalid.
        IndexError: An index in `indices` is out of range.

    Examples:
        >>> gens = generate(model, vectors, "hello", max_new_tokens=3)
        >>> deltas = token_delta_norms(model, vectors, gens)
        >>> len(deltas) == len(vectors), len(deltas[0].norms) == len(deltas[0].tokens)
        (True, True)
    """
    if positions not in ("all", "completion"):
        raise ValueError(f"positions must be 'all' or 'completion', got {positions!r}")
    if positions == "completion" and not isinstance(vectors, SteeringVectors):
        raise ValueError(
            "positions='completion' steers only the completion tokens, which is defined for "
            f"steering vectors; a {type(vectors).__name__} applies at every position "
            "(positions='all')"
        )
    if labels is not None and len(labels) != len(vectors):
        raise ValueError(f"{len(labels)} labels for {len(vectors)} vectors; pass one per vector")
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2 (a steered and an unsteered row), got {max_rows}")
    source = require_hook(model, vectors.site)
    recorded = getattr(vectors, "target", None)
    if target is None:
        if not isinstance(recorded, HookSite):
            raise ValueError(
                "the vectors record no target site; pass target=HookSite(...) saying where "
                "to measure the change"
            )
        tgt = recorded
    else:
        tgt = as_site(target)
    tgt = require_hook(model, tgt)
    if tgt.position < source.position:
        raise ValueError(
            f"the target {tgt.name} comes before the source {source.name}; a vector added at "
            "the source cannot change it. Choose a target at the source or later"
        )
    if indices is None:
        if isinstance(texts_or_generations, SteeredGenerations):
            indices = list(texts_or_generations.indices)
        else:
            indices = list(range(len(vectors)))
    indices = [int(k) for k in indices]
    bad = [k for k in indices if not 0 <= k < len(vectors)]
    if bad:
        raise IndexError(f"vector indices {bad} out of range for {len(vectors)} vectors")
    texts = _texts_for(texts_or_generations, indices, prompt)
    encoded = [token_ids(model, t, prepend_bos) for t in texts]
    out: list[TokenDeltas] = []
    half = max_rows // 2
    for start in range(0, len(indices), half):
        chunk = list(range(start, min(start + half, len(indices))))
        ids = [encoded[j][0] for j in chunk]
        ps = PromptSet.from_tokens(model, ids + ids)
        steer_mask = None
        if not isinstance(vectors, SteeringVectors):  # any perturbation, through its hooks
            members: list[int | None] = [indices[j] for j in chunk] + [None] * len(chunk)
            with torch.no_grad():
                z = run_to_site(
                    model,
                    ps.tokens,
                    ps.attention_mask,
                    tgt.name,
                    vectors.hooks(model, members, scale),
                )
        else:
            vecs = vectors.vectors[[indices[j] for j in chunk]].float() * scale
            rows = torch.cat([vecs, torch.zeros_like(vecs)]).to(ps.tokens.device)
            if positions == "completion":
                pos = torch.arange(ps.tokens.shape[1], device=ps.tokens.device)
                n_p = torch.tensor([encoded[j][1] for j in chunk], device=pos.device)
                steer_mask = (pos[None] >= n_p[:, None]).repeat(2, 1) & ps.attention_mask
            z = _run_rows(model, source, tgt, ps, rows, steer_mask)
        n = len(chunk)
        norms = (z[:n].float() - z[n:].float()).norm(dim=-1).cpu()
        for r, j in enumerate(chunk):
            k = indices[j]
            tok_ids, n_prompt = encoded[j]
            length = len(tok_ids)
            steered = (
                [True] * length
                if steer_mask is None
                else [bool(x) for x in steer_mask[r, :length].tolist()]
            )
            out.append(
                TokenDeltas(
                    label=str(labels[k]) if labels is not None else _vector_label(vectors, k),
                    tokens=_str_tokens(model, tok_ids),
                    norms=[float(x) for x in norms[r, :length]],
                    n_prompt=n_prompt,
                    steered=steered,
                    site=tgt.name,
                    index=k,
                    source=source.name,
                )
            )
    return out


def _vector_label(vectors: Any, index: int) -> str:
    labels = vectors.metadata.get("labels") if isinstance(vectors.metadata, dict) else None
    if isinstance(labels, list | tuple) and len(labels) == len(vectors):
        return str(labels[index])
    return f"{vectors.method}[{index}]"


# ---------------------------------------------------------------------- SAE features
def feature_token_activations(
    model: Host,
    vectors: SteeringVectors,
    index: int,
    sae: Any,
    feature: int,
    text: Text,
    *,
    n_prompt: int | None = None,
    scale: float = 1.0,
    prepend_bos: bool | None = None,
    label: str | None = None,
) -> TokenActivations:
    """SAE feature `feature`'s activation per token of `text`, with and without vector
    `index` (times `scale`, added at its site at every position).

    The SAE reads its own site (`cfg.metadata.hook_name`), the vector's site or a later
    one. `text` is a string or a `(prompt, completion)` pair; `n_prompt` overrides the
    number of prompt tokens (default: all of a plain string, the prompt of a pair);
    `label` names the vector (default as in `token_delta_norms`).

    Args:
        model: The model.
        vectors: The steering vectors.
        index: The member to apply.
        sae: A sae-lens `SAE` at the vectors' site or later.
        feature: The latent to read.
        text: A string or a `(prompt, completion)` pair.
        n_prompt: Prompt tokens (default: from `text`).
        scale: Multiplier of the vector.
        prepend_bos: Prepend BOS (default: the model's setting).
        label: The vector's name.

    Returns:
        The latent's activation per token, with and without the vector.

    Raises:
        ValueError: `feature` is not a latent of the SAE, the SAE reads a site before the
            vector's, or `n_prompt` exceeds the text's tokens.
        IndexError: `index` is out of range.

    Examples:
        >>> acts = feature_token_activations(model, vectors, 0, sae, 17, ("hello", " there"))
        >>> len(acts.tokens) == len(acts.steered) == len(acts.unsteered), acts.n_prompt
        (True, 5)
    """
    # sae-lens stays unimported until an SAE is used
    from melbo_lens.analysis.sae.decompose import check_fit
    from melbo_lens.analysis.sae.features import capture_sae_input
    from melbo_lens.analysis.sae.loading import sae_site, warn_unfolded

    d_sae = int(sae.cfg.d_sae)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise ValueError(f"feature must be an int in [0, {d_sae}) for this SAE, got {feature!r}")
    if not -len(vectors) <= index < len(vectors):
        raise IndexError(f"vector index {index} out of range for {len(vectors)} vectors")
    ssite = require_hook(model, sae_site(sae))
    vsite = require_hook(model, vectors.site)
    warn_unfolded(sae)
    v = vectors.vectors[index]
    check_fit(v, None, sae, True)
    if ssite.position < vsite.position:
        raise ValueError(
            f"the SAE reads {ssite.name}, before the vector's site {vsite.name}; the vector "
            "cannot change anything there. Use an SAE at the vector's site or later"
        )
    ids, n_p = token_ids(model, text, prepend_bos)
    if n_prompt is not None:
        if not 0 <= n_prompt <= len(ids):
            raise ValueError(f"n_prompt={n_prompt} but the text has {len(ids)} tokens")
        n_p = n_prompt
    ps = PromptSet.from_tokens(model, [ids])
    before = capture_sae_input(model, ps, ssite)[0]
    if ssite.position == vsite.position:  # same tensor: the vector is simply added
        after = before + scale * v.to(before.device, before.dtype)
    else:
        with vectors.apply(model, index, scale=scale):
            after = capture_sae_input(model, ps, ssite)[0]
    with torch.no_grad():
        fb = sae.encode(before)[:, feature].float().cpu()
        fa = sae.encode(after)[:, feature].float().cpu()
    return TokenActivations(
        label=label if label is not None else _vector_label(vectors, index % len(vectors)),
        feature=feature,
        tokens=_str_tokens(model, ids),
        steered=[float(x) for x in fa],
        unsteered=[float(x) for x in fb],
        n_prompt=n_p,
        site=ssite.name,
        index=index % len(vectors),
    )


def _context(tokens: list[str], pos: int, width: int) -> str:
    """`…prev|tok|`: the token at `pos` between bars, after up to `width` tokens."""
    left = tokens[max(0, pos - width) : pos]
    more = "…" if pos - width > 0 else ""
    show = "".join(left).replace("\n", "⏎")
    return f"{more}{show}|{tokens[pos].replace(chr(10), '⏎')}|"


def top_activating_tokens(
    model: Host,
    sae: Any,
    texts: Sequence[str],
    features: Sequence[int],
    *,
    k: int = 5,
    context: int = 3,
    chat: bool = False,
    skip_special: bool = True,
    batch_size: int = 16,
) -> dict[int, list[tuple[str, float]]]:
    """For each feature, the `k` tokens of `texts` where it fires most, highest first.

    Each entry is (`"…prev|tok|"`, activation): the token between bars after up to
    `context` tokens of left context. Only positive activations count, so a feature
    that never fires gets an empty list. Special tokens (BOS, chat markers) are skipped
    unless `skip_special=False`; `chat=True` formats the texts with the chat template.

    Args:
        model: The model.
        sae: A sae-lens `SAE`.
        texts: The texts searched.
        features: The latents.
        k: Tokens kept per latent.
        context: Tokens of left context shown.
        chat: Format the texts with the chat template.
        skip_special: Skip BOS and chat-marker tokens.
        batch_size: Texts per forward pass.

    Returns:
        Per latent, its top (context, activation) pairs.

    Examples:
        >>> top = top_activating_tokens(model, sae, ["hello there", "a cat sat"], [0, 17], k=2)
        >>> sorted(top), all(len(v) <= 2 for v in top.values())
        ([0, 17], True)
    """
    # sae-lens stays unimported until an SAE is used
    from melbo_lens.analysis.sae.features import capture_sae_input
    from melbo_lens.analysis.sae.loading import sae_site, warn_unfolded

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    feats = [int(f) for f in features]
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"features {bad} out of range: the SAE has {d_sae} (0..{d_sae - 1})")
    if not feats:
        return {}
    if not texts:
        raise ValueError("no texts given; pass a corpus of at least one text")
    site = require_hook(model, sae_site(sae))
    warn_unfolded(sae)
    tok = _tokenizer(model)
    special = set(getattr(tok, "all_special_ids", []) or []) if skip_special else set()
    cols = torch.tensor(feats)
    best_val = torch.full((len(feats), 0), float("-inf"))
    best_loc = torch.zeros((len(feats), 0, 2), dtype=torch.long)  # (text, position)
    token_lists: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ps = PromptSet.from_chat(model, chunk) if chat else PromptSet.from_texts(model, chunk)
        x = capture_sae_input(model, ps, site)
        with torch.no_grad():
            acts = torch.stack(
                [sae.encode(row)[:, cols.to(row.device)].float().cpu() for row in x]
            )  # [n, pos, f]
        keep = ps.attention_mask.cpu().clone()
        if special:
            keep &= ~torch.isin(ps.tokens.cpu(), torch.tensor(sorted(special)))
        acts = torch.where(keep[..., None], acts, torch.full_like(acts, float("-inf")))
        n, pos = keep.shape
        flat = acts.reshape(n * pos, len(feats)).T  # [f, n*pos]
        loc = torch.stack(
            [torch.arange(n).repeat_interleave(pos) + start, torch.arange(pos).repeat(n)], -1
        )
        vals = torch.cat([best_val, flat], 1)
        locs = torch.cat([best_loc, loc[None].expand(len(feats), -1, -1)], 1)
        top = torch.topk(vals, min(k, vals.shape[1]), dim=1)
        best_val = top.values
        best_loc = torch.gather(locs, 1, top.indices[..., None].expand(-1, -1, 2))
        token_lists += ps.token_lists()
    strings: dict[int, list[str]] = {}
    out: dict[int, list[tuple[str, float]]] = {}
    for i, f in enumerate(feats):
        entries = []
        for val, (t, p) in zip(best_val[i].tolist(), best_loc[i].tolist(), strict=True):
            if not val > 0:
                continue
            if t not in strings:
                strings[t] = _str_tokens(model, token_lists[t])
            entries.append((_context(strings[t], p, context), float(val)))
        out[f] = entries
    return out
