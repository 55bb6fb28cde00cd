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

Prompts (`positive`, `negative`, paired by index): a `PromptSet`; plain strings, which are
tokenized as they are, *without* the chat template (build a `PromptSet.from_chat` or pass
conversations to get it); chat conversations (lists of `{"role", "content"}` dicts), to
which the chat template is applied; or token-id lists.

Norms: a mean difference keeps its natural norm ||mean_i D_i|| unless `radius` is given.
PCA and probe directions have no natural length, so each of their unit directions is
scaled to that same natural norm (comparable strength, ready to apply), or to `radius`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.contrast import Position, PromptsLike, pair_activations
from melbo_lens.methods.estimators import (
    Method,
    logistic_probe,
    mean_difference,
    pca_directions,
    unit_direction,
)
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["mean_difference_vectors", "pca_vectors", "probe_vectors", "stability_curve"]


# ---------------------------------------------------------------------- artifacts
def _artifact(
    model: Host,
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
    model: Host,
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

    Args:
        model: the model to read activations from.
        positive: the prompts with the behaviour (texts or a `PromptSet`).
        negative: their paired prompts without it, one for one.
        site: where activations are read and the vector is added.
        position: "last" token, "mean" over the prompt, "answer" (the answer token
            named by `answer_tokens`) or a position index.
        answer_tokens: with `position="answer"`, the answer token(s) to read at.
        radius: rescale the vector to this norm (default: its natural norm).
        batch_size: prompts per forward pass.

    Returns:
        One `SteeringVectors` member with `method="mean_difference"`.

    Raises:
        ValueError: unpaired prompt lists, a bad position or batch size.

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
    v = mean_difference(P, N)
    return _artifact(
        model, "mean_difference", v, P, N, info, radius, {}, {}, time.perf_counter() - start
    )


def pca_vectors(
    model: Host,
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

    Args:
        model: the model to read activations from.
        positive: the prompts with the behaviour.
        negative: their paired prompts without it, one for one.
        site: where activations are read and the vectors are added.
        n_components: how many principal components.
        center: subtract the mean difference first (see above).
        position: "last", "mean", "answer" or a position index, as for
            `mean_difference_vectors`.
        answer_tokens: with `position="answer"`, the answer token(s).
        radius: rescale each vector to this norm (default: the norm of the pairs'
            mean difference).
        batch_size: prompts per forward pass.

    Returns:
        `SteeringVectors` with one member per component, `method="pca"`.

    Raises:
        ValueError: unpaired prompt lists, a bad position, or more components than
            pairs allow.

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
    dirs, share = pca_directions(P, N, n_components, center)
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
    model: Host,
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

    Args:
        model: the model to read activations from.
        positive: the prompts with the behaviour (label 1).
        negative: the prompts without it (label 0).
        site: where activations are read and the vector is added.
        l2: the L2 penalty on the weights (scale-free, see above).
        max_iter: L-BFGS iterations at most.
        position: "last", "mean", "answer" or a position index, as for
            `mean_difference_vectors`.
        answer_tokens: with `position="answer"`, the answer token(s).
        radius: rescale the vector to this norm (default: the norm of the pairs'
            mean difference).
        batch_size: prompts per forward pass.

    Returns:
        One `SteeringVectors` member with `method="probe"`, the fit in `metadata`.

    Raises:
        ValueError: a negative `l2`, unpaired prompt lists or a bad position.

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
    w, extra = logistic_probe(P, N, l2, max_iter)
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
    model: Host,
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

    Args:
        model: the model to read activations from.
        positive: the prompts with the behaviour.
        negative: their paired prompts without it.
        site: where activations are read.
        method: "mean_difference", "pca" or "probe".
        sizes: the numbers of pairs (default: powers of 2 below the total, then all).
        seed: the order of the pairs.
        repeats: orders averaged over.
        position: "last", "mean", "answer" or a position index.
        answer_tokens: with `position="answer"`, the answer token(s).
        batch_size: prompts per forward pass.
        **options: passed to the method.

    Returns:
        (n, cosine) pairs, one per size.

    Examples:
        >>> curve = stability_curve(model, pos_texts, neg_texts, HookSite(1))
        >>> curve[-1][0], round(curve[-1][1], 6)    # all pairs: the vector itself
        (3, 1.0)
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
    reference = unit_direction(method, P, N, options)
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(sizes)
    for _ in range(repeats):
        order = torch.randperm(n, generator=gen).to(P.device)
        for j, s in enumerate(sizes):
            idx = order[:s]
            v = unit_direction(method, P[idx], N[idx], options)
            totals[j] += float(v @ reference)
    return [(s, t / repeats) for s, t in zip(sizes, totals, strict=True)]
