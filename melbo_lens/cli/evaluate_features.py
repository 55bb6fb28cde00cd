"""`melbo-lens evaluate features`: the best SAE latent clamp against difference-of-means
vectors from 1 to 128 contrast pairs and a probe vector, each scaled to the same KL on
neutral prompts (`workflows.features_study`). Writes ``OUT/features.json`` and
``OUT/features.md``, generated from the JSON; an existing result is kept unless
``--overwrite``."""

from __future__ import annotations

import argparse
import json

from melbo_lens.cli.options import CliError
from melbo_lens.cli.output import checked_directory, locked
from melbo_lens.core.io import atomic_write_text

__all__ = ["run_features"]

MODEL, SAE, KL_TARGETS, DRAWS, CANDIDATES = (
    "smollm2-135m-instruct",
    "smollm2-135m-instruct-res7",
    (1.0,),
    2,
    6,
)


def run_features(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.analysis.sae.loading import load_sae
    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.features_study import features_page, features_study

    if args.model not in ("planted-arithmetic", MODEL):
        raise CliError(
            f"--model {args.model}: the features study runs on {MODEL} with its packaged SAE "
            f"{SAE}; leave --model out"
        )
    out = checked_directory(args.out, "--out")
    path = out / "features.json"
    settings = {
        "model": MODEL,
        "sae": SAE,
        "kl_targets": list(KL_TARGETS),
        "draws": DRAWS,
        "n_candidates": CANDIDATES,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.first_seed,
        "command": f"melbo-lens evaluate features --first-seed {args.first_seed} "
        f"--max-new-tokens {args.max_new_tokens} --threads {args.threads} --out {args.out}",
    }
    with locked(out):
        if path.exists() and not args.overwrite:
            raise CliError(
                f"--out already holds a features study ({path}); pass --overwrite to replace "
                "it, or another --out"
            )
        torch.set_num_threads(args.threads)
        result = features_study(
            load_model(MODEL), load_sae(SAE), kl_targets=KL_TARGETS, draws=DRAWS,
            n_candidates=CANDIDATES, max_new_tokens=args.max_new_tokens, seed=args.first_seed,
        )  # fmt: skip
        record = {"settings": settings, "result": result}
        atomic_write_text(path, json.dumps(record, indent=1))
        atomic_write_text(out / "features.md", features_page(record))
        print(features_page(record))
    return 0
