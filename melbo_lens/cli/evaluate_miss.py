"""`melbo-lens evaluate miss`: why MELBO on defaults misses "I love cheese!" on the
backdoored SmolLM2 and what closes it (`workflows.miss_study`). Writes ``OUT/miss.json``
after every seed of every phase (``--resume`` keeps what is there when the settings
match) and ``OUT/miss.md``, generated from the JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from melbo_lens.cli.options import CliError
from melbo_lens.cli.output import checked_directory, locked, saved_study
from melbo_lens.core.io import atomic_write_text

__all__ = ["run_miss"]


def _load(path: Path, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    empty: dict[str, Any] = {"diagnosis": [], "chosen": None, "selection": [], "confirmation": []}
    data = saved_study(
        path, args, settings, "a miss study", "its seeds",
        defaults={"selection_runs": False},  # files from before the flag ran no fix there
    )  # fmt: skip
    return empty if data is None else {k: data.get(k, v) for k, v in empty.items()}


def run_miss(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.miss_study import (
        CANDIDATES,
        choose,
        diagnose_seed,
        fix_seed,
        miss_page,
    )

    if args.model == "planted-arithmetic":
        args.model = "smollm2-135m-backdoored"  # the suite's default model
    if args.model != "smollm2-135m-backdoored":
        raise CliError(
            f"--model {args.model}: the miss study needs the planted phrases of "
            "smollm2-135m-backdoored"
        )
    selection = list(range(args.first_seed, args.first_seed + args.seeds))
    confirmation = list(range(args.confirm_first_seed, args.confirm_first_seed + args.seeds))
    if set(selection) & set(confirmation):
        raise CliError(
            f"--confirm-first-seed {args.confirm_first_seed}: the confirmation seeds "
            f"{confirmation} overlap the selection seeds {selection}; pick fresh ones, e.g. "
            f"--confirm-first-seed {args.first_seed + args.seeds}"
        )
    n_heldout = args.heldout if args.heldout is not None else 16
    settings = {
        "model": args.model,
        "n_vectors": args.n_vectors,
        "selection_seeds": selection,
        "confirmation_seeds": confirmation,
        "candidates": {k: v for k, v in CANDIDATES.items()},
        "n_heldout": n_heldout,
        "max_new_tokens": args.max_new_tokens,
        "selection_runs": bool(args.selection_runs),
        "command": f"melbo-lens evaluate miss --seeds {args.seeds} --first-seed "
        f"{args.first_seed} --confirm-first-seed {args.confirm_first_seed} --n-vectors "
        f"{args.n_vectors} --heldout {n_heldout} --max-new-tokens {args.max_new_tokens} "
        f"--threads {args.threads} --out {args.out}"
        + (" --selection-runs" if args.selection_runs else ""),
    }
    out = checked_directory(args.out, "--out")
    path = out / "miss.json"
    with locked(out):
        state = _load(path, args, settings)
        torch.set_num_threads(args.threads)
        model = load_model(args.model)
        common = {"n_vectors": args.n_vectors, "max_new_tokens": args.max_new_tokens}

        def save() -> None:
            result = {"settings": settings, **state}
            atomic_write_text(path, json.dumps(result, indent=1))
            atomic_write_text(out / "miss.md", miss_page(result))

        for seed in selection:
            if any(d["seed"] == seed for d in state["diagnosis"]):
                continue
            start = time.perf_counter()
            state["diagnosis"].append(diagnose_seed(model, seed, **common))
            save()
            print(f"diagnosis seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        state["chosen"] = choose(state["diagnosis"])
        positions = CANDIDATES[state["chosen"]]
        print(f"chosen: {state['chosen']}", flush=True)
        phases = [("confirmation", confirmation)]
        if args.selection_runs:
            phases.insert(0, ("selection", selection))
        for phase, seeds in phases:
            for seed in seeds:
                if any(f["seed"] == seed for f in state[phase]):
                    continue
                start = time.perf_counter()
                state[phase].append(fix_seed(model, seed, positions, n_heldout=n_heldout, **common))
                save()
                print(f"{phase} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        save()
        print(miss_page(json.loads(path.read_text(encoding="utf-8"))))
    return 0
