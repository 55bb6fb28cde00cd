"""An SAE view of a steering vector: which dictionary features it is made of, and moves.

A sparse autoencoder (SAE) trained on a model's activations at one hook site holds a
dictionary of feature directions: row f of its decoder `W_dec` [d_sae, d_in] is what
feature f writes into the activation when it fires with strength 1. A steering vector
living at the same site can be read in that dictionary in three ways:

* **Cosine** (`decompose_onto_sae(..., method="cosine")`): cos(θ, W_dec[f]) for every
  feature; the top-k by |cos|. `explained` is the fraction of ||θ||² inside the span of
  those k decoder rows (least squares onto them), so near-duplicate features do not
  count twice.
* **Sparse coding** (`method="sparse"`): orthogonal matching pursuit (OMP) on the
  dictionary. Each step picks the unit decoder direction most correlated with the
  residual, then refits θ by least squares on all picked rows (non-negative least
  squares with `nonnegative=True`), so θ ≈ Σ_j coefficients[j] · W_dec[features[j]],
  coefficients in feature-activation units. `explained` = 1 − ||residual||² / ||θ||².
* **Effect** (`feature_effects`): the SAE's feature activations at its site over real
  prompts, with and without the vector added at the vector's site (the same site or any
  later one, e.g. the MELBO target). The features whose activations change most are
  what the vector *does* in the SAE's terms, which can differ from what it *is*.

Feature steering makes the comparison the other way round: `feature_vectors` turns
decoder rows into `SteeringVectors` at the SAE's site (at a chosen norm), and
`clamp_feature` sets one feature's activation through the SAE while keeping the SAE's
error term, x' = x + decode(f') − decode(f), so only that feature's contribution changes.

Comparing a vector with its features fairly (equal norm, same prompts, same positions):
steering vectors are added at every position, and so are feature vectors, so give them
the vector's norm and run both through the same prompts and target positions:

    dec = decompose_onto_sae(vectors, sae, index=2, method="sparse", top_k=5)
    feats = feature_vectors(sae, dec.features, radius=float(vectors.radius[2]),
                            target=vectors.target)       # same norm, same site
    delta_similarity(model, prompts, vectors[2], feats)  # cos of their target deltas
    seg = Segment(model, vectors.site, vectors.target, prompts)  # same prompts, positions
    z = seg.run(torch.cat([vectors[2].vectors, feats.vectors]))
    mask = prompts.target_mask.expand(z.shape[:-1])
    melbo_objective_per_prompt(z, seg.unsteered.expand_as(z), mask).sum(-1)  # per vector

and `generate_steered(model, feats, prompts)` for completions. `compare_with_features`
does the objective and delta part in one call.

sae-lens is imported here and nowhere outside `melbo_lens.analysis`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor

from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment, run_to_site
from melbo_lens.core.sites import HookSite, require_hook
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.perturbations.base import apply, pick_members, row_members
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "FeatureClamp",
    "PACKAGED_SAES",
    "FeatureComparison",
    "FeatureEffects",
    "SaeDecomposition",
    "clamp_feature",
    "compare_with_features",
    "decoder_directions",
    "decompose_onto_sae",
    "feature_effects",
    "feature_vectors",
    "load_sae",
    "sae_site",
]

# Packaged SAEs, loadable offline by name: name -> folder (a sae-lens directory with
# cfg.json + sae_weights.safetensors, "/"-separated) relative to `melbo_lens/data/`;
# pyproject's package-data lists data/saes/*/* (it does not recurse by default).
PACKAGED_SAES: dict[str, str] = {
    # TopK SAEs (2048 latents, k=32) trained offline by scripts/train_saes.py; each
    # folder holds metrics.json with FVE, L0, dead fraction and CE loss recovered.
    "smollm2-135m-instruct-res7": "saes/smollm2-135m-instruct-res7",
    "smollm2-135m-instruct-res22-pre": "saes/smollm2-135m-instruct-res22-pre",
    "smollm2-135m-instruct/blocks.7.hook_resid_post": "saes/smollm2-135m-instruct-res7",
    "smollm2-135m-instruct/blocks.22.hook_resid_pre": "saes/smollm2-135m-instruct-res22-pre",
}

_SAE_FILES = ("cfg.json", "sae_weights.safetensors")


# ---------------------------------------------------------------------- loading
def load_sae(
    name_or_path: str | os.PathLike[str] | SAE,
    *,
    sae_id: str | None = None,
    device: str = "cpu",
) -> SAE:
    """Load an SAE: a packaged name, a local sae-lens directory, or a pretrained release.

    * a name in `PACKAGED_SAES` loads the SAE shipped with melbo_lens (offline);
    * a directory written by sae-lens (`sae.save_model(dir)`: `cfg.json` and
      `sae_weights.safetensors`) loads with `SAE.load_from_disk`;
    * `load_sae(release, sae_id=...)` calls `SAE.from_pretrained(release, sae_id)`, which
      needs the Hugging Face hub; offline it fails with a message saying so.

    An `SAE` object is returned as it is.

    Examples:
        >>> sae = load_sae("runs/sae_l7")                              # doctest: +SKIP
        >>> sae = load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")  # doctest: +SKIP
    """
    if isinstance(name_or_path, SAE):
        return name_or_path
    name = os.fspath(name_or_path)
    if sae_id is None and name in PACKAGED_SAES:
        folder = resources.files("melbo_lens").joinpath("data", *PACKAGED_SAES[name].split("/"))
        with resources.as_file(folder) as path:
            return _load_dir(Path(path), device)
    path = Path(name).expanduser()
    if sae_id is None:
        if path.is_dir():
            return _load_dir(path, device)
        if path.is_file() and path.name in _SAE_FILES:
            return _load_dir(path.parent, device)
        known = sorted(PACKAGED_SAES) or "none packaged yet"
        raise FileNotFoundError(
            f"no SAE directory at {name!r}; expected a folder written by sae-lens "
            f"(sae.save_model(dir): {' + '.join(_SAE_FILES)}), a packaged SAE name "
            f"({known}), or a pretrained release with sae_id=..., e.g. "
            "load_sae('gpt2-small-res-jb', sae_id='blocks.8.hook_resid_pre')"
        )
    try:
        return SAE.from_pretrained(name, sae_id, device=device)
    except ValueError as err:  # unknown release / id: sae-lens says which
        raise ValueError(f"cannot load pretrained SAE {name!r} / {sae_id!r}: {err}") from err
    except (OSError, ConnectionError) as err:  # hub unreachable, offline, not in cache
        raise RuntimeError(
            f"could not download pretrained SAE {name!r} / {sae_id!r} "
            f"({type(err).__name__}: {str(err)[:160]}): "
            "no pretrained SAE can be downloaded without network access to the Hugging Face "
            "hub. Pass a local sae-lens directory instead: load_sae('/path/to/dir'), a "
            "folder holding cfg.json and sae_weights.safetensors (written by "
            "sae.save_model(dir), or copied from a machine with network access)"
        ) from err


def _load_dir(path: Path, device: str) -> SAE:
    missing = [f for f in _SAE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a sae-lens SAE directory: it lacks {missing}; save one with "
            "sae.save_model(dir)"
        )
    return SAE.load_from_disk(path, device=device)


def _hook_name(sae: SAE) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    return name if name is not None else getattr(sae.cfg, "hook_name", None)


def sae_site(sae: SAE) -> HookSite:
    """The residual-width `HookSite` the SAE reads (from `cfg.metadata.hook_name`).

    Examples:
        >>> sae_site(sae)                                              # doctest: +SKIP
        HookSite(layer=7, point='resid_post')
    """
    name = _hook_name(sae)
    if name is None:
        raise ValueError(
            "the SAE records no hook name (cfg.metadata.hook_name is None), so its site is "
            "unknown; set it, e.g. sae.cfg.metadata.hook_name = 'blocks.7.hook_resid_post'"
        )
    head = getattr(sae.cfg.metadata, "hook_head_index", None)
    if head is not None:
        raise ValueError(f"the SAE reads head {head} of {name}, not a residual-width site")
    try:
        return HookSite.parse(name)
    except ValueError as err:
        raise ValueError(
            f"the SAE reads {name!r}, which is not a residual-width hook site; steering "
            f"vectors live in the residual stream ({err})"
        ) from err


def _site_or_none(sae: SAE) -> HookSite | None:
    try:
        return sae_site(sae)
    except ValueError:
        return None


def _warn_unfolded(sae: SAE) -> None:
    mode = getattr(sae.cfg, "normalize_activations", "none")
    if mode in ("expected_average_only_in", "covariance_whitening"):
        warnings.warn(
            f"the SAE expects normalised inputs (normalize_activations={mode!r}) that it "
            "does not apply itself; fold the normalisation into its weights first "
            "(sae.fold_activation_norm_scaling_factor(...)), or activations are misread",
            stacklevel=3,
        )


def decoder_directions(sae: SAE) -> Float[Tensor, "d_sae d_in"]:
    """What each feature writes at activation 1: `W_dec` rows (unit rows for TopK SAEs
    that rescale activations by decoder norm, whose decode divides by it)."""
    w = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return w


# ---------------------------------------------------------------------- checks
def _pick_vector(
    vector: SteeringVectors | Tensor, index: int | None, site: HookSite | None
) -> tuple[Tensor, HookSite | None, str]:
    if isinstance(vector, SteeringVectors):
        if index is None:
            if len(vector) != 1:
                raise ValueError(
                    f"the artifact holds {len(vector)} vectors; pass index=i to choose one"
                )
            index = 0
        if site is not None and site != vector.site:
            raise ValueError(
                f"site={site.name} but the vectors live at {vector.site.name}; leave site= "
                "out for SteeringVectors (it is only for plain tensors)"
            )
        return vector.vectors[index], vector.site, f"{vector.method}[{index}]"
    v = torch.as_tensor(vector)
    if v.ndim == 2 and index is not None:
        v = v[index]
    elif v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise ValueError(
            f"expected one vector [d], or [n, d] with index=i, or SteeringVectors; "
            f"got {tuple(v.shape)}"
        )
    return v, site, "vector"


def _check_fit(v: Tensor, vsite: HookSite | None, sae: SAE, allow_site_mismatch: bool) -> None:
    d_in = int(sae.cfg.d_in)
    if v.shape[-1] != d_in:
        raise ValueError(
            f"the vector has {v.shape[-1]} dimensions but the SAE reads d_in={d_in}; "
            "the SAE was trained on another model or site width. Use an SAE trained on "
            f"this model's residual stream (d_model={v.shape[-1]})"
        )
    if not torch.isfinite(v).all():
        raise ValueError("the vector contains NaN or inf")
    if vsite is None or allow_site_mismatch or _hook_name(sae) is None:
        return
    ssite = sae_site(sae)
    if ssite.position != vsite.position:
        raise ValueError(
            f"the SAE reads {ssite.name} but the vector lives at {vsite.name}; its features "
            "describe another site. Use an SAE trained at the vector's site, or pass "
            "allow_site_mismatch=True if you mean to compare across sites"
        )


# ---------------------------------------------------------------------- decomposition
@dataclass
class SaeDecomposition:
    """A vector read in an SAE's dictionary; features ranked by importance.

    `coefficients`: cosines for `method="cosine"`; for `"sparse"`, the weights in feature
    activation units, θ ≈ Σ_j coefficients[j]·W_dec[features[j]]. `cosines`: cos(θ,
    W_dec[f]) for both. `explained_curve[j]`: fraction of ||θ||² explained by the best
    (least-squares) fit on the first j+1 features; `explained` is its last value.
    """

    features: list[int]
    coefficients: list[float]
    explained: float
    method: str
    cosines: list[float] = field(default_factory=list)
    explained_curve: list[float] = field(default_factory=list)
    vector_norm: float = 0.0
    nonnegative: bool = False
    vector_site: HookSite | None = None
    sae_site: HookSite | None = None
    label: str = "vector"

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "coefficients": list(self.coefficients),
            "explained": self.explained,
            "method": self.method,
            "cosines": list(self.cosines),
            "explained_curve": list(self.explained_curve),
            "vector_norm": self.vector_norm,
            "nonnegative": self.nonnegative,
            "vector_site": None if self.vector_site is None else self.vector_site.name,
            "sae_site": None if self.sae_site is None else self.sae_site.name,
            "label": self.label,
        }

    def table(self, limit: int | None = None) -> str:
        """One row per feature: rank, feature, coefficient, cosine, cumulative explained."""
        coef = "cosine" if self.method == "cosine" else "coef"
        lines = [f"{'rank':>4} {'feature':>8} {coef:>9} {'cos':>7} {'explained':>9}"]
        n = len(self.features) if limit is None else min(limit, len(self.features))
        for j in range(n):
            lines.append(
                f"{j + 1:>4} {self.features[j]:>8} {self.coefficients[j]:>9.4f} "
                f"{self.cosines[j]:>7.3f} {self.explained_curve[j]:>9.3f}"
            )
        if n < len(self.features):
            lines.append(f"... {len(self.features) - n} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        where = f" at {self.vector_site.name}" if self.vector_site else ""
        return (
            f"{self.label}{where} (norm {self.vector_norm:.3g}) on SAE decoder directions "
            f"({self.method}): {len(self.features)} features explain {self.explained:.1%} "
            "of its norm²\n" + self.table()
        )


def decompose_onto_sae(
    vector: SteeringVectors | Float[Tensor, " d"],
    sae: SAE,
    *,
    index: int | None = None,
    top_k: int = 20,
    method: Literal["cosine", "sparse"] = "cosine",
    nonnegative: bool = False,
    allow_site_mismatch: bool = False,
    site: HookSite | None = None,
) -> SaeDecomposition:
    """Decompose one steering vector onto the SAE's decoder directions.

    `vector` is a `SteeringVectors` (choose one with `index`) or a tensor [d] (give its
    `site=` to have it checked). The SAE must read the vector's site (else a clear error,
    unless `allow_site_mismatch=True`) and have d_in = the vector's width. With
    `nonnegative=True` only features pointing along θ are used (cosine: ranked by cos,
    not |cos|; sparse: non-negative least squares).

    Examples:
        >>> dec = decompose_onto_sae(vecs, sae, index=0, method="sparse", top_k=5)
        >>> 1 <= len(dec.features) <= 5, 0.0 <= dec.explained <= 1.0
        (True, True)
    """
    if method not in ("cosine", "sparse"):
        raise ValueError(f"method must be 'cosine' or 'sparse', got {method!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    v, vsite, label = _pick_vector(vector, index, site)
    _check_fit(v, vsite, sae, allow_site_mismatch)
    v = v.detach().to("cpu", torch.float64)
    norm = float(v.norm())
    if norm == 0:
        raise ValueError("the vector is all zeros; there is nothing to decompose")
    # The dictionary stays float32 on the SAE's device (d_sae x d_in can be large); the
    # few selected rows are refitted in float64 on the CPU.
    dec = decoder_directions(sae).float()
    dec_norm = dec.norm(dim=-1).clamp_min(1e-12)

    def correlate(x: Tensor) -> Tensor:  # <unit decoder row, x> for every feature
        return ((dec @ x.to(dec.device, torch.float32)) / dec_norm).double().cpu()

    def rows(idx: Tensor) -> Tensor:  # selected unit rows, float64 on the CPU
        sel = idx.to(dec.device)
        return (dec[sel] / dec_norm[sel, None]).double().cpu()

    cos = correlate(v / norm)
    k = min(top_k, dec.shape[0])
    if method == "cosine":
        score = cos if nonnegative else cos.abs()
        chosen = torch.topk(score, k).indices
        if nonnegative:
            chosen = chosen[cos[chosen] > 0]
        coefs = cos[chosen]
    else:
        chosen, weights = _omp(correlate, rows, v, k, nonnegative)
        order = torch.argsort(weights.abs(), descending=True, stable=True)
        chosen, weights = chosen[order], weights[order]
        keep = weights.abs() > 1e-12 * norm
        chosen, weights = chosen[keep], weights[keep]
        # unit-direction weights -> feature-activation units
        coefs = weights / dec_norm[chosen.to(dec.device)].double().cpu()
    curve = _explained_prefixes(rows(chosen), v, nonnegative and method == "sparse")
    return SaeDecomposition(
        features=[int(f) for f in chosen],
        coefficients=[float(c) for c in coefs],
        explained=curve[-1] if curve else 0.0,
        method=method,
        cosines=[float(c) for c in cos[chosen]],
        explained_curve=curve,
        vector_norm=norm,
        nonnegative=nonnegative,
        vector_site=vsite,
        sae_site=_site_or_none(sae),
        label=label,
    )


def _omp(
    correlate: Callable[[Tensor], Tensor],
    rows: Callable[[Tensor], Tensor],
    v: Float[Tensor, " d"],
    k: int,
    nonnegative: bool,
) -> tuple[Int[Tensor, " m"], Float[Tensor, " m"]]:
    """Orthogonal matching pursuit on unit-norm atoms; at most k atoms.

    `correlate(r)` gives <atom, r> for every atom, `rows(idx)` the chosen atoms. Each
    step adds the atom most correlated with the residual (most positively when
    `nonnegative`), then refits v on all chosen atoms by (non-negative) least squares.
    """
    chosen: list[int] = []
    weights = v.new_zeros(0)
    residual = v.clone()
    total = float(v.dot(v))
    available: Tensor | None = None
    for _ in range(k):
        if float(residual.dot(residual)) <= 1e-12 * total:
            break
        corr = correlate(residual)
        if available is None:
            available = torch.ones(corr.shape[0], dtype=torch.bool)
        score = corr if nonnegative else corr.abs()
        score = torch.where(available, score, torch.full_like(score, -math.inf))
        best = int(score.argmax())
        if score[best] <= 1e-12 * math.sqrt(total):
            break
        chosen.append(best)
        available[best] = False
        a = rows(torch.tensor(chosen)).T  # [d, m]
        weights = _nnls(a, v) if nonnegative else torch.linalg.lstsq(a, v[:, None]).solution[:, 0]
        residual = v - a @ weights
    return torch.tensor(chosen, dtype=torch.long), weights


def _nnls(a: Float[Tensor, "d m"], b: Float[Tensor, " d"], max_iter: int = 200) -> Tensor:
    """min ||a x − b|| subject to x >= 0 (Lawson–Hanson active set)."""
    m = a.shape[1]
    x = a.new_zeros(m)
    passive = torch.zeros(m, dtype=torch.bool)
    tol = 1e-10 * max(1.0, float(a.abs().max()) * float(b.abs().max()))

    def solve(p: Tensor) -> Tensor:
        s = a.new_zeros(m)
        s[p] = torch.linalg.lstsq(a[:, p], b[:, None]).solution[:, 0]
        return s

    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        w[passive] = -math.inf
        j = int(w.argmax())
        if w[j] <= tol:
            break
        passive[j] = True
        s = solve(passive)
        while bool((s[passive] <= 0).any()):
            bad = passive & (s <= 0)
            alpha = float((x[bad] / (x[bad] - s[bad])).min())
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
            s = solve(passive)
        x = s
    return x.clamp_min(0.0)


def _explained_prefixes(
    atoms: Float[Tensor, "m d"], v: Float[Tensor, " d"], nonnegative: bool
) -> list[float]:
    """Fraction of ||v||² explained by the best fit on atoms[:j+1], for each j."""
    total = float(v.dot(v))
    out = []
    for j in range(1, atoms.shape[0] + 1):
        a = atoms[:j].T
        w = _nnls(a, v) if nonnegative else torch.linalg.lstsq(a, v[:, None]).solution[:, 0]
        r = v - a @ w
        out.append(max(0.0, 1.0 - float(r.dot(r)) / total))
    return out


# ---------------------------------------------------------------------- effects
@dataclass
class FeatureEffects:
    """SAE feature activations at `sae_site` with and without a steering vector.

    Only the `features` with the largest mean |change| (over the counted positions,
    `mask`) are stored, per prompt and token: `before` / `after` [n, pos, top]. Means are
    over the counted positions; `l0_before` / `l0_after` are the mean number of active
    features per counted token, over the whole dictionary.
    """

    features: list[int]
    mean_abs_change: list[float]
    mean_before: list[float]
    mean_after: list[float]
    before: Float[Tensor, "n pos top"]
    after: Float[Tensor, "n pos top"]
    mask: Bool[Tensor, "n pos"]
    tokens: Int[Tensor, "n pos"]
    vector_site: HookSite
    sae_site: HookSite
    index: int
    scale: float = 1.0
    l0_before: float = 0.0
    l0_after: float = 0.0

    @property
    def change(self) -> Float[Tensor, "n pos top"]:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "mean_abs_change": list(self.mean_abs_change),
            "mean_before": list(self.mean_before),
            "mean_after": list(self.mean_after),
            "before": self.before.tolist(),
            "after": self.after.tolist(),
            "mask": self.mask.tolist(),
            "tokens": self.tokens.tolist(),
            "vector_site": self.vector_site.name,
            "sae_site": self.sae_site.name,
            "index": self.index,
            "scale": self.scale,
            "l0_before": self.l0_before,
            "l0_after": self.l0_after,
        }

    def table(self, limit: int | None = None) -> str:
        lines = [f"{'rank':>4} {'feature':>8} {'mean|Δ|':>9} {'before':>9} {'after':>9}"]
        n = len(self.features) if limit is None else min(limit, len(self.features))
        for j in range(n):
            lines.append(
                f"{j + 1:>4} {self.features[j]:>8} {self.mean_abs_change[j]:>9.4f} "
                f"{self.mean_before[j]:>9.4f} {self.mean_after[j]:>9.4f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"vector {self.index} at {self.vector_site.name} (scale {self.scale:g}) seen by the "
            f"SAE at {self.sae_site.name}; L0 {self.l0_before:.1f} -> {self.l0_after:.1f}\n"
            + self.table()
        )


def _capture(model: Any, prompts: PromptSet, site: HookSite) -> Tensor:
    """The activation at `site` for the prompts; the forward pass stops there."""
    with torch.no_grad():
        return run_to_site(model, prompts.tokens, prompts.attention_mask, site.name)


def feature_effects(
    model: Any,
    sae: SAE,
    vectors: SteeringVectors,
    index: int,
    prompts: PromptSet | str | Sequence[str],
    *,
    top_n: int = 20,
    scale: float = 1.0,
    positions: Literal["all", "target"] = "all",
    chunk_tokens: int = 4096,
) -> FeatureEffects:
    """Which SAE features a steering vector switches on or off, per prompt and token.

    The vector is added at its own site (every position, as `vectors.apply` does); the
    SAE reads its site, which must be the same or later (e.g. an SAE at the MELBO target).
    Features are ranked by mean |activation change| over the real tokens
    (`positions="all"`) or the prompts' target positions (`"target"`).

    Examples:
        >>> fx = feature_effects(model, sae, vectors, 0, prompts, top_n=10)  # doctest: +SKIP
        >>> print(fx.table())                                            # doctest: +SKIP
    """
    if positions not in ("all", "target"):
        raise ValueError(f"positions must be 'all' or 'target', got {positions!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, PromptSet):
        if len(prompts) == 0:
            raise ValueError("no prompts given; pass a PromptSet or at least one text")
        prompts = PromptSet.from_texts(model, list(prompts))
    ssite = require_hook(model, sae_site(sae))
    vsite = require_hook(model, vectors.site)
    _warn_unfolded(sae)
    d_model = int(model.cfg.d_model)
    if vectors.d_model != d_model:
        raise ValueError(
            f"the vectors are {vectors.d_model}-dimensional but the model has d_model="
            f"{d_model}; they come from another model"
        )
    v = vectors.vectors[index]
    _check_fit(v, None, sae, True)
    if ssite.position < vsite.position:
        raise ValueError(
            f"the SAE reads {ssite.name}, before the vector's site {vsite.name}; the vector "
            "cannot change anything there. Use an SAE at the vector's site or later"
        )
    before = _capture(model, prompts, ssite)
    if ssite.position == vsite.position:  # same tensor: read it with the vector added
        after = before + scale * v.to(before.device, before.dtype)
    else:
        with vectors.apply(model, index, scale=scale):
            after = _capture(model, prompts, ssite)
    mask = prompts.attention_mask if positions == "all" else prompts.target_mask
    flat_b, flat_a = before[mask], after[mask]  # [tokens, d_in]
    n_tok = flat_b.shape[0]
    d_sae = int(sae.cfg.d_sae)
    sums = torch.zeros(3, d_sae, dtype=torch.float64)  # |Δ|, before, after
    l0 = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n_tok, chunk_tokens):
            fb = sae.encode(flat_b[start : start + chunk_tokens]).double().cpu()
            fa = sae.encode(flat_a[start : start + chunk_tokens]).double().cpu()
            sums += torch.stack([(fa - fb).abs().sum(0), fb.sum(0), fa.sum(0)])
            l0 += torch.stack([(fb != 0).sum(), (fa != 0).sum()]).double()
        means = sums / max(n_tok, 1)
        top = torch.topk(means[0], min(top_n, d_sae)).indices
        per_b = _encode_columns(sae, before, top)
        per_a = _encode_columns(sae, after, top)
    zero = torch.zeros((), dtype=per_b.dtype)
    keep = mask[..., None].cpu()
    return FeatureEffects(
        features=[int(f) for f in top],
        mean_abs_change=[float(x) for x in means[0, top]],
        mean_before=[float(x) for x in means[1, top]],
        mean_after=[float(x) for x in means[2, top]],
        before=torch.where(keep, per_b, zero),
        after=torch.where(keep, per_a, zero),
        mask=mask.cpu(),
        tokens=prompts.tokens.cpu(),
        vector_site=vsite,
        sae_site=ssite,
        index=int(index),
        scale=float(scale),
        l0_before=float(l0[0]) / max(n_tok, 1),
        l0_after=float(l0[1]) / max(n_tok, 1),
    )


def _encode_columns(sae: SAE, x: Tensor, cols: Tensor) -> Tensor:
    """sae.encode(x)[..., cols] one prompt at a time (never [n, pos, d_sae] at once)."""
    return torch.stack([sae.encode(row)[..., cols.to(row.device)].float().cpu() for row in x])


# ---------------------------------------------------------------------- feature steering
def feature_vectors(
    sae: SAE,
    features: int | Sequence[int],
    *,
    radius: float | Sequence[float] | Tensor | None = None,
    target: HookSite | None = None,
) -> SteeringVectors:
    """Decoder directions of `features` as steering vectors at the SAE's site.

    `radius=None` keeps the decoder rows as they are (adding one = the feature firing at
    activation 1; `.apply(model, i, scale=a)` adds activation a). A number (or one per
    feature) scales each to that norm, e.g. a learned vector's norm for a fair comparison.
    `target` is recorded so `delta_similarity` and `Segment` know where to measure.

    Examples:
        >>> feats = feature_vectors(sae, [12, 40], radius=4.0)
        >>> with feats.apply(model, 0):
        ...     logits = model(prompts.tokens)
    """
    feats = [features] if isinstance(features, int) else [int(f) for f in features]
    if not feats:
        raise ValueError("no features given; pass at least one feature index")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"features {bad} out of range: the SAE has {d_sae} (0..{d_sae - 1})")
    dec = decoder_directions(sae)[feats].float().cpu().clone()
    r: Tensor | None = None
    if radius is not None:
        r = torch.as_tensor(radius, dtype=dec.dtype).flatten()
        if r.numel() not in (1, len(feats)) or not (r > 0).all():
            raise ValueError(
                f"radius must be a positive number or one per feature ({len(feats)}), "
                f"got {radius!r}"
            )
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12) * r[:, None]
    meta = getattr(sae.cfg, "metadata", None)
    return SteeringVectors(
        vectors=dec,
        site=sae_site(sae),
        target=target,
        method="sae_feature",
        config={"features": feats, "radius": None if r is None else r.tolist()},
        model_name=getattr(meta, "model_name", None),
        metadata={"sae_hook_name": _hook_name(sae), "d_sae": d_sae},
    )


@dataclass
class FeatureClamp:
    """SAE-feature clamps as a `Perturbation`: member k sets feature `features[k]` of `sae`
    to `values[k]` at the SAE's site, keeping the SAE's error term.

    At every position: f = encode(x), f' = f with f'[feature] = value, and
    x' = x + decode(f') − decode(f), so the reconstruction error (and every other
    feature) stays as it was; `scale` blends x + scale·(x' − x). Rows whose member is None
    are untouched.

    Examples:
        >>> clamps = FeatureClamp(sae, [3, 7], [10.0, 0.0])
        >>> gens = generate(model, clamps, "tell me a story", max_new_tokens=4)
        >>> len(gens.steered)
        2
    """

    sae: Any
    features: Sequence[int]
    values: Sequence[float] | Tensor

    def __post_init__(self) -> None:
        d_sae = int(self.sae.cfg.d_sae)
        self.features = [int(f) for f in _check_features(self.features, d_sae)]
        values = torch.as_tensor(self.values, dtype=torch.float32)
        if values.ndim == 0 and len(self.features) != 1:
            values = values.expand(len(self.features))
        if values.ndim == 0:
            values = values[None]
        if values.shape[:1] != (len(self.features),):
            raise ValueError(
                f"one value per feature: {len(self.features)} features, values "
                f"{tuple(values.shape)}"
            )
        self.values = values

    @property
    def site(self) -> HookSite:
        return sae_site(self.sae)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int | slice | Sequence[int]) -> FeatureClamp:
        idx = torch.arange(len(self))[[index] if isinstance(index, int) else index]
        values = torch.as_tensor(self.values)[idx]
        return FeatureClamp(self.sae, [self.features[int(i)] for i in idx], values)

    def hooks(self, model: Any, rows: Any, scale: float = 1.0) -> list[tuple[str, Any]]:
        site = require_hook(model, self.site)
        _warn_unfolded(self.sae)
        d_model = int(model.cfg.d_model)
        if int(self.sae.cfg.d_in) != d_model:
            raise ValueError(
                f"the SAE reads d_in={self.sae.cfg.d_in} but the model has d_model={d_model}; "
                "use an SAE trained on this model"
            )
        members = row_members(rows, len(self), "feature clamp")
        sae, feats = self.sae, torch.tensor(self.features)
        values = torch.as_tensor(self.values)

        if isinstance(rows, int):  # one clamp on every row; its value may vary by position
            feature, value = int(feats[members[0]]), values[members[0]]

            def hook(act: Tensor, hook: Any = None) -> Tensor:
                both = torch.stack([act, act])  # one encode/decode: per-token norms agree
                f = sae.encode(both).clone()
                target = value.to(dtype=f.dtype, device=f.device)
                f[1, ..., feature] = target.expand(f.shape[1:-1])
                out = sae.decode(f)
                return act + (scale * (out[1] - out[0])).to(act.dtype)

            return [(site.name, hook)]

        if values.ndim != 1:
            raise ValueError("per-row feature clamps take one number per feature")
        on = pick_members(torch.ones(len(self)), members).bool()
        feat_rows = pick_members(feats, members)
        value_rows = pick_members(values, members)

        def per_row(act: Tensor, hook: Any = None) -> Tensor:
            b, g = act.shape[0], feat_rows.shape[0]
            if b % g:
                raise ValueError(
                    f"{g} per-row clamps for a batch of {b} rows; the batch must hold a "
                    "whole number of rows per member"
                )
            both = torch.stack([act, act])
            f = sae.encode(both).clone()
            gate = on.repeat_interleave(b // g).to(f.device)
            rows_ = torch.arange(b, device=f.device)[gate]
            idx = feat_rows.repeat_interleave(b // g).to(f.device)[gate]
            val = value_rows.repeat_interleave(b // g).to(f.device, f.dtype)[gate]
            f[1][rows_, :, idx] = val[:, None].expand(-1, f.shape[2])
            out = sae.decode(f)
            return act + (scale * (out[1] - out[0])).to(act.dtype)

        return [(site.name, per_row)]


def _check_features(features: Sequence[int], d_sae: int) -> Sequence[int]:
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int | Tensor) or not 0 <= int(f) < d_sae:
            raise ValueError(f"feature must be an int in [0, {d_sae}), got {f!r}")
    return features


@contextmanager
def clamp_feature(
    model: Any,
    sae: SAE,
    feature: int,
    value: float | Tensor,
) -> Iterator[Any]:
    """Set SAE feature `feature` to `value` at the SAE's site, keeping the error term.

    At every position: f = encode(x), f' = f with f'[feature] = value, and
    x' = x + decode(f') − decode(f), so the SAE's reconstruction error (and every other
    feature) stays as it was. `value` is a number or a tensor broadcastable to
    [batch, pos]. The hook is removed on exit, also when the body raises.
    (`FeatureClamp` is the same edit as a perturbation, for `generate` and `apply`.)

    Examples:
        >>> with clamp_feature(model, sae, 12, 10.0):
        ...     logits = model(prompts.tokens)
    """
    with apply(model, FeatureClamp(sae, [feature], torch.as_tensor(value)[None]), 0):
        yield model


# ---------------------------------------------------------------------- comparison
@dataclass
class FeatureComparison:
    """A vector and its top SAE features as steering vectors of the same norm, same prompts.

    `objective[0]` is the vector's MELBO objective, `objective[j+1]` that of feature
    `features[j]` (its decoder direction at the vector's norm, added at every position
    like the vector); `delta_cosine[j]`: cos of their target deltas with the vector's.
    """

    features: list[int]
    objective: list[float]
    delta_cosine: list[float]
    radius: float
    target: HookSite

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "objective": list(self.objective),
            "delta_cosine": list(self.delta_cosine),
            "radius": self.radius,
            "target": self.target.name,
        }

    def table(self) -> str:
        lines = [f"{'steering by':>14} {'objective':>11} {'cos(Δ)':>8}"]
        lines.append(f"{'vector':>14} {self.objective[0]:>11.4g} {1.0:>8.3f}")
        for f, obj, c in zip(self.features, self.objective[1:], self.delta_cosine, strict=True):
            lines.append(f"{'feature ' + str(f):>14} {obj:>11.4g} {c:>8.3f}")
        return "\n".join(lines)


def compare_with_features(
    model: Any,
    prompts: PromptSet,
    vectors: SteeringVectors,
    index: int,
    sae: SAE,
    features: Sequence[int],
    *,
    target: HookSite | None = None,
) -> FeatureComparison:
    """MELBO objective and target-delta cosine of a vector and of features at its norm.

    All run through one `Segment` (same prompts, same target positions, vectors added at
    every position); power and q come from the vectors' config (default 2 and 1).

    Examples:
        >>> dec = decompose_onto_sae(vecs, sae, index=0, method="sparse")  # doctest: +SKIP
        >>> cmp = compare_with_features(model, ps, vecs, 0, sae, dec.features)  # doctest: +SKIP
        >>> print(cmp.table())                                             # doctest: +SKIP
    """
    tgt = target if target is not None else vectors.target
    if tgt is None:
        raise ValueError("no target recorded on the vectors; pass target=HookSite(...)")
    v = vectors.vectors[index]
    _check_fit(v, vectors.site, sae, False)
    radius = float(v.norm())
    feats = feature_vectors(sae, features, radius=radius)
    seg = Segment(model, vectors.site, tgt, prompts)
    theta = torch.cat([v[None], feats.vectors]).to(seg.unsteered.device, seg.unsteered.dtype)
    with torch.no_grad():
        z = seg.run(theta)
    k = z.shape[0]
    unsteered = seg.unsteered.expand_as(z)
    mask = prompts.target_mask.expand(k, *prompts.target_mask.shape)
    power = float(vectors.config.get("power", 2.0))
    q = float(vectors.config.get("q", 1.0))
    obj = melbo_objective_per_prompt(z, unsteered, mask, power=power, q=q).sum(-1)
    delta = (z - unsteered)[mask].view(k, -1, z.shape[-1]).reshape(k, -1).double()
    cos = torch.nn.functional.normalize(delta, dim=-1)
    return FeatureComparison(
        features=list(feats.config["features"]),
        objective=[float(x) for x in obj],
        delta_cosine=[float(c) for c in (cos[1:] @ cos[0])],
        radius=radius,
        target=tgt,
    )
