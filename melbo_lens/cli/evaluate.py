"""`melbo-lens evaluate planted`: the planted-behaviour benchmark from a shell.

Loads the planted-arithmetic toy from package data (offline), runs `evaluate_planted`
for MELBO, random and Jacobian vectors over several seeds, prints the summary table and
writes every completion and statistic to ``OUT/planted.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from melbo_lens.core.io import atomic_write_text

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=["planted"], help="which benchmark (only 'planted' so far)")
    p.add_argument("--model", default="planted-arithmetic", help="a planted-arithmetic model")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--n-vectors", type=int, default=32, help="K vectors per method and seed")
    p.add_argument("--radius", type=float, default=None, help="R (default: the model's own)")
    p.add_argument("--source", type=int, default=1, help="source layer (resid_pre)")
    p.add_argument("--target", type=int, default=3, help="target layer (resid_pre)")
    p.add_argument("--positions", default="last:3", help="objective positions: all | last:N")
    p.add_argument("--steps", type=int, default=300, help="MELBO steps per vector")
    p.add_argument(
        "--methods", default="melbo,random,jacobian", help="comma-separated methods to score"
    )
    p.add_argument("--heldout", type=int, default=16, help="held-out prompts for generalisation")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per completion")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1)")
    p.add_argument(
        "--defaults",
        action="store_true",
        help="MELBO on pure defaults (auto sites, positions and R; --radius, --source, "
        "--target, --positions and --steps unused); random and Jacobian at MELBO's R",
    )
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on")
    p.add_argument("--out", default="evaluate_out", help="output directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from melbo_lens.core.sites import HookSite
    from melbo_lens.models.toy import DEFAULT_RADIUS
    from melbo_lens.models.zoo import load_model
    from melbo_lens.workflows.planted import evaluate_planted

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    if args.positions == "all":
        positions = None
    elif args.positions.startswith("last:"):
        positions = int(args.positions.split(":", 1)[1])
    else:
        raise SystemExit(f"--positions must be 'all' or 'last:N', got {args.positions!r}")
    report = evaluate_planted(
        model,
        n_vectors=args.n_vectors,
        radius=args.radius if args.radius is not None else DEFAULT_RADIUS,
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        source=HookSite(args.source, "resid_pre"),
        target=HookSite(args.target, "resid_pre"),
        target_positions=positions,
        steps=args.steps,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        max_new_tokens=args.max_new_tokens,
        n_heldout=args.heldout,
        log=lambda line: print(line, flush=True),
        defaults=args.defaults,
    )
    seconds = time.perf_counter() - start
    print(report.table())
    print(f"total {seconds:.0f}s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict() | {"seconds": round(seconds, 1)}
    atomic_write_text(out / "planted.json", json.dumps(data, indent=2))
    from melbo_lens.views.figures import planted_benchmark

    figure = out / "planted.html"  # self-contained: plotly.js inlined, works offline
    planted_benchmark(report).write_html(figure, include_plotlyjs=True)
    print(f"wrote {out / 'planted.json'} and {figure}")
    return 0
