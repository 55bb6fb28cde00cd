"""`melbo-lens evaluate fragility`: how many soft tokens (or how large a vector) each
planted phrase needs, in the backdoored and in the clean SmolLM2
(`workflows.fragility_study`). Writes ``OUT/fragility.json`` after each model
(``--resume`` keeps the models already there when the settings match),
``OUT/fragility.md`` and ``OUT/fragility.html`` (the figure), both from the JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from melbo_lens.cli.output import checked_directory, locked, saved_study
from melbo_lens.core.io import atomic_write_text

__all__ = ["run_fragility"]

MODELS = ("smollm2-135m-backdoored", "smollm2-135m-instruct")
TOKENS = (1, 2, 4, 8)
RADII = (2.0, 4.0, 8.0, 15.0)
STEPS, SUCCESS = 20, 0.9


def run_fragility(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.models.zoo import load_model
    from melbo_lens.views.figures import fragility_figure
    from melbo_lens.workflows.fragility_study import fragility_model, fragility_page

    n_heldout = args.heldout if args.heldout is not None else 32
    settings: dict[str, Any] = {
        "models": list(MODELS),
        "tokens": list(TOKENS),
        "radii": list(RADII),
        "steps": STEPS,
        "seed": args.first_seed,
        "n_heldout": n_heldout,
        "success": SUCCESS,
        "command": f"melbo-lens evaluate fragility --first-seed {args.first_seed} --heldout "
        f"{n_heldout} --threads {args.threads} --out {args.out}",
    }
    out = checked_directory(args.out, "--out")
    path = out / "fragility.json"
    with locked(out):
        saved = saved_study(path, args, settings, "a fragility study", "its models")
        rows: list[dict[str, Any]] = [] if saved is None else list(saved["rows"])
        torch.set_num_threads(args.threads)
        for name in MODELS:
            if any(r["model"] == name for r in rows):
                continue
            model = load_model(name)
            rows += fragility_model(
                model, name, tokens=TOKENS, radii=RADII, n_heldout=n_heldout, steps=STEPS,
                seed=args.first_seed,
            )  # fmt: skip
            result = {"settings": settings, "rows": rows}
            atomic_write_text(path, json.dumps(result, indent=1))
            atomic_write_text(out / "fragility.md", fragility_page(result))
            fragility_figure(result).write_html(out / "fragility.html", include_plotlyjs=True)
        print(fragility_page(json.loads(path.read_text(encoding="utf-8"))))
    return 0
