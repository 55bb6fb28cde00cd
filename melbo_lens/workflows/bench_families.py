"""Benchmark (h): the per-step cost of every family and objective against vectors, in
one run on one model (`melbo-lens bench --families`).

Each row trains `members` members together (orthogonal="none", AMSGrad: one forward
and one backward per step for every row, so the rows differ only in what a step
computes) on the first 4 bundled `varied` prompts and times `steps` steps after one warm-up step
(the median step, from the per-step callback). Rows:

* vectors, MELBO's objective (the reference: ratio 1) and the same with
  `on_manifold=16`, the consistency objective, and the log-probability of an answer
  (which runs to the last block and the unembedding);
* adapters with unit columns (rank 1), Frobenius (rank 1) and spectral (rank 2)
  normalisation, and sparse in position (acting on the top 10% of read-outs);
* soft prompts of 1 and 8 tokens (MELBO's objective; a step runs every block from the
  input, not from the source) and of 4 tokens for an answer's log-probability.

`blocks` is how many transformer blocks a step runs (the segment from the family's
source to its target): most of the cost differences are that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from melbo_lens.core.host import Host, n_layers_of
from melbo_lens.core.io import atomic_write_text
from melbo_lens.core.prompts import PromptSet, bundled_prompts
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.adapters import AdapterConfig, train_steering_adapters
from melbo_lens.methods.defaults import default_positions, default_sites
from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors
from melbo_lens.methods.soft_prompts import SoftPromptConfig, soft_prompt_set, train_soft_prompts

__all__ = ["ANSWER", "families_benchmark", "step_seconds"]

ANSWER = "I love cheese!"  # the continuation the log-probability rows score


def step_seconds(train: Callable[[Callable[[Any], None]], Any], steps: int) -> float:
    """Median seconds per step over `steps` steps after the first (warm-up), read from
    the per-step callback's timestamps."""
    stamps: list[float] = []
    train(lambda _state: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    if len(gaps) < steps - 1:
        raise RuntimeError(f"timed {len(gaps)} step gaps, expected {steps - 1}")
    return statistics.median(gaps)


def _rows(model: Host, members: int, steps: int) -> list[tuple[str, str, Callable[..., Any]]]:
    """(family, setting, train(callback)) for every row of the table."""
    n_layers = n_layers_of(model)
    source, target = default_sites(n_layers)
    last = HookSite(n_layers - 1, "resid_post")
    texts = bundled_prompts("varied")[:4]
    plain, _ = default_positions(model, PromptSet.coerce(model, texts, chat=True), target)
    answered = PromptSet.with_continuations(model, texts, ANSWER)
    n = dict(steps=steps + 1, orthogonal="none", solver="amsgrad")

    def vectors(prompts: PromptSet, **kw: Any):
        cfg = MelboConfig(
            source, kw.pop("target", target), n_vectors=members, radius=8.0, **n, **kw
        )
        return lambda cb: train_steering_vectors(model, prompts, cfg, progress=False, callback=cb)

    def adapters(**kw: Any):
        cfg = AdapterConfig(source.layer, target, n_adapters=members, radius=4.0, **n, **kw)
        return lambda cb: train_steering_adapters(model, plain, cfg, progress=False, callback=cb)

    def soft(m: int, answer: str | None = None, **kw: Any):
        ps = soft_prompt_set(model, texts, m, continuations=answer)
        cfg = SoftPromptConfig(n_prompts=members, n_tokens=m, **n, **kw)
        return lambda cb: train_soft_prompts(model, ps, cfg, progress=False, callback=cb)

    return [
        ("vectors", "melbo", vectors(plain)),
        ("vectors", "on_manifold=16", vectors(plain, on_manifold=16)),
        ("vectors", "consistency", vectors(plain, objective="consistency")),
        ("vectors", "logprob", vectors(answered, objective="logprob", target=last)),
        ("adapters", "columns, rank 1", adapters()),
        ("adapters", "frobenius, rank 1", adapters(normalization="frobenius")),
        ("adapters", "spectral, rank 2", adapters(normalization="spectral", rank=2)),
        ("adapters", "sparse positions, q=0.9", adapters(position_quantile=0.9)),
        ("soft prompts", "1 token", soft(1)),
        ("soft prompts", "8 tokens", soft(8)),
        ("soft prompts", "4 tokens, logprob", soft(4, ANSWER, objective="logprob")),
    ]


def _blocks(model: Host, family: str, setting: str) -> int:
    n_layers = n_layers_of(model)
    source, target = default_sites(n_layers)
    if "logprob" in setting:
        target = HookSite(n_layers - 1, "resid_post")
    if family == "soft prompts":
        source = HookSite(0, "resid_pre")
    if family == "adapters":
        source = HookSite(source.layer, "mlp_out")
    return Segment.blocks_between(source, target)


def families_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the table (see the module docstring); writes OUT/bench_families.{json,txt}."""
    from melbo_lens.models.zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    members, steps = (2, 2) if args.quick else (4, 5)
    model = load_model(args.model)
    rows = []
    for family, setting, train in _rows(model, members, steps):
        seconds = step_seconds(train, steps)
        rows.append(
            {
                "family": family,
                "setting": setting,
                "blocks": _blocks(model, family, setting),
                "ms_per_step": round(1e3 * seconds, 2),
            }
        )
        print(f"  {family:<13} {setting:<20} {rows[-1]['ms_per_step']:>9.1f} ms/step", flush=True)
    reference = rows[0]["ms_per_step"]
    for row in rows:
        row["ratio_to_vectors"] = round(row["ms_per_step"] / reference, 3)
    result = {
        "model": model.cfg.model_name,
        "members": members,
        "timed_steps": steps,
        "prompts": 4,
        "threads": torch.get_num_threads(),
        "solver": "amsgrad",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_families.json", json.dumps(result, indent=2))
    atomic_write_text(out / "bench_families.txt", families_table(result))
    print("\n" + families_table(result) + f"\nresults -> {out / 'bench_families.json'}")
    return result


def families_table(result: dict[str, Any]) -> str:
    """The benchmark's table as Markdown (what the txt file and the docs show).

    Examples:
        >>> r = {"model": "m", "members": 4, "timed_steps": 5, "threads": 2, "rows": [
        ...     {"family": "vectors", "setting": "melbo", "blocks": 14, "ms_per_step": 10.0,
        ...      "ratio_to_vectors": 1.0}]}
        >>> print(families_table(r).splitlines()[-1])
        | vectors | melbo | 14 | 10.0 | 1.00 |
    """
    lines = [
        f"Per-step cost on {result['model']} ({result['members']} members per step, median "
        f"of {result['timed_steps']} steps, {result['threads']} threads)",
        "",
        "| family | setting | blocks per step | ms / step | × vectors |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['setting']} | {r['blocks']} | {r['ms_per_step']:.1f} | "
            f"{r['ratio_to_vectors']:.2f} |"
        )
    return "\n".join(lines)
