"""`melbo-lens explain`: what saved vectors mean, through an SAE and a corpus.

For each chosen vector: its decomposition onto the SAE's decoder directions (cosine or
sparse coding); the feature dashboards of the latents it names (top contexts in quantile
bands, activation histogram and density, logit effects, correlated latents) over the
corpus; and its card (where its direction is present, its effect on next-token
predictions, the latents it turns on and off at the target, its completions). With
prompts it also measures how the SAE's features change under the vector and compares it
with its top features at equal norm.

Writes into --out: `decomposition.json/.csv`, `dashboards/` (safetensors + JSON),
`cards.json`, `explain.html` (offline), and with prompts `feature_effects.json`,
`feature_comparison.json` (and `attribution.*`). `explain.json`, written last, lists
what one run wrote; an --out holding an earlier run is refused unless --overwrite,
which first removes every file that run listed, so no stale table stays beside new ones.

    melbo-lens explain demo_out/vectors.safetensors --sae smollm2-135m-instruct-res7
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from melbo_lens.cli.options import (
    CliError,
    add_corpus_arg,
    add_prompt_args,
    prompt_set,
    resolve_corpus,
)
from melbo_lens.cli.output import checked_directory, locked
from melbo_lens.core.io import atomic_write_text
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["add_arguments", "run"]

MANIFEST = "explain.json"


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
    p.add_argument("--model", help="default: the vectors' provenance")
    p.add_argument(
        "--dashboard-tokens", type=int, default=131_072, help="corpus tokens the dashboards read"
    )
    add_corpus_arg(p)
    p.add_argument(
        "--target-sae",
        default="auto",
        help="SAE whose latents the cards list: 'auto' (packaged, at the target), 'none', a path",
    )
    p.add_argument("--no-cards", action="store_true", help="skip the vector cards")
    add_prompt_args(p)
    p.add_argument(
        "--attribution",
        choices=["exact", "attribution_patching", "integrated_gradients"],
        help="with prompts: attribute the target delta to heads, MLPs and the SAE's features",
    )
    p.add_argument("--out", default="explain_out", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier explain run")


def run(args: argparse.Namespace) -> int:
    out = checked_directory(args.out, "--out")
    with locked(out):
        _claim(out, args.overwrite)
        written: list[str] = []
        _explain(args, out, written)
        atomic_write_text(out / MANIFEST, json.dumps({"files": written}, indent=2))
    print(f"tables -> {out} ({', '.join(written)})")
    return 0


def _claim(out: Path, overwrite: bool) -> None:
    """Refuse an --out holding an earlier run unless --overwrite; then clear what it wrote."""
    manifest = out / MANIFEST
    earlier = [p.name for p in out.iterdir()] if out.is_dir() else []
    if not earlier:
        return
    if not overwrite:
        what = "an earlier explain run" if manifest.is_file() else "other files"
        raise CliError(
            f"--out {out} already holds {what} ({', '.join(sorted(earlier)[:5])}); pass "
            "--overwrite to replace it, or choose another --out"
        )
    if manifest.is_file():
        for name in json.loads(manifest.read_text()).get("files", []):
            target = out / Path(name).name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        manifest.unlink()


def _explain(args: argparse.Namespace, out: Path, written: list[str]) -> None:
    from melbo_lens.analysis.sae import decompose_onto_sae, load_sae

    vectors = SteeringVectors.load(args.vectors)
    sae = load_sae(args.sae, sae_id=args.sae_id)
    indices = _indices(args.index, len(vectors))
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
    written += ["decomposition.json", "decomposition.csv"]
    for k, d in decompositions.items():
        print(f"--- vector {k}\n{d.table(limit=10)}\n")

    from melbo_lens.models.zoo import load_model

    name = args.model or vectors.metadata.get("load_name") or vectors.model_name
    if not name:
        print("no dashboards or cards: the vectors record no model; pass --model NAME")
        return
    model = load_model(name)
    corpus = resolve_corpus(args, model.tokenizer)  # checks --dashboard-tokens too
    _dashboards_and_cards(args, model, vectors, sae, decompositions, corpus, indices, out, written)
    if args.prompt or args.prompts_file:
        _with_prompts(args, model, vectors, sae, decompositions, indices, out, written)


def _indices(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    try:
        got = [int(i) for i in spec.split(",")]
    except ValueError:
        raise CliError(f"--index takes comma-separated integers, got {spec!r}") from None
    bad = [i for i in got if not 0 <= i < n]
    if bad:
        raise CliError(f"--index {bad} out of range: the file holds {n} vectors (0..{n - 1})")
    return got


def _dashboards_and_cards(args, model, vectors, sae, decompositions, corpus, indices, out, written):
    from melbo_lens.analysis.cards import vector_cards
    from melbo_lens.analysis.sae import load_sae, sae_site
    from melbo_lens.analysis.sae.dashboards import feature_dashboards
    from melbo_lens.views.dashboards import write_dashboards_page

    feats = sorted({f for d in decompositions.values() for f in d.features})
    dashboards = {
        sae_site(sae).name: feature_dashboards(
            model,
            sae,
            corpus,
            latents=feats,
            max_tokens=args.dashboard_tokens,
            allow_model_mismatch=args.allow_site_mismatch,
        )
    }
    cards = []
    if not args.no_cards:
        tsae = None
        if args.target_sae == "auto" and vectors.target is not None:
            from melbo_lens.analysis.sae import packaged_sae_for

            names = [vectors.metadata.get("load_name"), vectors.model_name, model.cfg.model_name]
            key = packaged_sae_for(names, vectors.target)
            tsae = load_sae(key) if key is not None else None
        elif args.target_sae not in ("auto", "none"):
            tsae = load_sae(args.target_sae)
        cards = vector_cards(
            model,
            vectors,
            corpus,
            indices=indices,
            sae=tsae,
            prompts=list(args.prompt or [])[:3] or None,
            chat=False if args.no_chat else None,
            progress=True,
        )
        if tsae is not None:
            tfeats = sorted({f for c in cards for f, _ in c.latents_on + c.latents_off})
            if tfeats:
                dashboards[sae_site(tsae).name] = feature_dashboards(
                    model, tsae, corpus, latents=tfeats, max_tokens=args.dashboard_tokens
                )
        _write_json(out / "cards.json", [c.to_dict() for c in cards])
        written.append("cards.json")
        for c in cards:
            print(c.summary())
    for hook, dash in dashboards.items():
        dash.save(out / "dashboards" / hook)
    written.append("dashboards")
    write_dashboards_page(out / "explain.html", dashboards, cards, title=f"explain {args.vectors}")
    written.append("explain.html")


def _with_prompts(args, model, vectors, sae, decompositions, indices, out, written) -> None:
    from melbo_lens.analysis.sae import compare_with_features, feature_effects
    from melbo_lens.cli.options import read_prompts

    prompts = prompt_set(model, read_prompts(args), not args.no_chat, args.target_positions)
    effects, comparisons = {}, {}
    for k, d in decompositions.items():
        effects[k] = feature_effects(model, sae, vectors, k, prompts).to_dict()
        comparison = compare_with_features(model, prompts, vectors, k, sae, d.features[:5])
        comparisons[k] = comparison.to_dict()
        print(f"--- vector {k} vs its top features at equal norm\n{comparison.table()}\n")
    _write_json(out / "feature_effects.json", effects)
    _write_json(out / "feature_comparison.json", comparisons)
    written += ["feature_effects.json", "feature_comparison.json"]
    if args.attribution:
        _attribution(args, model, prompts, vectors, sae, indices, out)
        written += ["attribution.json", "attribution.csv"]


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
