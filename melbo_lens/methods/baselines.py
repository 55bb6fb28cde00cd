"""Baseline steering vectors: what MELBO's vectors should be compared against.

A baseline is a set of directions at the source site chosen without training, each
returned as a `SteeringVectors` so every downstream tool accepts it:

  * `random_vectors` - Gaussian directions at radius R (orthonormalised if asked). With
    the same seed they are the draws MELBO starts from.
  * `jacobian_vectors` - the top-k right singular vectors of the Jacobian J of the map
    θ -> target activations (at the target positions, flattened over prompts, positions
    and d_model) at θ = 0: the directions a *small* push moves the target most. For
    p = 2, q = 1 the MELBO objective is ||Jθ||² + O(||θ||³), so these are MELBO's optima
    in the limit R -> 0, and what MELBO finds beyond them is the nonlinearity.
  * `hessian_vectors` - the top eigenvectors of the Hessian of the MELBO objective at
    θ = 0 (which for p = 2, q = 1 is 2·JᵀJ: the same vectors, eigenvalues 2σ²), or at
    any point `at`, for any p and q.

Nothing here builds J or the Hessian. Both are reached through Hessian-vector products
of the objective (double backward): K probe directions ride on the batch axis of a
`Segment` as K independent rows θ_k, g = ∇_θ Σ_k f(θ_k) is taken with `create_graph`,
and ∇_θ (g·V) gives H v_k in row k. JᵀJ v is half the Hessian of the p = 2 objective
at 0; there the objective compares Z(θ) with Z(0) from the same pass, detached, so the
second-order term Σ (Z(θ) − Z(0))·∇²Z vanishes exactly. Block Lanczos with full
reorthogonalisation (block Krylov subspace, Rayleigh-Ritz on all of it) then finds the
top eigenpairs from a few batches of products, stopping when every wanted Ritz pair has
a residual ||Hx − λx|| below `tol`·|λ_max|.

Why one module over ~400 lines: random, Jacobian and Hessian baselines share the
segment's Jacobian-vector products and the same artifact construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.checks import is_positive
from melbo_lens.core.host import Host, d_model_of, frozen
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, as_site, check_sites, require_hook
from melbo_lens.methods.adapters import init_adapters
from melbo_lens.methods.constraints import gram_schmidt, to_sphere
from melbo_lens.methods.melbo import init_vectors
from melbo_lens.methods.objectives import melbo_objective_per_prompt, segment_objectives
from melbo_lens.perturbations.adapters import SteeringAdapters, check_adapter_host
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = [
    "random_adapters",
    "random_vectors",
    "jacobian_vectors",
    "hessian_vectors",
    "top_eigenpairs",
]

MatVec = Callable[[Float[Tensor, "b d"]], Float[Tensor, "b d"]]


def check_radius(radius: Any) -> None:
    """A baseline's R: a finite number > 0 ("auto" is MELBO's radius search, which needs a
    training run, so a baseline takes the number it chose)."""
    if radius == "auto":
        raise ValueError(
            "radius='auto' is chosen by MELBO's radius search during training; a baseline "
            "needs a number: pass the trained vectors' R (vectors.radius[0]) to compare at "
            "the same norm"
        )
    if not is_positive(radius):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")


# ---------------------------------------------------------------------- random
def random_vectors(
    model: Host,
    site: HookSite | str | int,
    *,
    n: int,
    radius: float,
    orthogonal: bool = True,
    seed: int = 0,
) -> SteeringVectors:
    """n Gaussian directions at `site` with norm `radius` (orthonormalised if asked).

    Vector k is drawn from its own generator (seed, k) exactly as MELBO draws its
    initial vector k, so with equal seeds this baseline *is* MELBO's starting point
    (`orthogonal=False`), or its Gram–Schmidt orthonormalisation in index order.

    Args:
        model: the model whose width the vectors take.
        site: where they are added (a `HookSite`, a hook name or a layer).
        n: how many vectors.
        radius: the norm of each.
        orthogonal: orthonormalise them (Gram–Schmidt in index order) before scaling.
        seed: vector k comes from the generator (seed, k).

    Returns:
        `SteeringVectors` with `method="random"`.

    Raises:
        ValueError: n < 1, a radius that is not a positive number, or more orthogonal
            vectors than d_model.

    Examples:
        >>> sv = random_vectors(model, HookSite(2), n=8, radius=4.0)
        >>> [round(float(r), 4) for r in sv.radius] == [4.0] * 8
        True
    """
    site = require_hook(model, as_site(site))
    d_model = d_model_of(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    check_radius(radius)
    if orthogonal and n > d_model:
        raise ValueError(
            f"cannot draw {n} mutually orthogonal vectors in d_model={d_model}; "
            "ask for at most d_model vectors or pass orthogonal=False"
        )
    draws = init_vectors(list(range(n)), d_model, seed, "cpu", torch.float64)
    if orthogonal:
        draws = gram_schmidt(draws)
    vectors = to_sphere(draws, radius).float()
    return SteeringVectors(
        vectors=vectors,
        site=site,
        method="random",
        config={
            "site": site.to_dict(),
            "n": n,
            "radius": radius,
            "orthogonal": orthogonal,
            "seed": seed,
        },
        model_name=getattr(model.cfg, "model_name", None),
        metadata={"distribution": "gaussian, one generator per (seed, index) as MELBO init"},
    )


# ---------------------------------------------------------------------- eigensolver


def random_adapters(
    model: Host,
    layer: int,
    *,
    n: int,
    radius: float,
    rank: int = 1,
    seed: int = 0,
) -> SteeringAdapters:
    """n steering adapters on block `layer`'s MLP with Gaussian unit columns, scale
    `radius`: the random baseline for trained adapters, drawn exactly as the adapter
    trainer draws its initial adapter k (so with equal seeds this *is* its start).

    Args:
        model: the model whose MLP the adapters edit.
        layer: the block.
        n: how many adapters.
        radius: R, the edit's scale.
        rank: the rank of each edit.
        seed: adapter k is drawn from the generator (seed, k).

    Returns:
        `SteeringAdapters` with `method="random_adapters"`.

    Raises:
        ValueError: a block without an MLP to edit, n < 1 or a bad radius.

    Examples:
        >>> ra = random_adapters(model, 1, n=3, radius=4.0, rank=2)
        >>> len(ra), ra.rank, round(float(ra.omega_b.norm(dim=1).mean()), 4)
        (3, 2, 1.0)
    """
    check_adapter_host(model, layer)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    check_radius(radius)
    d_mlp, d_model = int(model.cfg.d_mlp), d_model_of(model)
    a, b = init_adapters(list(range(n)), d_mlp, d_model, rank, seed, "cpu", torch.float64)
    unit = torch.nn.functional.normalize
    return SteeringAdapters(
        unit(a, dim=1).float(),
        unit(b, dim=1).float(),
        layer=layer,
        radius=radius,
        method="random_adapters",
        config={"layer": layer, "n": n, "radius": radius, "rank": rank, "seed": seed},
        model_name=getattr(model.cfg, "model_name", None),
        metadata={"distribution": "gaussian unit columns, one generator per (seed, index)"},
    )


def _orthonormal_block(w: Tensor, basis: Tensor, gen: torch.Generator, max_cols: int) -> Tensor:
    """Orthonormal columns spanning w's part outside span(basis); random fill-ins where
    w has none (the Krylov space became invariant). At most `max_cols` columns."""
    d = w.shape[0]
    w = w[:, :max_cols]
    for _ in range(3):
        ref = w.norm(dim=0).clamp_min(1e-300)
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - basis @ (basis.T @ w)
        q, r = torch.linalg.qr(w)
        lost = r.diagonal().abs() <= 1e-10 * ref
        if not bool(lost.any()):
            q = q - basis @ (basis.T @ q)
            return torch.linalg.qr(q)[0]
        w = w.clone()
        w[:, lost] = torch.randn(d, int(lost.sum()), generator=gen, dtype=w.dtype).to(w.device)
    raise RuntimeError("could not extend the Krylov basis; is the operator finite?")


def top_eigenpairs(
    matvec: MatVec,
    d: int,
    k: int,
    *,
    block_size: int | None = None,
    iterations: int = 40,
    tol: float = 1e-5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Float[Tensor, " k"], Float[Tensor, "k d"], dict[str, Any]]:
    """Largest-k eigenpairs of a symmetric operator known only through `matvec`.

    Block Lanczos with full reorthogonalisation: the basis grows by one block of
    `block_size` (default k) orthonormal directions per iteration, each the operator
    applied to the previous block, made orthogonal to everything before; the eigenpairs
    are the Rayleigh-Ritz pairs of the whole basis (exact once it spans R^d). `matvec`
    takes and returns [b, d] rows (one product per row), in float64. Stops when the k
    wanted Ritz residuals are at most `tol`·|largest eigenvalue|, or after `iterations`
    blocks. Eigenvalues descending; vectors as rows.

    Examples:
        >>> A = torch.diag(torch.arange(10.0, dtype=torch.float64))
        >>> vals, vecs, info = top_eigenpairs(lambda v: v @ A, 10, 2)
        >>> [round(x, 6) for x in vals.tolist()], info["converged"]
        ([9.0, 8.0], True)
    """
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, d={d}], got {k}")
    block = k if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    basis = torch.zeros(d, 0, dtype=f64, device=device)
    images = torch.zeros(d, 0, dtype=f64, device=device)
    start = torch.randn(d, block, generator=gen, dtype=f64).to(device)
    new = _orthonormal_block(start, basis, gen, min(block, d))
    vals = vecs = res = torch.empty(0)
    converged = False
    done = 0
    for _ in range(iterations):
        done += 1
        image = matvec(new.T).T.to(f64)
        if not bool(torch.isfinite(image).all()):
            raise ValueError("the operator returned NaN/inf; check the model and prompts")
        basis = torch.cat([basis, new], dim=1)
        images = torch.cat([images, image], dim=1)
        m = basis.shape[1]
        if m >= k:
            t = basis.T @ images
            t = (t + t.T) / 2
            evals, s = torch.linalg.eigh(t)
            evals, s = evals.flip(0)[:k], s.flip(1)[:, :k]
            x, ax = basis @ s, images @ s
            res = (ax - x * evals).norm(dim=0)
            scale = float(evals.abs().max()) if evals.numel() else 0.0
            vals, vecs = evals, x.T
            # Exact once the basis spans everything (up to the products' own rounding).
            if m >= d or bool((res <= tol * max(scale, 1e-300)).all()):
                converged = True
                break
        if m >= d:
            break
        new = _orthonormal_block(image, basis, gen, min(block, d - m))
    if vals.numel() < k:
        raise ValueError(
            f"{iterations} iterations of block size {block} span {basis.shape[1]} < k={k} "
            "directions; raise iterations or block_size"
        )
    info = {
        "iterations": done,
        "matvecs": int(basis.shape[1]),
        "krylov_dim": int(basis.shape[1]),
        "converged": converged,
        "residuals": res.tolist(),
        "tol": tol,
    }
    return vals, vecs, info


def _fix_signs(vectors: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive (deterministic sign)."""
    idx = vectors.abs().argmax(dim=-1)
    sign = torch.sign(vectors.gather(-1, idx[:, None]))
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


# ---------------------------------------------------------------------- Hessian products
def _hvp(segment: Segment, at: Tensor | None, power: float, q: float) -> MatVec:
    """Rows v -> H v, H the Hessian of Σ_i(Σ_t ||ΔZ||^p)^(1/q) at `at` (None: θ = 0)."""
    mask = segment.prompts.target_mask
    dtype = segment.unsteered.dtype
    d = segment.unsteered.shape[-1]

    def matvec(v: Tensor) -> Tensor:
        b = v.shape[0]
        base = torch.zeros(d, dtype=dtype, device=mask.device) if at is None else at
        theta = base.to(dtype=dtype, device=mask.device).expand(b, d).clone()
        theta.requires_grad_(True)
        with torch.enable_grad():
            z = segment.run(theta)
            # At θ = 0, compare with Z(0) of this same pass: Δ = 0 exactly, so the Hessian
            # is exactly 2·JᵀJ. Elsewhere compare with the cached unsteered run.
            ref = z.detach() if at is None else segment.unsteered.expand_as(z)
            obj = melbo_objective_per_prompt(
                z, ref, mask.expand(z.shape[:-1]), power=power, q=q
            ).sum()
            (g,) = torch.autograd.grad(obj, theta, create_graph=True)
            (hv,) = torch.autograd.grad((g * v.to(dtype)).sum(), theta)
        if not bool(torch.isfinite(hv).all()):
            where = "θ = 0" if at is None else "the point `at`"
            raise ValueError(
                f"a Hessian-vector product at {where} is NaN/inf (power={power}, q={q}); "
                "with power < 2 every target position must move there (||ΔZ|| > 0), and "
                "the model must not overflow in its dtype"
            )
        return hv.to(torch.float64)

    return matvec


def _check_common(model: Host, prompts: PromptSet, k: int, radius: float) -> int:
    if not isinstance(prompts, PromptSet):
        raise TypeError(
            f"prompts must be a PromptSet, got {type(prompts).__name__}; "
            "build one with PromptSet.from_texts(model, texts)"
        )
    d_model = d_model_of(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_model:
        raise ValueError(f"k must be an int in [1, d_model={d_model}], got {k!r}")
    check_radius(radius)
    return d_model


def _spectral_vectors(
    method: str,
    model: Host,
    prompts: PromptSet,
    source: HookSite,
    target: HookSite,
    *,
    k: int,
    radius: float,
    power: float,
    q: float,
    at: Tensor | None,
    scale: float,
    block_size: int | None,
    iterations: int,
    tol: float,
    seed: int,
    config: dict[str, Any],
) -> tuple[SteeringVectors, Tensor]:
    start = time.perf_counter()
    d_model = _check_common(model, prompts, k, radius)
    with frozen(model), torch.inference_mode(False):
        segment = Segment(model, source, target, prompts)
        hvp = _hvp(segment, at, power, q)

        def matvec(v: Tensor) -> Tensor:
            return hvp(v) * scale

        vals, vecs, info = top_eigenpairs(
            matvec,
            d_model,
            k,
            block_size=block_size,
            iterations=iterations,
            tol=tol,
            seed=seed,
            device=prompts.tokens.device,
        )
        vectors = radius * _fix_signs(vecs)
        objective = segment_objectives(segment, vectors, power=power, q=q, chunk=len(vectors))
    meta = {
        **info,
        "seconds": time.perf_counter() - start,
        "host": type(model).__name__,
        "segment_blocks": segment.n_blocks,
        "layer_slicing": segment.layer_slicing,
        "objective_power": power,
        "objective_q": q,
    }
    sv = SteeringVectors(
        vectors=vectors.float().cpu(),
        site=source,
        target=target,
        method=method,
        config={
            "source": source.to_dict(),
            "target": target.to_dict(),
            "k": k,
            "radius": radius,
            "block_size": block_size or k,
            "iterations": iterations,
            "tol": tol,
            "seed": seed,
            **config,
        },
        model_name=getattr(model.cfg, "model_name", None),
        prompts=prompts.to_dict(),
        objective=objective.float().cpu(),
        metadata=meta,
    )
    return sv, vals


def _sites(model: Host, source: Any, target: Any) -> tuple[HookSite, HookSite]:
    source, target = as_site(source), as_site(target)
    check_sites(model, source, target)
    return source, target


def jacobian_vectors(
    model: Host,
    prompts: PromptSet,
    source: HookSite | str | int,
    target: HookSite | str | int,
    *,
    k: int,
    radius: float,
    iterations: int = 40,
    tol: float = 1e-5,
    block_size: int | None = None,
    seed: int = 0,
) -> SteeringVectors:
    """Top-k right singular vectors of the source -> target Jacobian at θ = 0, times R.

    The Jacobian is that of θ -> Z(θ) at the target positions of `prompts`
    (`PromptSet.target_mask`), flattened over prompts, positions and d_model, with θ added
    at every position at `source`. It is never built: JᵀJ is applied through batched
    Hessian-vector products (see the module docstring) and its top eigenpairs found with
    block Lanczos (`top_eigenpairs`). Each batch costs one forward and two backward
    passes through the segment for `block_size` (default k) directions.

    `metadata["singular_values"]` holds σ_1 ≥ ... ≥ σ_k; `objective` holds each vector's
    MELBO objective (p = 2, q = 1) at radius R, comparable with MELBO's own. Signs are
    fixed so each vector's largest-magnitude entry is positive. `converged` and
    `residuals` in `metadata` report the eigensolver's state.

    Args:
        model: the model to differentiate.
        prompts: the prompts and their target positions.
        source: where θ is added.
        target: where the change is read.
        k: how many singular vectors.
        radius: the norm R each vector is scaled to.
        iterations: block Lanczos iterations at most.
        tol: the eigensolver's relative residual tolerance.
        block_size: directions per batch of Hessian-vector products (default k).
        seed: the starting block's seed.

    Returns:
        `SteeringVectors` with `method="jacobian"`, singular values in `metadata`.

    Examples:
        >>> sv = jacobian_vectors(model, prompts, HookSite(1), HookSite(3, "resid_pre"),
        ...                       k=2, radius=4.0)
        >>> len(sv.metadata["singular_values"]), sv.vectors.norm(dim=-1).tolist()
        (2, [4.0, 4.0])
    """
    source, target = _sites(model, source, target)
    sv, vals = _spectral_vectors(
        "jacobian",
        model,
        prompts,
        source,
        target,
        k=k,
        radius=radius,
        power=2.0,
        q=1.0,
        at=None,
        scale=0.5,  # the p = 2 Hessian at 0 is 2·JᵀJ
        block_size=block_size,
        iterations=iterations,
        tol=tol,
        seed=seed,
        config={},
    )
    sv.metadata["singular_values"] = vals.clamp_min(0).sqrt().tolist()
    sv.metadata["eigenvalues_JtJ"] = vals.tolist()
    return sv


def hessian_vectors(
    model: Host,
    prompts: PromptSet,
    source: HookSite | str | int,
    target: HookSite | str | int,
    *,
    k: int,
    radius: float,
    power: float = 2.0,
    q: float = 1.0,
    at: Float[Tensor, " d_model"] | None = None,
    iterations: int = 40,
    tol: float = 1e-5,
    block_size: int | None = None,
    seed: int = 0,
) -> SteeringVectors:
    """Top-k eigenvectors of the Hessian of the MELBO objective (largest eigenvalues), times R.

    At θ = 0 (`at=None`) the objective Σ_i(Σ_t ||J_t θ||^p)^(1/q) + ... is, to leading
    order, homogeneous of degree p/q, so its Hessian there is the quadratic form 2·JᵀJ
    only for p = 2, q = 1; for p/q > 2 it is zero, for p/q < 2 it does not exist, and
    otherwise it is not a quadratic form. So `at=None` requires p = 2, q = 1 (and then
    gives `jacobian_vectors`' directions, eigenvalues 2σ²). For other exponents pass
    `at`, a point [d_model] where the objective is smooth (every target position moved,
    e.g. a MELBO vector, or a small multiple of a Jacobian vector): the Hessian there
    is well defined for any p, q, may be indefinite, and its largest eigenvalues are
    taken. `metadata["eigenvalues"]` holds them; `objective` the objective of each
    returned vector at radius R with the given p, q.

    Args:
        model: the model to differentiate.
        prompts: the prompts and their target positions.
        source: where θ is added.
        target: where the change is read.
        k: how many eigenvectors.
        radius: the norm R each vector is scaled to.
        power: p of the objective.
        q: q of the objective.
        at: the point [d_model] the Hessian is taken at (None: θ = 0, needs p=2, q=1).
        iterations: block Lanczos iterations at most.
        tol: the eigensolver's relative residual tolerance.
        block_size: directions per batch of Hessian-vector products (default k).
        seed: the starting block's seed.

    Returns:
        `SteeringVectors` with `method="hessian"`, eigenvalues in `metadata`.

    Raises:
        ValueError: non-positive exponents, `at=None` with exponents other than p = 2,
            q = 1, or an `at` that is not a finite nonzero [d_model] vector.

    Examples:
        >>> sv = hessian_vectors(model, prompts, 1, "blocks.3.hook_resid_pre", k=2, radius=4.0)
        >>> j = jacobian_vectors(model, prompts, 1, "blocks.3.hook_resid_pre", k=1, radius=1.0)
        >>> len(sv), round(abs(float(sv.vectors[0] @ j.vectors[0])) / 4.0, 3)   # p = 2: they agree
        (2, 1.0)
        >>> sv4 = hessian_vectors(model, prompts, 1, "blocks.3.hook_resid_pre", k=2,
        ...                       radius=4.0, power=4.0, at=0.1 * j.vectors[0])
        >>> len(sv4)
        2
    """
    source, target = _sites(model, source, target)
    if not (power > 0 and q > 0):
        raise ValueError(f"power and q must be > 0, got {power=} {q=}")
    if at is None and (float(power) != 2.0 or float(q) != 1.0):
        raise ValueError(
            f"the Hessian of the objective at θ = 0 is a quadratic form only for power=2, "
            f"q=1 (got {power=}, {q=}): near 0 the objective grows like ||θ||^(p/q), so "
            "its Hessian there is zero for p/q > 2 and undefined for p/q < 2. Pass at=, a "
            "nonzero point [d_model] (e.g. a MELBO vector, or 0.1 * a jacobian_vectors "
            "vector), to take the Hessian there"
        )
    if at is not None:
        d_model = d_model_of(model)
        if at.shape != (d_model,):
            raise ValueError(f"at must be a [d_model={d_model}] vector, got {tuple(at.shape)}")
        if not bool(torch.isfinite(at).all()) or float(at.norm()) == 0.0:
            raise ValueError(
                "at must be finite and nonzero; use at=None for θ = 0 (power=2, q=1 only)"
            )
    sv, vals = _spectral_vectors(
        "hessian",
        model,
        prompts,
        source,
        target,
        k=k,
        radius=radius,
        power=float(power),
        q=float(q),
        at=None if at is None else at.detach(),
        scale=1.0,
        block_size=block_size,
        iterations=iterations,
        tol=tol,
        seed=seed,
        config={
            "power": float(power),
            "q": float(q),
            "at": None if at is None else at.detach().double().cpu().tolist(),
        },
    )
    sv.metadata["eigenvalues"] = vals.tolist()
    return sv
