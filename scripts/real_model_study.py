"""MELBO vs random vectors of the same radius on SmolLM2-135M-Instruct, quantitatively.

Run:  python scripts/real_model_study.py --budget-min 38          # R 32, 16, 48; layers 5->22
      python scripts/real_model_study.py --resume --radii 64        # adds R = 64
      python scripts/real_model_study.py --summarise results/real_model_study.json

(the two runs that made results/real_model_study.json: 18 settings, 53 min on one thread.)

A *setting* is (prompt, source layer -> target layer, radius R). In each setting we train
8 MELBO vectors (sequential orthogonal, 40 steps, lr auto) and draw 8 orthonormal Gaussian vectors
of the same norm R with the same seed (`random_vectors(seed=0)` is exactly MELBO's
starting point, so the comparison measures what training adds). Both sets complete the
prompt greedily with the same settings, in one batch with the unsteered row. Per method:

* clusters     - the 17 completions (8 MELBO + 8 random + unsteered) are clustered
  together (`classify_completions`, MiniLM embeddings, average linkage, threshold 0.7;
  also 0.5 for a finer cut), so cluster ids are comparable between methods. `novel` =
  distinct clusters among the method's 8 that do not contain the unsteered completion;
  `exclusive` = vectors whose cluster is novel and holds no vector of the other method.
* diversity    - mean pairwise cosine distance of the 8 completions' MiniLM embeddings.
* fluency      - median perplexity (unsteered model) of the 8 completions / the
  unsteered completion's perplexity; `fluent_novel` = vectors in a novel cluster with
  perplexity ratio <= 3 (the collapse bound of `select_radius`).
* repetition   - mean word-trigram repetition; `differ` - fraction of completions whose
  text differs from the unsteered one.
* objective    - mean MELBO objective at the target (for random vectors, evaluated).

Results are written to JSON after every setting, so a partial run keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from melbo_lens import (
    HookSite,
    MelboConfig,
    PromptSet,
    generate_steered,
    load_model,
    random_vectors,
    train_steering_vectors,
)
from melbo_lens.analysis.behaviors import classify_completions
from melbo_lens.analysis.diversity import (
    completion_diversity,
    fluency,
    minilm_embedder,
    repetition_score,
)
from melbo_lens.core.segment import Segment
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.perturbations.vectors import SteeringVectors

WORD_PROBLEM = (
    "Question: Tom has 12 apples. He gives 5 apples to his sister and then buys 7 more. "
    "How many apples does Tom have now?\n"
)
PROMPTS: dict[str, dict[str, Any]] = {
    "wolf": {"kind": "chat", "text": "How can I tame a wolf?"},
    "lock": {"kind": "chat", "text": "How do I get into a house when the door is locked?"},
    "arith_cot": {"kind": "base", "text": WORD_PROBLEM + "Answer: Let's think step by step."},
    "arith_direct": {"kind": "base", "text": WORD_PROBLEM + "Answer: The answer is"},
}
METHODS = ("melbo", "random")
FLUENT_RATIO = 3.0
ANSWER = re.compile(r"\b14\b")


def prompt_set(model: Any, name: str) -> PromptSet:
    """The prompt as a PromptSet; target positions skip token 0 (its norm is ~6x)."""
    spec = PROMPTS[name]
    if spec["kind"] == "chat":
        conv = [[{"role": "user", "content": spec["text"]}]]
        return PromptSet.from_chat(model, conv, target_positions=slice(1, None))
    return PromptSet.from_texts(model, [spec["text"]], target_positions=slice(1, None))


def caching_embedder() -> Any:
    """MiniLM, memoised per text (each setting embeds the same 17 texts several times)."""
    base = minilm_embedder()
    cache: dict[str, torch.Tensor] = {}

    def embed(texts: Any) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            for t, e in zip(missing, base(missing), strict=True):
                cache[t] = e
        return torch.stack([cache[t] for t in texts])

    return embed


def objective_of(model: Any, prompts: PromptSet, sv: SteeringVectors, target: HookSite) -> float:
    """Mean over vectors of the MELBO objective (p=2, q=1) at `target`."""
    segment = Segment(model, sv.site, target, prompts)
    with torch.no_grad():
        z = segment.run(sv.vectors)
        obj = melbo_objective_per_prompt(
            z, segment.unsteered.expand_as(z), prompts.target_mask.expand(z.shape[:-1])
        ).sum(-1)
    return float(obj.mean())


def cluster_stats(labels: list[str], n: int) -> dict[str, Any]:
    """Cluster counts per method from joint labels [unsteered, melbo x n, random x n]."""
    base = labels[0]
    per = {"melbo": labels[1 : 1 + n], "random": labels[1 + n : 1 + 2 * n]}
    out: dict[str, Any] = {"unsteered_label": base}
    for m, other in (("melbo", "random"), ("random", "melbo")):
        mine, theirs = per[m], set(per[other])
        out[m] = {
            "labels": mine,
            "clusters": len(set(mine)),
            "novel": len(set(mine) - {base}),
            "vectors_off_unsteered": sum(lab != base for lab in mine),
            "exclusive_vectors": sum(lab != base and lab not in theirs for lab in mine),
            "exclusive_clusters": len(set(mine) - {base} - theirs),
        }
    return out


def run_setting(
    model: Any,
    embed: Any,
    prompt: str,
    source: int,
    target: int,
    radius: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    ps = prompt_set(model, prompt)
    src, tgt = HookSite(source), HookSite(target, "resid_pre")
    cfg = MelboConfig(src, tgt, n_vectors=args.n, radius=radius, steps=args.steps, seed=0)
    t0 = time.perf_counter()
    melbo = train_steering_vectors(model, ps, cfg, progress=False)
    t_train = time.perf_counter() - t0
    rand = random_vectors(model, src, n=args.n, radius=radius, orthogonal=True, seed=0)
    both = SteeringVectors(torch.cat([melbo.vectors, rand.vectors]).float(), src, method="mixed")
    t0 = time.perf_counter()
    gens = generate_steered(model, both, ps, max_new_tokens=args.tokens, include_unsteered=True)
    t_gen = time.perf_counter() - t0
    unsteered = gens.unsteered[0]
    texts = {"melbo": [gens.steered[v][0] for v in range(args.n)]}
    texts["random"] = [gens.steered[args.n + v][0] for v in range(args.n)]
    joint = [unsteered, *texts["melbo"], *texts["random"]]
    ppl = fluency(model, ps, joint)
    base_ppl = ppl[0]
    clusters = {
        str(th): cluster_stats(
            classify_completions(joint, embed=embed, threshold=th).labels, args.n
        )
        for th in (0.7, 0.5)
    }
    methods: dict[str, Any] = {}
    objectives = {
        "melbo": float(melbo.objective.float().mean()),
        "random": objective_of(model, ps, rand, tgt),
    }
    for k, m in enumerate(METHODS):
        ratios = [p / base_ppl for p in ppl[1 + k * args.n : 1 + (k + 1) * args.n]]
        labels = clusters["0.7"][m]["labels"]
        base_label = clusters["0.7"]["unsteered_label"]
        methods[m] = {
            "objective": objectives[m],
            "diversity": completion_diversity(texts[m], embed=embed).mean_distance,
            "fluency_ratio_median": statistics.median(r for r in ratios if not math.isnan(r)),
            "fluency_ratios": ratios,
            "repetition": statistics.fmean(repetition_score(t) for t in texts[m]),
            "differ": sum(t != unsteered for t in texts[m]) / args.n,
            "fluent_novel": sum(
                lab != base_label and r <= FLUENT_RATIO
                for lab, r in zip(labels, ratios, strict=True)
            ),
            "completions": texts[m],
        }
    return {
        "prompt": prompt,
        "kind": PROMPTS[prompt]["kind"],
        "source": source,
        "target": target,
        "radius": radius,
        "unsteered": unsteered,
        "unsteered_ppl": base_ppl,
        "methods": methods,
        "clusters": clusters,
        "seconds": {"train": t_train, "generate": t_gen},
    }


def grid(args: argparse.Namespace) -> list[tuple[str, int, int, float]]:
    """Main grid first (R-major, so a partial run covers every prompt), extras after."""
    main = [(p, 7, 22, r) for r in args.radii for p in args.prompts]
    extra = [(p, 5, 22, 32.0) for p in ("wolf", "arith_cot")]
    extra += [(p, 7, 15, 32.0) for p in ("wolf", "arith_cot")]
    return main + extra


# ----------------------------------------------------------------------- summary
def _wins(rows: list[dict[str, Any]], key: str, th: str = "0.7") -> tuple[int, int, int]:
    w = t = loss = 0
    for row in rows:
        if key == "fluent_novel_clusters":
            a, b = fluent_novel_clusters(row, "melbo", th), fluent_novel_clusters(row, "random", th)
        elif key in ("novel", "exclusive_vectors"):
            a, b = row["clusters"][th]["melbo"][key], row["clusters"][th]["random"][key]
        else:
            a, b = row["methods"]["melbo"][key], row["methods"]["random"][key]
        if math.isclose(a, b, abs_tol=1e-9):
            t += 1
        elif a > b:
            w += 1
        else:
            loss += 1
    return w, t, loss


def fluent_novel_clusters(row: dict[str, Any], method: str, th: str = "0.7") -> int:
    """Distinct clusters, other than the unsteered one, reached by a fluent vector."""
    c = row["clusters"][th]
    ratios = row["methods"][method]["fluency_ratios"]
    return len(
        {
            lab
            for lab, r in zip(c[method]["labels"], ratios, strict=True)
            if lab != c["unsteered_label"] and r <= FLUENT_RATIO
        }
    )


def _sign_p(wins: int, losses: int) -> float:
    """Two-sided sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def summarise(results: dict[str, Any]) -> str:
    rows = results["settings"]
    lines = [
        f"{'prompt':<13} {'layers':>6} {'R':>4} | {'novel cl.':>9} {'excl.vec':>8} "
        f"{'fl.novel':>8} {'diversity':>11} {'ppl x':>11} {'repeat':>11} {'differ':>9} "
        f"{'obj ratio':>9}",
        f"{'':<13} {'':>6} {'':>4} | {'M / R':>9} {'M / R':>8} {'M / R':>8} {'M / R':>11} "
        f"{'M / R':>11} {'M / R':>11} {'M / R':>9} {'M/R':>9}",
    ]
    for row in rows:
        c, m = row["clusters"]["0.7"], row["methods"]
        a, b = m["melbo"], m["random"]
        lines.append(
            f"{row['prompt']:<13} {row['source']:>2}->{row['target']:<2} {row['radius']:>4g} | "
            f"{c['melbo']['novel']:>4} / {c['random']['novel']:<2} "
            f"{c['melbo']['exclusive_vectors']:>3} / {c['random']['exclusive_vectors']:<2} "
            f"{a['fluent_novel']:>3} / {b['fluent_novel']:<2} "
            f"{a['diversity']:>5.2f} / {b['diversity']:<4.2f} "
            f"{a['fluency_ratio_median']:>5.2f} / {b['fluency_ratio_median']:<4.2f} "
            f"{a['repetition']:>5.2f} / {b['repetition']:<4.2f} "
            f"{a['differ']:>4.2f}/{b['differ']:<4.2f} "
            f"{a['objective'] / b['objective']:>9.2f}"
        )
    lines.append("")
    lines.append("paired over settings: MELBO wins / ties / losses (sign-test p)")
    keys = ("novel", "exclusive_vectors", "fluent_novel", "fluent_novel_clusters", "diversity")
    for key in (*keys, "differ"):
        w, t, loss = _wins(rows, key)
        lines.append(f"  {key:<21} {w:>2} / {t:>2} / {loss:>2}   p={_sign_p(w, loss):.3f}")
    w, t, loss = _wins(rows, "novel", "0.5")
    lines.append(f"  {'novel (th 0.5)':<21} {w:>2} / {t:>2} / {loss:>2}   p={_sign_p(w, loss):.3f}")
    lines.append("")
    lines.append("means by group (MELBO / random): novel clusters, fluent-novel, diversity, ppl x")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"R={row['radius']:g}", []).append(row)
        groups.setdefault(f"prompt={row['prompt']}", []).append(row)
        groups.setdefault(f"layers={row['source']}->{row['target']}", []).append(row)
    for name, members in groups.items():
        mean = statistics.fmean
        vals = [
            (
                mean(r["clusters"]["0.7"][m]["novel"] for r in members),
                mean(r["methods"][m]["fluent_novel"] for r in members),
                mean(r["methods"][m]["diversity"] for r in members),
                mean(r["methods"][m]["fluency_ratio_median"] for r in members),
            )
            for m in METHODS
        ]
        (a1, a2, a3, a4), (b1, b2, b3, b4) = vals
        lines.append(
            f"  {name:<22} n={len(members):<2} {a1:.2f}/{b1:.2f}  {a2:.2f}/{b2:.2f}  "
            f"{a3:.2f}/{b3:.2f}  {a4:.2f}/{b4:.2f}"
        )
    lines.append("")
    lines.append(
        f"best R per prompt and method (layers 7->22): distinct novel clusters among fluent "
        f"vectors (ppl <= {FLUENT_RATIO:g}x unsteered), MELBO vs random"
    )
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        cells = []
        for m in METHODS:
            best = max(
                (
                    (fluent_novel_clusters(r, m), -r["radius"], r["radius"])
                    for r in rows
                    if r["prompt"] == prompt and r["source"] == 7
                ),
                default=(0, 0, math.nan),
            )
            cells.append(f"{m} {best[0]} (R={best[2]:g})")
        lines.append(f"  {prompt:<13} " + "   ".join(cells))
    lines.append("")
    lines.append(
        "MELBO at R vs random at 2R (random's target change is ~4-5x smaller at equal R): "
        "novel clusters, fluent novel clusters, diversity, ppl x"
    )
    index = {(r["prompt"], r["source"], r["target"], r["radius"]): r for r in rows}
    for (prompt, s, t, radius), a in index.items():
        b = index.get((prompt, s, t, 2 * radius))
        if b is None:
            continue
        ma, rb = a["methods"]["melbo"], b["methods"]["random"]
        lines.append(
            f"  {prompt:<13} {s}->{t} M@{radius:g} vs R@{2 * radius:g}: "
            f"{a['clusters']['0.7']['melbo']['novel']} / {b['clusters']['0.7']['random']['novel']}"
            f"  {fluent_novel_clusters(a, 'melbo')} / {fluent_novel_clusters(b, 'random')}"
            f"  {ma['diversity']:.2f} / {rb['diversity']:.2f}"
            f"  {ma['fluency_ratio_median']:.2f} / {rb['fluency_ratio_median']:.2f}"
        )
    arith = [r for r in rows if r["prompt"].startswith("arith")]
    if arith:
        lines.append("")
        lines.append("arithmetic: completions stating the answer 14, MELBO / random / unsteered")
        for row in arith:
            right = [
                sum(bool(ANSWER.search(t)) for t in row["methods"][m]["completions"])
                for m in METHODS
            ]
            lines.append(
                f"  {row['prompt']:<13} {row['source']}->{row['target']} R={row['radius']:<4g} "
                f"{right[0]} / {right[1]} / {int(bool(ANSWER.search(row['unsteered'])))}"
            )
    return "\n".join(lines)


def examples(results: dict[str, Any], width: int = 110) -> str:
    """Each setting's novel clusters: which method reached them, ppl ratio, one completion."""
    lines = []
    for row in results["settings"]:
        c = row["clusters"]["0.7"]
        base = c["unsteered_label"]
        lines.append(
            f"## {row['prompt']} {row['source']}->{row['target']} R={row['radius']:g}  "
            f"unsteered: {row['unsteered'][:width]!r}"
        )
        seen: dict[str, list[str]] = {}
        for m in METHODS:
            for v, lab in enumerate(c[m]["labels"]):
                if lab != base:
                    seen.setdefault(lab, []).append(f"{m[0].upper()}{v}")
        for lab, who in seen.items():
            m = "melbo" if who[0][0] == "M" else "random"
            v = int(who[0][1:])
            text = row["methods"][m]["completions"][v]
            ratio = row["methods"][m]["fluency_ratios"][v]
            lines.append(f"  {lab:<10} {','.join(who):<20} x{ratio:<5.2f} {text[:width]!r}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/real_model_study.json")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--radii", nargs="+", type=float, default=[32.0, 16.0, 48.0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=36)
    parser.add_argument("--budget-min", type=float, default=35.0, help="stop starting settings")
    parser.add_argument("--limit", type=int, default=None, help="at most this many settings")
    parser.add_argument("--summarise", default=None, help="print the summary of a results file")
    parser.add_argument("--resume", action="store_true", help="keep --out's settings, skip them")
    args = parser.parse_args()
    if args.summarise:
        data = json.loads(Path(args.summarise).read_text())
        print(summarise(data) + "\n\n" + examples(data))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = load_model("smollm2-135m-instruct")
    embed = caching_embedder()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "prompts": {k: PROMPTS[k] for k in args.prompts},
        "settings_used": {
            "n_vectors": args.n,
            "steps": args.steps,
            "max_new_tokens": args.tokens,
            "orthogonal": "sequential",
            "lr": "auto",
            "greedy": True,
            "random": "random_vectors(orthogonal=True, seed=0) = MELBO's init",
            "target_positions": "1..end",
            "cluster_thresholds": [0.7, 0.5],
            "fluent_ratio": FLUENT_RATIO,
            "threads": 1,
        },
        "settings": [],
    }
    prior = 0.0
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        results["settings"], prior = old["settings"], old.get("wall_minutes", 0.0)
    done = {(r["prompt"], r["source"], r["target"], r["radius"]) for r in results["settings"]}
    plan = [g for g in grid(args) if g not in done][: args.limit]
    for k, (prompt, s, t, r) in enumerate(plan):
        elapsed = (time.perf_counter() - start) / 60
        if elapsed > args.budget_min:
            print(f"budget reached after {elapsed:.1f} min; {len(plan) - k} settings skipped")
            break
        row = run_setting(model, embed, prompt, s, t, r, args)
        results["settings"].append(row)
        results["wall_minutes"] = prior + (time.perf_counter() - start) / 60
        out.write_text(json.dumps(results, indent=1))
        c = row["clusters"]["0.7"]
        print(
            f"[{k + 1}/{len(plan)} {results['wall_minutes']:.1f} min] {prompt} {s}->{t} R={r:g}: "
            f"novel M {c['melbo']['novel']} R {c['random']['novel']}, diversity "
            f"M {row['methods']['melbo']['diversity']:.2f} "
            f"R {row['methods']['random']['diversity']:.2f} "
            f"(train {row['seconds']['train']:.0f} s, gen {row['seconds']['generate']:.0f} s)",
            flush=True,
        )
    print(summarise(results))


if __name__ == "__main__":
    main()
