"""Supervised steering vectors: directions read off contrast pairs of prompts.

A contrast pair is two prompts that differ in one concept: a positive prompt that shows
it and a negative prompt that does not ("I love this" / "I hate this", or the same A/B
question answered with the matching and the opposite letter). Reading the residual stream
at one site and one position of every prompt gives activations P_i (positive) and N_i
(negative), and three ways to turn them into a direction:

  * `mean_difference_vectors` - difference of means, mean_i (P_i - N_i) (ActAdd, CAA);
  * `pca_vectors` - top principal components of the paired differences D_i = P_i - N_i
    (repeng / RepE), sign chosen so that the positive side projects higher on average;
  * `probe_vectors` - the weight vector of an L2-regularised logistic-regression probe
    separating {P_i} from {N_i}.

`stability_curve` tells how many pairs a direction needs: the cosine between the vector
from the first n pairs and the vector from all of them, for n = 1, 2, 4, ...

Which token is read (`position`):
  * `"last"` - the last real token of each prompt;
  * `"mean"` - the mean over each prompt's target positions (`PromptSet.target_mask`;
    every real token for prompts given as texts or built without `target_positions`);
  * an int - that index of each prompt's own tokens (negative counts from the end);
  * `"answer"` - the A/B answer letter: the *last* real position whose token id is in
    `answer_tokens` (ids, or strings that each encode to one token). With
    `answer_tokens=None` these are the single-token encodings among "A", "B", " A",
    " B", which for CAA-format prompts ("... (A) yes (B) no ... Answer: (A") is the
    answer letter. A prompt without any of those tokens is an error.

Norms: a mean difference keeps its natural norm ||mean_i D_i|| unless `radius` is given.
PCA and probe directions have no natural length, so each of their unit directions is
scaled to that same natural norm (comparable strength, ready to apply), or to `radius`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, as_site, require_hook
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "Position",
    "mean_difference_vectors",
    "pca_vectors",
    "probe_vectors",
    "stability_curve",
    "pair_activations",
]

Position = Literal["last", "mean", "answer"] | int
Method = Literal["mean_difference", "pca", "probe"]
PromptsLike = PromptSet | Sequence[str] | Sequence[Sequence[int]]
DEFAULT_ANSWER_LETTERS = ("A", "B", " A", " B")


class _Captured(Exception):
    """Raised from a hook once the site's activation is read: nothing later runs."""


# ---------------------------------------------------------------------- activations
def _as_prompt_set(model: Any, prompts: PromptsLike, name: str) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of prompts (one per pair), got a single string")
    items: list[Any] = list(prompts)
    if not items:
        raise ValueError(f"{name} is empty; give at least one contrast pair")
    if all(isinstance(p, str) for p in items):
        return PromptSet.from_texts(model, items)
    return PromptSet.from_tokens(model, items)


def _answer_ids(model: Any, answer_tokens: Any) -> list[int]:
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


def _capture(model: Any, prompts: PromptSet, site: HookSite) -> Float[Tensor, "n pos d_model"]:
    """One forward pass, stopped (by raising from the hook) once `site` is read."""
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any = None) -> Tensor:
        captured["z"] = act.detach()
        raise _Captured

    with torch.no_grad(), model.hooks(fwd_hooks=[(site.name, capture)]):
        try:
            model(prompts.tokens, attention_mask=prompts.attention_mask.long())
        except _Captured:
            pass
    if "z" not in captured:
        raise RuntimeError(
            f"the hook {site.name} never fired; does the model expose TransformerLens "
            "hook names (for a TransformerBridge, call enable_compatibility_mode())?"
        )
    return captured["z"]


def _site_activations(
    model: Any, prompts: PromptSet, site: HookSite, batch_size: int
) -> Float[Tensor, "n pos d_model"]:
    """Activation at `site` for every prompt (right-padded like the PromptSet)."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        z = _capture(model, prompts[start : start + batch_size], site)
        pad = prompts.tokens.shape[1] - z.shape[1]
        chunks.append(torch.nn.functional.pad(z, (0, 0, 0, pad)))
    return torch.cat(chunks)


def _read(
    model: Any,
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
    model: Any,
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


# ---------------------------------------------------------------------- directions
def _mean_difference(P: Tensor, N: Tensor) -> Tensor:
    return (P.double() - N.double()).mean(0, keepdim=True)


def _pca(P: Tensor, N: Tensor, n_components: int, center: bool) -> tuple[Tensor, Tensor]:
    """Unit principal directions of the paired differences and their variance shares."""
    D = P.double() - N.double()
    if center:
        if D.shape[0] < 2:
            raise ValueError("center=True needs at least 2 pairs (one pair has no variance)")
        X = D - D.mean(0, keepdim=True)
    else:
        X = D
    limit = min(X.shape) - (1 if center else 0)
    if not 1 <= n_components <= limit:
        raise ValueError(
            f"n_components must be in [1, {limit}] for {D.shape[0]} pairs in d_model="
            f"{D.shape[1]} (center={center}), got {n_components}"
        )
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    dirs = Vh[:n_components]
    # sign: the positive side projects higher than the negative side on average
    sign = torch.sign(D.mean(0) @ dirs.T)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    share = S.pow(2) / S.pow(2).sum().clamp_min(1e-300)
    return dirs * sign[:, None], share[:n_components]


def _probe(P: Tensor, N: Tensor, l2: float, max_iter: int) -> tuple[Tensor, dict[str, Any]]:
    """Unit weight direction of an L2 logistic-regression probe (positive = label 1)."""
    with torch.inference_mode(False):  # trainable even when called under inference_mode
        return _fit_probe(P.clone(), N.clone(), l2, max_iter)


def _fit_probe(P: Tensor, N: Tensor, l2: float, max_iter: int) -> tuple[Tensor, dict[str, Any]]:
    X = torch.cat([P, N]).double()
    y = torch.cat([torch.ones(len(P)), torch.zeros(len(N))]).double().to(X.device)
    mu = X.mean(0, keepdim=True)
    scale = (X - mu).pow(2).sum(-1).mean().div(X.shape[1]).sqrt().clamp_min(1e-12)
    Xs = (X - mu) / scale  # one scalar: the direction in activation space is unchanged
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros((), dtype=X.dtype, device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss_fn() -> Tensor:
        logits = Xs @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return bce + 0.5 * l2 * w.pow(2).sum()

    evaluations = [0]

    def closure() -> Tensor:
        evaluations[0] += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        loss = loss_fn()
    w, b = w.detach(), b.detach()
    if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
        raise ValueError(
            "the probe did not train (zero or non-finite weights); are the positive and "
            "negative activations identical? Try a larger l2"
        )
    with torch.no_grad():
        acc = ((Xs @ w + b > 0).double() == y).double().mean()
    info = {
        "probe_loss": float(loss),
        "probe_accuracy": float(acc),
        "probe_evaluations": evaluations[0],
        "probe_bias": float(b),
        "feature_scale": float(scale),
    }
    return w / w.norm(), info


def _unit_direction(method: Method, P: Tensor, N: Tensor, options: dict[str, Any]) -> Tensor:
    if method == "mean_difference":
        v = _mean_difference(P, N)[0]
        return v / v.norm().clamp_min(1e-300)
    if method == "pca":
        dirs, _ = _pca(P, N, 1, bool(options.get("center", False)))
        return dirs[0]
    if method == "probe":
        w, _ = _probe(P, N, float(options.get("l2", 1e-2)), int(options.get("max_iter", 500)))
        return w
    raise ValueError(f"method must be 'mean_difference', 'pca' or 'probe', got {method!r}")


# ---------------------------------------------------------------------- artifacts
def _artifact(
    model: Any,
    method: str,
    directions: Tensor,
    P: Tensor,
    N: Tensor,
    info: dict[str, Any],
    radius: float | None,
    options: dict[str, Any],
    extra: dict[str, Any],
    seconds: float,
) -> SteeringVectors:
    if radius is not None and not radius > 0:
        raise ValueError(f"radius must be > 0 or None (natural norm), got {radius!r}")
    D = P.double() - N.double()
    natural = float(D.mean(0).norm())
    unit = torch.nn.functional.normalize(directions, dim=-1)
    if method == "mean_difference":
        vectors = directions if radius is None else radius * unit
    else:
        vectors = (natural if radius is None else radius) * unit
    proj = D @ unit.T  # [n_pairs, n_vectors]
    site: HookSite = info["site"]
    config = {
        "position": info["position"],
        "answer_tokens": info["answer_tokens"],
        "n_pairs": info["n_pairs"],
        "site": site.to_dict(),
        "radius": radius,
        "normalisation": "radius"
        if radius is not None
        else ("natural" if method == "mean_difference" else "natural_mean_difference_norm"),
        **options,
    }
    metadata = {
        "host": type(model).__name__,
        "seconds": seconds,
        "natural_norm": natural,
        "mean_projection_difference": proj.mean(0).tolist(),
        "pair_agreement": (proj > 0).double().mean(0).tolist(),
        "positive_positions": info["positive_positions"],
        "negative_positions": info["negative_positions"],
        **extra,
    }
    dtype = P.dtype if P.dtype.is_floating_point else torch.float32
    return SteeringVectors(
        vectors=vectors.to(dtype).cpu(),
        site=site,
        target=None,
        method=method,
        config=config,
        model_name=getattr(getattr(model, "cfg", None), "model_name", None),
        prompts={"positive": info["positive"].to_dict(), "negative": info["negative"].to_dict()},
        metadata=metadata,
    )


def mean_difference_vectors(
    model: Any,
    positive: PromptsLike,
    negative: PromptsLike,
    site: HookSite | str | int,
    *,
    position: Position = "last",
    answer_tokens: int | str | Sequence[int | str] | None = None,
    radius: float | None = None,
    batch_size: int = 32,
) -> SteeringVectors:
    """Difference of means mean_i (act(positive_i) - act(negative_i)) at `site` (ActAdd/CAA).

    One vector, of its natural norm unless `radius` is given. `config` records the
    position, pairs and site; `metadata["pair_agreement"]` is the fraction of pairs whose
    own difference points the same way as the mean.

    Examples:
        >>> sv = mean_difference_vectors(model, ["I love it"], ["I hate it"], 3)
        >>> with sv.apply(model, 0, scale=4.0):
        ...     logits = model("The movie was")
    """
    start = time.perf_counter()
    P, N, info = pair_activations(
        model,
        positive,
        negative,
        site,
        position=position,
        answer_tokens=answer_tokens,
        batch_size=batch_size,
    )
    v = _mean_difference(P, N)
    return _artifact(
        model, "mean_difference", v, P, N, info, radius, {}, {}, time.perf_counter() - start
    )


def pca_vectors(
    model: Any,
    positive: PromptsLike,
    negative: PromptsLike,
    site: HookSite | str | int,
    *,
    n_components: int = 1,
    center: bool = False,
    position: Position = "last",
    answer_tokens: int | str | Sequence[int | str] | None = None,
    radius: float | None = None,
    batch_size: int = 32,
) -> SteeringVectors:
    """Top principal components of the paired differences P_i - N_i (repeng style).

    `center=False` (default) takes the components of the uncentred differences, i.e. the
    right singular vectors of the difference matrix: the shared offset between the two
    sides, which *is* the concept, stays in the data. This equals RepE's PCA of
    randomly-flipped pairs (whose second moment is the same). `center=True` subtracts the
    mean difference first (repeng's `pca_diff` through scikit-learn PCA), leaving how the
    pairs vary around their mean. Each component's sign makes the positive side project
    higher on average; `metadata["explained_variance"]` gives each component's share.

    Examples:
        >>> sv = pca_vectors(model, pos_texts, neg_texts, 6, n_components=2)
    """
    start = time.perf_counter()
    P, N, info = pair_activations(
        model,
        positive,
        negative,
        site,
        position=position,
        answer_tokens=answer_tokens,
        batch_size=batch_size,
    )
    dirs, share = _pca(P, N, n_components, center)
    return _artifact(
        model,
        "pca",
        dirs,
        P,
        N,
        info,
        radius,
        {"n_components": n_components, "center": center},
        {"explained_variance": share.tolist()},
        time.perf_counter() - start,
    )


def probe_vectors(
    model: Any,
    positive: PromptsLike,
    negative: PromptsLike,
    site: HookSite | str | int,
    *,
    l2: float = 1e-2,
    max_iter: int = 500,
    position: Position = "last",
    answer_tokens: int | str | Sequence[int | str] | None = None,
    radius: float | None = None,
    batch_size: int = 32,
) -> SteeringVectors:
    """Direction of a logistic-regression probe telling positive from negative activations.

    Trained with L-BFGS (strong Wolfe line search) in float64 from zero weights, so it is
    deterministic; loss = mean binary cross-entropy + l2/2·||w||². Activations are centred
    and divided by one scalar (their RMS per dimension) before training, which leaves the
    direction in activation space as it is and makes `l2` scale-free. The positive side
    is label 1, so the vector points towards it. Pairing is not used, only the two sets.
    `metadata` has the training accuracy, loss and iterations.

    Examples:
        >>> sv = probe_vectors(model, pos_texts, neg_texts, 6, l2=1e-2)
    """
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    start = time.perf_counter()
    P, N, info = pair_activations(
        model,
        positive,
        negative,
        site,
        position=position,
        answer_tokens=answer_tokens,
        batch_size=batch_size,
    )
    w, extra = _probe(P, N, l2, max_iter)
    return _artifact(
        model,
        "probe",
        w[None],
        P,
        N,
        info,
        radius,
        {"l2": l2, "max_iter": max_iter},
        extra,
        time.perf_counter() - start,
    )


def stability_curve(
    model: Any,
    positive: PromptsLike,
    negative: PromptsLike,
    site: HookSite | str | int,
    *,
    method: Method = "mean_difference",
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    repeats: int = 1,
    position: Position = "last",
    answer_tokens: int | str | Sequence[int | str] | None = None,
    batch_size: int = 32,
    **options: Any,
) -> list[tuple[int, float]]:
    """Cosine between the vector from n pairs and the vector from all pairs, per n.

    Activations are read once. The pairs are put in a seeded random order and the
    vector from the first n of them is compared with the all-pairs vector, so subsets
    are nested as n grows; with `repeats > 1` the cosine is averaged over that many
    orders. `sizes` defaults to 1, 2, 4, ... below the number of pairs, then all pairs
    (whose cosine is 1). `options` go to the method (`center` for PCA; `l2`, `max_iter`
    for the probe). The source documents argue a direction is stable only from about
    32 pairs.

    Examples:
        >>> stability_curve(model, pos_texts, neg_texts, 6)  # doctest: +SKIP
        [(1, 0.41), (2, 0.57), (4, 0.72), ..., (64, 1.0)]
    """
    P, N, info = pair_activations(
        model,
        positive,
        negative,
        site,
        position=position,
        answer_tokens=answer_tokens,
        batch_size=batch_size,
    )
    n = info["n_pairs"]
    if sizes is None:
        sizes = [1 << i for i in range(n.bit_length()) if (1 << i) < n] + [n]
    sizes = [int(s) for s in sizes]
    for s in sizes:
        if not 1 <= s <= n:
            raise ValueError(f"every size must be in [1, {n}] (the number of pairs), got {s}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    reference = _unit_direction(method, P, N, options)
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(sizes)
    for _ in range(repeats):
        order = torch.randperm(n, generator=gen).to(P.device)
        for j, s in enumerate(sizes):
            idx = order[:s]
            v = _unit_direction(method, P[idx], N[idx], options)
            totals[j] += float(v @ reference)
    return [(s, t / repeats) for s, t in zip(sizes, totals, strict=True)]
