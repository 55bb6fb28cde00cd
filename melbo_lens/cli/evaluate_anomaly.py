"""`melbo-lens evaluate anomaly`: the anomaly-detection study (`workflows.anomaly_study`)
from a shell. Writes ``OUT/anomaly.json`` after every seed (``--resume`` keeps the seeds
already there when the settings match) and ``OUT/anomaly.md``, generated from the JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from melbo_lens.cli.options import CliError
from melbo_lens.cli.output import checked_directory, locked, saved_study
from melbo_lens.core.io import atomic_write_text

__all__ = ["run_anomaly"]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "n_vectors": args.n_vectors,
        "n_reference": args.reference,
        "n_heldout": args.heldout if args.heldout is not None else 64,
    }


def _saved(path: Path, args: argparse.Namespace, settings: dict[str, Any]) -> list[dict]:
    data = saved_study(path, args, settings, "an anomaly study", "its seeds")
    return [] if data is None else list(data["seeds"])


def run_anomaly(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.anomaly_study import anomaly_page, anomaly_seed, summarise

    if args.model == "planted-arithmetic":
        args.model = "smollm2-135m-backdoored"  # the suite's default model
    if args.model != "smollm2-135m-backdoored":
        raise CliError(
            f"--model {args.model}: the anomaly study needs the planted triggers of "
            "smollm2-135m-backdoored"
        )
    if args.reference < 2:
        raise CliError(f"--reference must be >= 2 clean prompts, got {args.reference}")
    settings = _settings(args)
    out = checked_directory(args.out, "--out")
    path = out / "anomaly.json"
    with locked(out):
        seeds = _saved(path, args, settings)
        done = {s["seed"] for s in seeds}
        torch.set_num_threads(args.threads)
        model = load_model(args.model)
        command = (
            f"melbo-lens evaluate anomaly --seeds {args.seeds} --first-seed {args.first_seed} "
            f"--n-vectors {args.n_vectors} --reference {args.reference} "
            f"--heldout {settings['n_heldout']} --threads {args.threads} --out {args.out}"
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if seed in done:
                continue
            start = time.perf_counter()
            seeds.append(
                anomaly_seed(
                    model,
                    seed,
                    n_vectors=args.n_vectors,
                    n_reference=args.reference,
                    n_heldout=settings["n_heldout"],
                )
            )
            seeds.sort(key=lambda s: s["seed"])
            result = {
                "settings": {**settings, "command": command},
                "seeds": seeds,
                "summary": summarise(seeds),
                "summary_near_miss": summarise(seeds, "auroc_near_miss"),
                "summary_shifted": summarise(seeds, "auroc_shifted"),
            }
            atomic_write_text(path, json.dumps(result, indent=1))
            atomic_write_text(out / "anomaly.md", anomaly_page(result))
            print(f"seed {seed} done in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
        print(anomaly_page(json.loads(path.read_text(encoding="utf-8"))))
    return 0
