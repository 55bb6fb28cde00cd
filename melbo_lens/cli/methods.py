"""`melbo-lens train --method ...` for the methods other than MELBO vectors.

Adapters train like vectors (with a checkpoint and --resume); supervised vectors
(mean-diff, pca, probe) come from contrast pairs; the baselines (random, jacobian,
hessian) need no training loop. Every method writes OUT/<artifact>.safetensors.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from melbo_lens.cli.options import (
    SUPERVISED,
    CliError,
    lr_option,
    print_vectors,
    prompt_set,
    read_list,
    read_prompts,
    site_or_auto,
    sites_option,
    train_checkpointed,
    training_prompts,
)
from melbo_lens.cli.output import claimed_output
from melbo_lens.models.zoo import load_model

__all__ = ["train_adapters", "train_other"]


def train_adapters(args: argparse.Namespace) -> int:
    """MELBO steering adapters on the source block's MLP (rank --rank, norm --radius)."""

    source = site_or_auto(args.source, "mlp_out")
    if source is not None and source.point != "mlp_out":
        raise CliError(
            f"adapters perturb a block's MLP: give --source as a layer or "
            f"blocks.L.hook_mlp_out, got {source.name}"
        )
    if args.radius == "auto":
        raise CliError(
            "--radius auto is for MELBO vectors; give adapters a number (e.g. --radius 4)"
        )
    if getattr(args, "on_manifold", None) is not None:
        raise CliError("--on-manifold constrains steering vectors; drop it for --method adapters")
    orthogonal = args.orthogonal or "none"
    if orthogonal not in ("none", "sequential"):
        raise CliError(f"adapters support --orthogonal none|sequential, got {orthogonal}")
    with claimed_output(args, "adapters.safetensors") as (path, resume):
        return _train_adapters(args, source, orthogonal, path, resume)


def _train_adapters(args: argparse.Namespace, source, orthogonal, path: Path, resume) -> int:
    from melbo_lens.methods.adapters import AdapterConfig, train_steering_adapters

    model = load_model(args.model, bridge=args.bridge)
    ps = training_prompts(model, read_prompts(args), args)
    auto_source, target = sites_option(args, model)
    config = AdapterConfig(
        (source or auto_source).layer,
        target,
        n_adapters=args.n_vectors,
        rank=args.rank,
        radius=4.0 if args.radius is None else args.radius,
        power=args.power,
        q=args.q,
        steps=args.steps,
        lr=lr_option(args.lr),
        orthogonal=orthogonal,
        seed=args.seed,
        objective=args.objective,
        consistency_weight=args.consistency_weight,
        normalization=args.normalization,
        position_quantile=args.position_quantile,
    )
    adapters, seconds = train_checkpointed(
        train_steering_adapters, model, ps, config, args, path, resume
    )
    print_vectors(adapters)
    state = "complete" if adapters.complete else "INTERRUPTED (resume with --resume)"
    print(f"\n{len(adapters)} adapters ({state}) in {seconds:.1f} s -> {path}")
    return 0 if adapters.complete else 130


def train_soft_prompt(args: argparse.Namespace) -> int:
    """Soft prompts: --n-tokens learned input embeddings at the start of each user turn."""
    if args.source not in (None, "auto"):
        raise CliError(
            "soft prompts enter at the input embeddings; drop --source for --method soft-prompt"
        )
    if getattr(args, "on_manifold", None) is not None:
        raise CliError("--on-manifold constrains steering vectors; drop it for soft prompts")
    with claimed_output(args, "soft_prompts.safetensors") as (path, resume):
        return _train_soft_prompt(args, path, resume)


def _train_soft_prompt(args: argparse.Namespace, path: Path, resume) -> int:
    from melbo_lens.methods.soft_prompts import (
        SoftPromptConfig,
        soft_prompt_set,
        train_soft_prompts,
    )
    from melbo_lens.methods.training.objective import reads_logits

    model = load_model(args.model, bridge=args.bridge)
    texts = read_prompts(args)
    continuations = args.continuation
    if reads_logits(args.objective) and not continuations:
        raise CliError(
            f"--objective {args.objective} scores an answer: give it with --continuation TEXT"
        )
    if continuations and not reads_logits(args.objective):
        raise CliError("--continuation is for --objective logprob / neg-logprob; drop it")
    answers = None
    if continuations:
        answers = continuations[0] if len(continuations) == 1 else continuations
    try:
        ps = soft_prompt_set(
            model, texts, args.n_tokens, continuations=answers, chat=not args.no_chat
        )
    except ValueError as err:
        raise CliError(f"--prompt / --continuation: {err}") from None
    target = site_or_auto(args.target, "resid_post")
    config = SoftPromptConfig(
        target=target,
        n_prompts=args.n_vectors,
        n_tokens=args.n_tokens,
        radius="auto" if args.radius in (None, "auto") else args.radius,
        power=args.power,
        q=args.q,
        steps=40 if args.steps == "auto" else args.steps,
        lr=lr_option(args.lr),
        orthogonal=args.orthogonal or "none",
        solver="power" if args.solver == "auto" else args.solver,
        seed=args.seed,
        objective=args.objective,
        consistency_weight=args.consistency_weight,
    )
    prompts, seconds = train_checkpointed(train_soft_prompts, model, ps, config, args, path, resume)
    print_vectors(prompts)
    print("\nnearest tokens (cosine) of each soft token:")
    for k, member in enumerate(prompts.nearest_tokens(model, k=3)):
        shown = " | ".join(", ".join(f"{t!r} {c:.2f}" for t, c in row) for row in member)
        print(f"{k:>6}  {shown}")
    state = "complete" if prompts.complete else "INTERRUPTED (resume with --resume)"
    print(f"\n{len(prompts)} soft prompts ({state}) in {seconds:.1f} s -> {path}")
    return 0 if prompts.complete else 130


def _position(value: str):
    return value if value in ("last", "mean", "answer") else int(value)


def _answer_tokens(value: str | None):
    if value is None:
        return None
    return [int(t) if t.strip().lstrip("-").isdigit() else t for t in value.split(",")]


def _point(spec: str):
    """`FILE.safetensors:INDEX` -> that vector (for hessian --at)."""
    from melbo_lens.perturbations.vectors import SteeringVectors

    file, _, index = spec.rpartition(":") if ":" in spec else (spec, "", "0")
    return SteeringVectors.load(file).vectors[int(index or 0)]


def train_other(args: argparse.Namespace) -> int:
    """--method mean-diff|pca|probe|random|jacobian|hessian: no training loop."""
    if args.resume:
        raise CliError(
            f"--resume applies to melbo and adapters; --method {args.method} has no "
            "training loop to continue"
        )
    with claimed_output(args, "vectors.safetensors") as (path, _):
        return _train_other(args, path)


def _train_other(args: argparse.Namespace, path: Path) -> int:
    from melbo_lens.methods import baselines, supervised

    model = load_model(args.model, bridge=args.bridge)
    if args.method in SUPERVISED and not (args.positive_file and args.negative_file):
        raise CliError(
            f"--method {args.method} needs --positive-file and --negative-file "
            "(.txt one prompt per line, or a .json list), paired line by line"
        )
    if args.radius == "auto" and args.method not in SUPERVISED:
        raise CliError(
            f"--radius auto is for MELBO vectors; give --method {args.method} a number (default 4)"
        )
    source, target = sites_option(args, model)
    chat = not args.no_chat
    start = time.perf_counter()
    curve = None
    if args.method in SUPERVISED:
        pos = prompt_set(
            model, read_list(args.positive_file, "--positive-file"), chat, args.target_positions
        )
        neg = prompt_set(
            model, read_list(args.negative_file, "--negative-file"), chat, args.target_positions
        )
        common: dict[str, Any] = dict(
            position=_position(args.position),
            answer_tokens=_answer_tokens(args.answer_tokens),
            radius=None if args.radius == "auto" else args.radius,
        )
        if args.method == "mean-diff":
            vectors = supervised.mean_difference_vectors(model, pos, neg, source, **common)
        elif args.method == "pca":
            vectors = supervised.pca_vectors(
                model,
                pos,
                neg,
                source,
                n_components=args.n_vectors,
                center=args.center,
                **common,
            )
        else:
            vectors = supervised.probe_vectors(model, pos, neg, source, l2=args.l2, **common)
        if args.stability:
            common.pop("radius")
            curve = supervised.stability_curve(
                model,
                pos,
                neg,
                source,
                method=SUPERVISED[args.method],
                seed=args.seed,
                **common,
            )
    else:
        radius = 4.0 if args.radius is None else float(args.radius)
        if args.method == "random":
            vectors = baselines.random_vectors(
                model,
                source,
                n=args.n_vectors,
                radius=radius,
                orthogonal=args.orthogonal != "none",
                seed=args.seed,
            )
        else:
            ps = prompt_set(model, read_prompts(args), chat, args.target_positions)
            common = dict(
                k=args.n_vectors,
                radius=radius,
                iterations=args.iterations,
                tol=args.tol,
                seed=args.seed,
            )
            if args.method == "jacobian":
                vectors = baselines.jacobian_vectors(model, ps, source, target, **common)
            else:
                at = None if args.at is None else _point(args.at)
                vectors = baselines.hessian_vectors(
                    model, ps, source, target, power=args.power, q=args.q, at=at, **common
                )
    vectors.metadata["load_name"] = args.model
    vectors.save(path)
    seconds = time.perf_counter() - start
    spectrum = vectors.metadata.get("singular_values") or vectors.metadata.get("eigenvalues")
    print(f"{'vector':>6}  {'norm':>9}  {'objective':>12}  {'spectrum':>12}")
    for k in range(len(vectors)):
        obj = float(vectors.objective[k]) if vectors.objective is not None else float("nan")
        spec = spectrum[k] if spectrum else float("nan")
        print(f"{k:>6}  {float(vectors.radius[k]):>9.4g}  {obj:>12.5g}  {spec:>12.5g}")
    if curve is not None:
        print("\npairs  cosine to all-pairs vector")
        for n, c in curve:
            print(f"{n:>5}  {c:.4f}")
    print(f"\n{len(vectors)} {vectors.method} vectors in {seconds:.1f} s -> {path}")
    return 0
