"""`melbo-lens evaluate finetune`: the base -> backdoored SmolLM2 change attributed to SAE
latents, their dashboards, and their overlap with the SAE decomposition of MELBO's
vectors (`workflows.finetune_study`). Writes ``OUT/finetune.json`` after each part
(``--resume`` keeps the parts there when the settings match) and ``OUT/finetune.md``,
generated from the JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from melbo_lens.cli.options import CliError
from melbo_lens.cli.output import checked_directory, locked, saved_study
from melbo_lens.core.io import atomic_write_text

__all__ = ["run_finetune"]

SAE, TOP_K, N_PROMPTS, PROMPT_SEED = "smollm2-135m-instruct-res7", 10, 32, 8100
DASHBOARD_TOKENS = 32_768


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.analysis.sae.dashboards import feature_dashboards
    from melbo_lens.analysis.sae.loading import load_sae
    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.finetune_study import (
        attribute_finetune,
        dashboard_rows,
        finetune_page,
        melbo_overlap,
    )

    if args.model not in ("planted-arithmetic", "smollm2-135m-backdoored"):
        raise CliError(
            f"--model {args.model}: the fine-tuning study compares smollm2-135m-instruct with "
            "its backdoored copy, smollm2-135m-backdoored; leave --model out"
        )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings: dict[str, Any] = {
        "base": "smollm2-135m-instruct",
        "tuned": "smollm2-135m-backdoored",
        "sae": SAE,
        "top_k": TOP_K,
        "n_prompts": N_PROMPTS,
        "seed": PROMPT_SEED,
        "melbo_seeds": seeds,
        "n_vectors": args.n_vectors,
        "dashboard_tokens": DASHBOARD_TOKENS,
        "command": f"melbo-lens evaluate finetune --seeds {args.seeds} --first-seed "
        f"{args.first_seed} --n-vectors {args.n_vectors} --threads {args.threads} "
        f"--out {args.out}",
    }
    out = checked_directory(args.out, "--out")
    path = out / "finetune.json"
    with locked(out):
        state: dict[str, Any] = {"attribution": None, "dashboards": {}, "melbo": []}
        saved = saved_study(path, args, settings, "a fine-tuning study", "its parts")
        if saved is not None:
            state = {k: saved.get(k, v) for k, v in state.items()}

        def save() -> None:
            result = {"settings": settings, **state}
            atomic_write_text(path, json.dumps(result, indent=1))
            atomic_write_text(out / "finetune.md", finetune_page(result))

        torch.set_num_threads(args.threads)
        tuned = load_model("smollm2-135m-backdoored")
        sae = load_sae(SAE)
        if state["attribution"] is None:
            base = load_model("smollm2-135m-instruct")
            state["attribution"] = attribute_finetune(
                base, tuned, sae, n_prompts=N_PROMPTS, top_k=TOP_K, seed=PROMPT_SEED
            )
            del base
            save()
        if not state["dashboards"]:
            att = state["attribution"]
            latents = sorted(
                {x["latent"] for b in ("cheese", "hate") for x in att[b]["top"][:TOP_K]}
            )
            dash = feature_dashboards(
                tuned, sae, latents=latents, max_tokens=DASHBOARD_TOKENS, cache=False,
                allow_model_mismatch=True, progress=False,
            )  # fmt: skip
            state["dashboards"] = dashboard_rows(dash)
            save()
        done = {m["seed"] for m in state["melbo"]}
        for seed in seeds:
            if seed in done:
                continue
            state["melbo"].append(
                melbo_overlap(
                    tuned,
                    sae,
                    state["attribution"],
                    seed,
                    n_vectors=args.n_vectors,
                    top_k=TOP_K,
                    max_new_tokens=args.max_new_tokens,
                )  # fmt: skip
            )
            state["melbo"].sort(key=lambda m: m["seed"])
            save()
        save()
        print(finetune_page(json.loads(path.read_text(encoding="utf-8"))))
    return 0
