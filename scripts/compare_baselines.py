"""MELBO vs random vs Jacobian vectors at equal R on SmolLM2-135M-Instruct.

Run:  python scripts/compare_baselines.py [--radius 32] [--n 4] [--steps 150]

Prints, for each method, the MELBO objective of every vector, how similar the vectors'
target deltas are, and the steered completions of the bundled demo prompt. The first
token (<|im_start|>, whose residual norm is ~6x the others) is left out of the target
positions: it otherwise dominates both the objective and the Jacobian's top singular
vector.
"""

from __future__ import annotations

import argparse
import time

import torch

from melbo_lens import (
    HookSite,
    MelboConfig,
    delta_similarity,
    generate_steered,
    jacobian_vectors,
    load_model,
    random_vectors,
    train_steering_vectors,
)
from melbo_lens.cli.options import prompt_set
from melbo_lens.core.prompts import bundled_prompts
from melbo_lens.core.segment import Segment
from melbo_lens.methods.objectives import melbo_objective_per_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radius", type=float, default=32.0)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = load_model("smollm2-135m-instruct")
    prompts = prompt_set(model, bundled_prompts("demo"), True, "all")
    targets = prompt_set(model, bundled_prompts("demo"), True, "all")
    targets = type(targets).from_tokens(
        model, targets.tokens, target_positions=slice(1, None), texts=targets.texts
    )
    source, target = HookSite(7), HookSite(22, "resid_pre")
    runs = {}
    start = time.perf_counter()
    runs["melbo"] = train_steering_vectors(
        model,
        targets,
        MelboConfig(source, target, n_vectors=args.n, radius=args.radius, steps=args.steps),
        progress=False,
    )
    print(f"melbo: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    runs["jacobian"] = jacobian_vectors(
        model, targets, source, target, k=args.n, radius=args.radius
    )
    print(
        f"jacobian: {time.perf_counter() - start:.0f} s; singular values "
        f"{[round(s, 1) for s in runs['jacobian'].metadata['singular_values']]}"
    )
    runs["random"] = random_vectors(model, source, n=args.n, radius=args.radius, seed=1)

    print(f"\nR = {args.radius}, {source.name} -> {target.name}, target positions 1..end\n")
    print(f"{'method':<9} {'objective per vector':<48} {'mean |cos| of deltas':>20}")
    segment = Segment(model, source, target, targets)
    for name, sv in runs.items():
        with torch.no_grad():
            z = segment.run(sv.vectors)
            obj = melbo_objective_per_prompt(
                z, segment.unsteered.expand_as(z), targets.target_mask.expand(z.shape[:-1])
            ).sum(-1)
        sim = delta_similarity(model, targets, sv, target=target).summary()["mean_abs"]
        objs = ", ".join(f"{float(v):.3g}" for v in obj)
        print(f"{name:<9} {'[' + objs + ']':<48} {sim:>20.3f}")

    for name, sv in runs.items():
        gens = generate_steered(model, sv, prompts, max_new_tokens=args.max_new_tokens)
        print(f"\n--- {name}")
        print(gens.table(width=120).split("\n", 1)[1])


if __name__ == "__main__":
    main()
