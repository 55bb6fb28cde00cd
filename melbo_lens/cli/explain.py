"""`melbo-lens explain`: tables that explain saved vectors through an SAE.

For each chosen vector: its decomposition onto the SAE's decoder directions (cosine or
sparse coding), and, given a model and prompts, how the SAE's features change under the
vector and how the vector compares with its top features at equal norm. Everything is
written as JSON, and the decompositions also as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from melbo_lens.cli.options import _prompt_set, _read_prompts, add_prompt_args
from melbo_lens.core.io import atomic_write_text
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vectors", help="a SteeringVectors .safetensors file")
    p.add_argument("--sae", required=True, help="SAE directory, packaged name or release")
    p.add_argument("--sae-id", help="SAE id within a sae-lens release (needs a network)")
    p.add_argument("--index", help="comma-separated vector indices (default: all)")
    p.add_argument(
        "--method",
        default="sparse",
        choices=["sparse", "cosine"],
        help="sparse: a few features that add up to the vector; cosine: nearest decoder rows",
    )
    p.add_argument("--top-k", type=int, default=20, help="features listed per vector")
    p.add_argument(
        "--allow-site-mismatch",
        action="store_true",
        help="use an SAE trained at another hook than the vectors'",
    )
    p.add_argument("--model", help="with prompts: feature effects and feature comparison")
    add_prompt_args(p)
    p.add_argument(
        "--attribution",
        choices=["exact", "attribution_patching", "integrated_gradients"],
        help="with --model: attribute the target delta to heads, MLPs and the SAE's features",
    )
    p.add_argument("--out", default="explain_out", help="output directory")


def run(args: argparse.Namespace) -> int:
    from melbo_lens.analysis.sae import (
        compare_with_features,
        decompose_onto_sae,
        feature_effects,
        load_sae,
    )

    vectors = SteeringVectors.load(args.vectors)
    sae = load_sae(args.sae, sae_id=args.sae_id)
    indices = [int(i) for i in args.index.split(",")] if args.index else list(range(len(vectors)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decompositions = {
        k: decompose_onto_sae(
            vectors,
            sae,
            index=k,
            top_k=args.top_k,
            method=args.method,
            allow_site_mismatch=args.allow_site_mismatch,
        )
        for k in indices
    }
    _write_json(out / "decomposition.json", {k: d.to_dict() for k, d in decompositions.items()})
    with open(out / "decomposition.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["vector", "rank", "feature", "coefficient"])
        for k, d in decompositions.items():
            for rank, (feat, coef) in enumerate(zip(d.features, d.coefficients, strict=True)):
                writer.writerow([k, rank, feat, coef])
    for k, d in decompositions.items():
        print(f"--- vector {k}\n{d.table(limit=10)}\n")
    if args.model:
        from melbo_lens.models.zoo import load_model

        model = load_model(args.model)
        prompts = _prompt_set(model, _read_prompts(args), not args.no_chat, args.target_positions)
        effects, comparisons = {}, {}
        for k, d in decompositions.items():
            effects[k] = feature_effects(model, sae, vectors, k, prompts).to_dict()
            comparison = compare_with_features(model, prompts, vectors, k, sae, d.features[:5])
            comparisons[k] = comparison.to_dict()
            print(f"--- vector {k} vs its top features at equal norm\n{comparison.table()}\n")
        _write_json(out / "feature_effects.json", effects)
        _write_json(out / "feature_comparison.json", comparisons)
        if args.attribution:
            _attribution(args, model, prompts, vectors, sae, indices, out)
    print(f"tables -> {out}")
    return 0


def _attribution(args, model, prompts, vectors, sae, indices, out: Path) -> None:
    from melbo_lens.analysis.attribution import attribute_target_delta
    from melbo_lens.analysis.sae import sae_site

    results = {}
    with open(out / "attribution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["vector", "node", "kind", "estimate", "actual"])
        for k in indices:
            res = attribute_target_delta(
                model, prompts, vectors, k, method=args.attribution, saes={sae_site(sae): sae}
            )
            results[k] = res.to_dict()
            for node in results[k]["nodes"]:
                writer.writerow(
                    [
                        k,
                        node.get("name"),
                        node.get("kind"),
                        node.get("estimate"),
                        node.get("actual"),
                    ]
                )
            print(f"--- vector {k}: attribution ({args.attribution})\n{res.table()}\n")
    _write_json(out / "attribution.json", results)


def _write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
