"""Options and helpers shared by the CLI's subcommands: sites, prompts, training flags.

Every subcommand module imports from here, never from `melbo_lens.cli` itself, so the
package has no import cycle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Literal

from melbo_lens.core.prompts import bundled_prompts

DEFAULT_MODEL = "smollm2-135m-instruct"


def _site(value: str, default_point: str):
    from melbo_lens.core.sites import parse_site

    return parse_site(value, default_point)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            prompts += list(data if isinstance(data, list) else data["prompts"])
        else:
            prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        prompts = bundled_prompts("demo")
    return prompts


def _target_positions(spec: str):
    if spec == "all":
        return None
    if spec.startswith("last:"):
        return slice(-int(spec.split(":", 1)[1]), None)
    if spec.endswith(":"):  # "1:" = every position from 1 on (skips the first token)
        return slice(int(spec[:-1]), None)
    return [int(p) for p in spec.split(",")]


def _prompt_set(model: Any, prompts: list[str], chat: bool, target_spec: str):
    from melbo_lens.core.prompts import PromptSet

    return PromptSet.coerce(
        model, prompts, chat=chat, target_positions=_target_positions(target_spec)
    )


def _add_training_args(p: argparse.ArgumentParser, *, n_vectors: int, steps: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged name or a TransformerLens name")
    p.add_argument("--bridge", action="store_true", help="use TransformerBridge as the host")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a .txt (one prompt per line) or .json list")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--source", default="7", help="layer (resid_post) or hook name")
    p.add_argument("--target", default="blocks.22.hook_resid_pre", help="layer or hook name")
    p.add_argument(
        "--target-positions", default="all", help="'all', 'N:' (from N on), 'last:N' or '0,3,-1'"
    )
    p.add_argument("--radius", type=float, default=4.0)
    p.add_argument("--power", type=float, default=2.0)
    p.add_argument("--q", type=float, default=1.0)
    p.add_argument("--n-vectors", type=int, default=n_vectors)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", default="auto", help="'auto' (0.011·R/√d_model) or a number")
    p.add_argument(
        "--orthogonal",
        default=None,
        choices=["sequential", "simultaneous", "soft", "none"],
        help="default: sequential (vectors), none (adapters)",
    )
    p.add_argument("--solver", default="amsgrad", choices=["amsgrad", "power"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="melbo_out", help="output directory")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _melbo_config(args: argparse.Namespace, radius: float):
    """The MelboConfig that the shared training options (`_add_training_args`) describe."""
    from melbo_lens.methods.melbo import MelboConfig

    return MelboConfig(
        source=_site(args.source, "resid_post"),
        target=_site(args.target, "resid_post"),
        n_vectors=args.n_vectors,
        radius=radius,
        power=args.power,
        q=args.q,
        steps=args.steps,
        lr=args.lr if args.lr == "auto" else float(args.lr),
        orthogonal=args.orthogonal or "sequential",
        solver=args.solver,
        seed=args.seed,
    )


def _train(args: argparse.Namespace, prompts: list[str]):
    from melbo_lens.methods.melbo import train_steering_vectors
    from melbo_lens.models.zoo import load_model

    model = load_model(args.model, bridge=args.bridge)
    ps = _prompt_set(model, prompts, not args.no_chat, args.target_positions)
    config = _melbo_config(args, args.radius)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vectors.safetensors"
    resume = str(path) if getattr(args, "resume", False) and path.exists() else None
    start = time.perf_counter()
    vectors = train_steering_vectors(
        model, ps, config, progress=not args.quiet, checkpoint=str(path), resume=resume
    )
    vectors.metadata["load_name"] = args.model
    vectors.save(path)
    seconds = time.perf_counter() - start
    return model, ps, vectors, path, seconds


def _print_vectors(vectors) -> None:
    print(f"{'vector':>6}  {'objective':>12}  {'steps':>5}")
    for k in range(len(vectors)):
        obj = float(vectors.objective[k]) if vectors.objective is not None else float("nan")
        steps = int(vectors.steps_done[k]) if vectors.steps_done is not None else -1
        print(f"{k:>6}  {obj:>12.5g}  {steps:>5}")


SUPERVISED: dict[str, Literal["mean_difference", "pca", "probe"]] = {
    "mean-diff": "mean_difference",
    "pca": "pca",
    "probe": "probe",
}
BASELINES = ("random", "jacobian", "hessian")
