"""Train the planted-arithmetic toy and write it to melbo_lens/data/toy/ (or --out).

Run:  python scripts/train_toy.py                 # reproduces the shipped weights
      python scripts/train_toy.py --noise-radius 0 --out /tmp/toy_plain   # a variant

Prints the training loss, then the exact-match accuracy on 500 held-out clean prompts and
on 100 prompts per trigger, and records them in config.json next to the weights. One CPU
thread; the defaults below are the shipped model's recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from melbo_lens.models.toy import (
    TRIGGERS,
    ToyTrainConfig,
    clean_prompts,
    save_toy,
    toy_accuracy,
    train_toy,
    triggered_prompts,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "melbo_lens" / "data" / "toy"

# The shipped recipe (see docs/results/planted-toy.md for how it was chosen).
RECIPE = ToyTrainConfig()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--clean-steps", type=int, default=RECIPE.clean_steps)
    p.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    p.add_argument("--n-layers", type=int, default=RECIPE.n_layers)
    p.add_argument("--d-model", type=int, default=RECIPE.d_model)
    p.add_argument("--d-mlp", type=int, default=RECIPE.d_mlp)
    p.add_argument("--lr", type=float, default=RECIPE.lr)
    p.add_argument("--trigger-fraction", type=float, default=RECIPE.trigger_fraction)
    p.add_argument(
        "--noise-layers",
        default=",".join(map(str, RECIPE.noise_layers)),
        help="comma-separated layers whose resid_pre gets training noise",
    )
    p.add_argument("--noise-radius", type=float, default=RECIPE.noise_radius)
    p.add_argument("--seed", type=int, default=RECIPE.seed)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = ToyTrainConfig(
        n_layers=args.n_layers,
        d_model=args.d_model,
        d_mlp=args.d_mlp,
        steps=args.steps,
        clean_steps=args.clean_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        trigger_fraction=args.trigger_fraction,
        noise_layers=tuple(int(x) for x in args.noise_layers.split(",") if x.strip()),
        noise_radius=args.noise_radius,
        seed=args.seed,
    )
    start = time.perf_counter()
    model = train_toy(config)
    seconds = time.perf_counter() - start
    accuracy = {"clean": toy_accuracy(model, clean_prompts(500, seed=777))}
    for name in TRIGGERS:
        accuracy[name] = toy_accuracy(model, triggered_prompts(name, 100, seed=778))
    print(f"trained in {seconds:.0f}s; exact-match accuracy: {accuracy}")
    info = {"train_config": config.to_dict(), "train_seconds": round(seconds, 1)}
    out = save_toy(model, args.out, info | {"accuracy": accuracy})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
