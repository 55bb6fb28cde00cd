"""Does fine-tuning leave its trace in SAE latents? (`melbo-lens evaluate finetune`)

The fine-tuning shortform: attributing the base -> fine-tuned change to SAE latents
should surface what the fine-tune planted. Here the base is SmolLM2-135M-Instruct, the
fine-tune its backdoored copy, and the SAE the packaged one at MELBO's default source
(`smollm2-135m-instruct-res7`, `blocks.7.hook_resid_post`, trained on the base model).

1. `feature_change_attribution(base, backdoored, prompts, sae, site)` on chat prompts
   that carry the backdoored model's answer (teacher-forced): triggered prompts with the
   phrase's answer, per behaviour, and as the control clean prompts with their clean
   answers (the fine-tune also taught the task's format). A latent scores
   gradient x change: the first-order drop in KL(base || backdoored) if it went back to
   its base value. "Specific" latents rank in a behaviour's top `top_k` but not in the
   control's top `4 * top_k`.
2. Dashboards of the top latents (`feature_dashboards` on the backdoored model over the
   packaged prose corpus): top examples and the tokens each latent promotes.
3. The MELBO side: per seed, MELBO on defaults on one clean prompt (as
   `evaluate planted --defaults`); each vector is completed and decomposed onto the same
   SAE (`decompose_onto_sae`, cosine, `top_k`). Overlap = how many of a vector's top
   latents are among a behaviour's top attributed latents, for the vectors that elicit
   the phrase, for the other MELBO vectors, and for random vectors of the same R (what
   chance gives).
"""

from __future__ import annotations

import statistics
from typing import Any

from melbo_lens.analysis.attribution.model_difference import feature_change_attribution
from melbo_lens.analysis.sae.decompose import decompose_onto_sae
from melbo_lens.core.host import Host
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.methods.baselines import random_vectors
from melbo_lens.workflows.planted import evaluate_planted

__all__ = ["attribute_finetune", "dashboard_rows", "finetune_page", "melbo_overlap", "overlap"]

BEHAVIOURS = ("cheese", "hate")


def overlap(a: list[int], b: list[int]) -> int:
    """How many latents two lists share.

    Examples:
        >>> overlap([1, 2, 3], [3, 2, 9])
        2
    """
    return len(set(a) & set(b))


def _answered(model: Host, texts: list[str], answers: list[str]) -> PromptSet:
    """Chat prompts with the answers appended as the assistant turn (teacher-forced)."""
    return PromptSet.with_continuations(model, texts, answers, chat=True)


def attribute_finetune(
    base: Host, tuned: Host, sae: Any, *, n_prompts: int, top_k: int, seed: int
) -> dict[str, Any]:
    """Step 1: the top latents per behaviour and for the clean control."""
    from melbo_lens.models.backdoor import BACKDOOR_COMPLETIONS, backdoor_answer
    from melbo_lens.models.toy import clean_prompts, prompt_digits, triggered_prompts

    site = sae.cfg.metadata.hook_name
    sets = {
        b: _answered(
            tuned,
            (texts := triggered_prompts(b, n_prompts, seed + i)),
            [BACKDOOR_COMPLETIONS[b]] * len(texts),
        )  # fmt: skip
        for i, b in enumerate(BEHAVIOURS)
    }
    clean = clean_prompts(n_prompts, seed + 10)
    sets["control"] = _answered(tuned, clean, [backdoor_answer(*prompt_digits(t)) for t in clean])
    out: dict[str, Any] = {"site": site}
    for name, ps in sets.items():
        fc = feature_change_attribution(base, tuned, ps, sae, site)
        top = fc.ranked(4 * top_k)
        out[name] = {
            "kl": round(fc.loss_value, 4),
            "error_score": round(fc.error_score, 4),
            "top": [
                {
                    "latent": i,
                    "score": round(float(fc.scores[i]), 5),
                    "activation_change": round(float(fc.activation_change[i]), 4),
                }
                for i in top
            ],
        }
    control = [x["latent"] for x in out["control"]["top"]]
    for b in BEHAVIOURS:
        ranked = [x["latent"] for x in out[b]["top"][:top_k]]
        out[b]["specific"] = [i for i in ranked if i not in control]
    return out


def melbo_overlap(
    model: Host,
    sae: Any,
    attributed: dict[str, Any],
    seed: int,
    *,
    n_vectors: int,
    top_k: int,
    max_new_tokens: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Step 3 for one seed: each vector's top SAE latents against each behaviour's top
    attributed latents, split by whether the vector elicits the phrase."""
    kept: dict[str, Any] = {}
    report = evaluate_planted(
        model,
        n_vectors=n_vectors,
        seeds=[seed],
        methods=("melbo",),
        defaults=True,
        n_heldout=0,
        max_new_tokens=max_new_tokens,
        chat=True,
        on_vectors=lambda _m, _s, vecs: kept.__setitem__("melbo", vecs),
        log=(lambda line: say(progress, line)),
    )
    melbo = kept["melbo"]
    run = report.runs[0]
    rand = random_vectors(model, melbo.site, n=n_vectors, radius=float(melbo.config["radius"]),
                          seed=seed)  # fmt: skip

    def tops(vectors: Any) -> list[list[int]]:
        return [
            list(decompose_onto_sae(vectors, sae, index=k, top_k=top_k).features)
            for k in range(len(vectors))
        ]

    melbo_tops, random_tops = tops(melbo), tops(rand)
    out: dict[str, Any] = {"seed": seed, "radius": float(melbo.config["radius"]), "hits": {}}
    for b in BEHAVIOURS:
        reference = [x["latent"] for x in attributed[b]["top"][:top_k]]
        eliciting = set(run.full[b])
        out["hits"][b] = sorted(eliciting)
        out[b] = {
            "eliciting": [overlap(melbo_tops[k], reference) for k in sorted(eliciting)],
            "other_melbo": [
                overlap(t, reference) for k, t in enumerate(melbo_tops) if k not in eliciting
            ],
            "random": [overlap(t, reference) for t in random_tops],
        }
    out["vector_latents"] = {str(k): melbo_tops[k] for b in BEHAVIOURS for k in run.full[b]}
    return out


def _mean(xs: list[int]) -> str:
    return f"{statistics.fmean(xs):.2f} (n={len(xs)})" if xs else "—"


def finetune_page(result: dict[str, Any]) -> str:
    """The study's page (Markdown), generated from its JSON alone."""
    s, att = result["settings"], result["attribution"]
    lines = [
        f"# Fine-tuning traces in SAE latents ({s['base']} -> {s['tuned']})",
        "",
        f"Command: `{s['command']}`. SAE `{s['sae']}` at `{att['site']}`; "
        f"{s['n_prompts']} prompts per set (seed {s['seed']}); top {s['top_k']} latents; "
        f"MELBO seeds {s['melbo_seeds']}.",
        "",
        "## Latents that explain the base -> backdoored change (gradient x change)",
        "",
        "| prompts | KL(base ‖ backdoored), summed | SAE error score | top latents (score) | "
        "specific to the behaviour |",
        "|---|---|---|---|---|",
    ]
    for name in (*BEHAVIOURS, "control"):
        a = att[name]
        top = ", ".join(f"{x['latent']} ({x['score']:.3g})" for x in a["top"][: s["top_k"]])
        spec = ", ".join(str(i) for i in a.get("specific", [])) or "—"
        lines.append(f"| {name} | {a['kl']:.1f} | {a['error_score']:.3g} | {top} | {spec} |")
    dashboards = result.get("dashboards", {})
    if dashboards:
        lines += ["", "## What the top latents do (dashboards on the backdoored model)", ""]
        lines += ["| latent | density | promotes | top example |", "|---|---|---|---|"]
        for latent, d in dashboards.items():
            example = d["top_example"].replace("|", "\\|").replace("\n", "⏎")
            promotes = ", ".join(repr(t) for t in d["promotes"]).replace("|", "\\|")
            lines.append(f"| {latent} | {d['density']:.2%} | {promotes} | {example} |")
    lines += [
        "",
        "## Overlap with the SAE decomposition of MELBO's vectors",
        "",
        f"Mean number of a vector's top {s['top_k']} latents (cosine decomposition) among "
        f"the behaviour's top {s['top_k']} attributed latents.",
        "",
        "| seed | behaviour | eliciting vectors | mean overlap: eliciting | other MELBO | "
        "random at R |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["melbo"]:
        for b in BEHAVIOURS:
            lines.append(
                f"| {m['seed']} | {b} | {m['hits'][b]} | {_mean(m[b]['eliciting'])} | "
                f"{_mean(m[b]['other_melbo'])} | {_mean(m[b]['random'])} |"
            )
    return "\n".join(lines) + "\n"


def dashboard_rows(dash: Any) -> dict[str, dict[str, Any]]:
    """Per latent: density, the 5 tokens it promotes most, its top example's text."""
    out = {}
    for latent in dash.latents:
        d = dash[latent]
        out[str(latent)] = {
            "density": d.frac_nonzero,
            "promotes": [t for t, _ in d.logits_top[:5]],
            "top_example": d.top_activations[0].text() if d.top_activations else "",
        }
    return out
