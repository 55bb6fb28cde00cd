"""Benchmark: melbo_lens against a naive reference that follows the source's implementation.

Everything is measured in one run on one machine and reported as ratios:

* **naive reference** - what the original MELBO code does: every step runs a full
  forward pass of the whole model (all blocks and the unembedding) with θ added at the
  source, one prompt at a time and one vector at a time, then backpropagates from the
  target.
* **melbo_lens** - the prefix is cached once; each step runs only the blocks between
  source and target, for K vectors x n prompts rows in one batch.

Reported: ms per vector-step, the speed-up, achieved FLOP/s against a large fp32 matmul
timed in the same run, peak memory, and time-to-solution: wall time until the objective
reaches the naive reference's final (`--naive-steps`) value, for the default AMSGrad
solver and the power solver. Because MELBO's value is the diversity of what it finds,
the power solver is also compared with AMSGrad on how different its vectors' target
deltas are (orthogonality on).

Why one module over ~400 lines: one benchmark whose sections (a)-(e) share one setup and
one naive reference; (f) and (g) are in `bench_vectors`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from melbo_lens.core.host import Host, frozen
from melbo_lens.core.io import atomic_write_text
from melbo_lens.core.memory import peak_bytes
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.methods.constraints import project_out, tangent_project, to_sphere
from melbo_lens.methods.defaults import default_positions
from melbo_lens.methods.melbo import MelboConfig, init_vectors, train_steering_vectors
from melbo_lens.methods.objectives import melbo_objective_per_prompt
from melbo_lens.workflows.bench_vectors import delta_similarity, planted_vector_0, time_to_vectors

__all__ = [
    "adapters_benchmark",
    "block_flops",
    "naive_reference",
    "run_benchmark",
    "vectors_benchmark",
]


# ---------------------------------------------------------------------- FLOP counting
def block_flops(cfg: Any, positions: int) -> tuple[float, float]:
    """(weight-matmul, attention-matmul) forward FLOPs of one block for one token.

    Attention matmuls are counted over all `positions` keys, as the dense kernels run.
    """
    d, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
    kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
    attn_w = 2 * d * heads * d_head * 2 + 2 * d * kv_heads * d_head * 2  # q, o ; k, v
    gated = bool(getattr(cfg, "gated_mlp", False))
    mlp_w = (3 if gated else 2) * 2 * d * cfg.d_mlp
    attn_mm = 2 * 2 * heads * d_head * positions  # QKᵀ and AV
    return float(attn_w + mlp_w), float(attn_mm)


def step_flops(
    cfg: Any, tokens: int, positions: int, fwd_blocks: int, bwd_blocks: int, unembed: bool
) -> float:
    """FLOPs of one training step: forward blocks, activation-gradient backward blocks.

    With frozen weights, backward through y = xW is one matmul (dx), through the two
    attention matmuls it is two each.
    """
    w, a = block_flops(cfg, positions)
    fwd = fwd_blocks * (w + a) + (2 * cfg.d_model * cfg.d_vocab if unembed else 0.0)
    bwd = bwd_blocks * (w + 2 * a)
    return tokens * (fwd + bwd)


def matmul_throughput(
    size: int = 2048,
    seconds: float = 2.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the practical ceiling."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    _sync(device)
    _ = a @ b  # warm-up
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _ = a @ b
        n += 1
        if n % 16 == 0:
            _sync(device)
    _sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: str) -> float:
    """Peak memory so far, MiB: the process's peak RSS on CPU, the CUDA allocator's peak
    on a GPU (`core.memory.peak_bytes`)."""
    return peak_bytes(device) / 2**20


# ---------------------------------------------------------------------- naive reference
def naive_reference(
    model: Host,
    prompts: PromptSet,
    config: MelboConfig,
    steps: int,
    index: int = 0,
    basis: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One vector the way the source trains it: full forward per prompt, batch 1.

    Same init, lr, AMSGrad, tangent projection and renormalisation as melbo_lens, so the
    objective curves must agree; only the execution differs.
    """
    with frozen(model):
        return _naive(model, prompts, config, steps, index, basis)


def _naive(model, prompts, config, steps, index, basis) -> dict[str, Any]:
    d_model = model.cfg.d_model
    src, tgt = config.source, config.target
    theta = torch.nn.Parameter(
        to_sphere(
            project_out(
                init_vectors([index], d_model, config.seed, prompts.tokens.device, torch.float32),
                basis,
            ),
            config.radius,
        )[0]
    )
    opt = torch.optim.AdamW(
        [theta], lr=config.resolved_lr(d_model), betas=config.betas, weight_decay=0.0, amsgrad=True
    )
    rows = [prompts[i] for i in range(len(prompts))]
    unsteered = []
    with torch.no_grad():
        for p in rows:
            _, cache = model.run_with_cache(p.tokens, names_filter=tgt.name)
            unsteered.append(cache[tgt.name])
    captured: dict[str, torch.Tensor] = {}

    def add(act, hook):
        return act + theta.to(act.dtype)

    def grab(act, hook):
        captured["z"] = act
        return act

    curve, start = [], time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for p, clean in zip(rows, unsteered, strict=True):
            with model.hooks(fwd_hooks=[(src.name, add), (tgt.name, grab)]):
                model(p.tokens)  # the whole model, logits included, as the source does
            obj = melbo_objective_per_prompt(
                captured["z"], clean, p.target_mask, power=config.power, q=config.q
            ).sum()
            (-obj).backward()
            total += float(obj.detach())
        grad = theta.grad
        if grad is None:
            raise RuntimeError("no gradient reached θ in the naive reference")
        with torch.no_grad():
            theta.grad = project_out(tangent_project(grad[None], theta[None]), basis)[0]
            opt.step()
            theta.copy_(to_sphere(project_out(theta[None], basis), config.radius)[0])
        curve.append(total)
    seconds = time.perf_counter() - start
    return {"curve": curve, "seconds": seconds, "vector": theta.detach().clone()}


def _step_seconds(model: Host, prompts: PromptSet, config: MelboConfig, **kw: Any) -> float:
    """Mean wall time of one full training step (forward, backward, update), measured
    between consecutive per-step callbacks, so set-up and the final evaluation are out."""
    stamps: list[float] = []
    train_steering_vectors(
        model,
        prompts,
        config,
        progress=False,
        callback=lambda state: stamps.append(time.perf_counter()),
        **kw,
    )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _first_reaching(curve: list[float], target: float) -> int | None:
    for i, value in enumerate(curve):
        if value >= target:
            return i
    return None


# one AMSGrad start per vector: what the naive reference runs
LONE: dict[str, Any] = dict(starts_per_vector=1, solver="amsgrad")


# ---------------------------------------------------------------------- the benchmark
def _setup(args: argparse.Namespace) -> tuple[Any, PromptSet, dict[str, Any], Segment, float]:
    """The benchmark's model, prompts (target positions as training resolves them), the
    config fields every timed run shares, the segment and the RSS before loading."""
    from melbo_lens.core.prompts import bundled_prompts
    from melbo_lens.core.sites import parse_site
    from melbo_lens.models.zoo import load_model

    device = getattr(args, "device", "cpu")
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.naive_steps, args.timed_steps = min(args.naive_steps, 5), 1
        args.n_vectors, args.diversity_vectors = min(args.n_vectors, 2), 2
        args.power_steps, args.no_compile = min(args.power_steps, 3), True
        args.slots, args.reference_slots = 2, 2
    rss0 = _peak_mb(device)
    model = load_model(args.model, device=device, dtype=dtype)
    prompts = PromptSet.coerce(model, bundled_prompts("demo"), chat=True)
    source, target = parse_site(args.source, "resid_post"), parse_site(args.target, "resid_post")
    prompts, _ = default_positions(model, prompts, target)  # as training resolves them
    base: dict[str, Any] = dict(source=source, target=target, radius=args.radius, power=2.0, q=1.0)
    segment = Segment(model, source, target, prompts)
    print(
        f"model {model.cfg.model_name}: {model.cfg.n_layers} layers, d_model "
        f"{model.cfg.d_model}; {source.name} -> {target.name} ({segment.n_blocks} blocks per "
        f"step); prompt {int(prompts.attention_mask.sum())} tokens; "
        f"{torch.get_num_threads()} threads; {device}, {dtype}"
    )
    return model, prompts, base, segment, rss0


def vectors_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Only (f) and (g) (`bench_vectors`): writes OUT/bench_vectors.json."""
    model, prompts, base, segment, _ = _setup(args)
    result = {
        "model": model.cfg.model_name,
        "source": base["source"].name,
        "target": base["target"].name,
        "radius": args.radius,
        "threads": torch.get_num_threads(),
        "device": getattr(args, "device", "cpu"),
        "time_to_vectors": time_to_vectors(model, prompts, base, args, None, segment),
        "planted_vector_0": planted_vector_0(seeds=range(2 if args.quick else 5)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_vectors.json", json.dumps(result, indent=2))
    print(f"\nresults -> {out / 'bench_vectors.json'}")
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = getattr(args, "device", "cpu")
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    model, prompts, base, segment0, rss0 = _setup(args)
    source, target = base["source"], base["target"]
    cfg = model.cfg
    P = prompts.tokens.shape[1]
    n_tok = int(prompts.attention_mask.sum())
    seg_blocks = segment0.n_blocks

    size = 1024 if args.quick else (8192 if device.startswith("cuda") else 2048)
    peak = matmul_throughput(size, dtype=dtype, device=device)
    print(f"matmul ceiling ({dtype} {size}² in this run): {peak / 1e9:.1f} GFLOP/s")

    # (a) naive reference, vector 0
    naive_cfg = MelboConfig(**base, n_vectors=1, steps=args.naive_steps)
    naive = naive_reference(model, prompts, naive_cfg, args.naive_steps)
    naive_ms = 1e3 * naive["seconds"] / args.naive_steps
    target_value = naive["curve"][-1]
    naive_flops = step_flops(cfg, n_tok, P, cfg.n_layers, seg_blocks, unembed=True)
    print(
        f"\n(a) naive reference: {naive_ms:.1f} ms per vector-step "
        f"({naive_flops / (naive_ms / 1e3) / 1e9:.1f} GFLOP/s); objective after "
        f"{args.naive_steps} steps {target_value:.4g}"
    )

    # (b) melbo_lens, one vector, same init and optimiser: same curve, less work per step
    one = train_steering_vectors(
        model,
        prompts,
        MelboConfig(**base, n_vectors=1, steps=args.naive_steps, **LONE),
        progress=False,
    )
    one_ms = 1e3 * one.metadata["train_seconds"] / args.naive_steps
    one_curve = one.record("losses")[0].tolist()
    agree = abs(one_curve[-1] - target_value) / target_value
    print(
        f"(b) melbo_lens, 1 vector: {one_ms:.1f} ms per vector-step "
        f"({naive_ms / one_ms:.2f}x); final objective {one_curve[-1]:.4g} "
        f"(relative difference to naive {agree:.1e})"
    )

    # (c) melbo_lens, K vectors in one batch; steady-state step time between callbacks
    k = args.n_vectors
    k_flops = step_flops(cfg, n_tok * k, P, seg_blocks, seg_blocks, unembed=False)
    rss_before = _peak_mb(device)
    step_s = _step_seconds(
        model,
        prompts,
        MelboConfig(**base, n_vectors=k, steps=args.timed_steps + 1, orthogonal="simultaneous"),
    )
    k_ms, achieved = 1e3 * step_s / k, k_flops / step_s
    print(
        f"(c) melbo_lens, {k} vectors batched: {k_ms:.2f} ms per vector-step "
        f"({naive_ms / k_ms:.2f}x faster than naive); {achieved / 1e9:.1f} GFLOP/s = "
        f"{100 * achieved / peak:.0f}% of the matmul ceiling; peak RSS "
        f"{_peak_mb(device):.0f} MB (process; {rss_before - rss0:.0f} MB before this phase)"
    )

    # (c') the same with the segment's blocks through torch.compile (one-off compile cost)
    c_ms = c_achieved = compile_s = float("nan")
    if not args.no_compile:
        start = time.perf_counter()
        train_steering_vectors(
            model,
            prompts,
            MelboConfig(**base, n_vectors=k, steps=1, orthogonal="simultaneous"),
            progress=False,
            compile=True,
        )
        compile_s = time.perf_counter() - start
        c_step_s = _step_seconds(
            model,
            prompts,
            MelboConfig(**base, n_vectors=k, steps=args.timed_steps + 1, orthogonal="simultaneous"),
            compile=True,
        )
        c_ms, c_achieved = 1e3 * c_step_s / k, k_flops / c_step_s
        print(
            f"(c') with compile=True: {c_ms:.2f} ms per vector-step ({naive_ms / c_ms:.2f}x "
            f"faster than naive); {c_achieved / 1e9:.1f} GFLOP/s = "
            f"{100 * c_achieved / peak:.0f}% of the matmul ceiling (compile + first step "
            f"{compile_s:.0f} s, once per process)"
        )

    # (d) time to solution for vector 0: steps until the naive final objective is reached
    power = train_steering_vectors(
        model,
        prompts,
        MelboConfig(
            **base, n_vectors=1, steps=args.power_steps, solver="power", starts_per_vector=1
        ),
        progress=False,
    )
    power_curve = power.record("losses")[0].tolist() + [float(power.record("objective")[0])]
    power_ms = 1e3 * power.metadata["train_seconds"] / args.power_steps
    naive_tts = naive["seconds"]
    rows = [("naive AMSGrad", _first_reaching(naive["curve"], target_value), naive_ms)]
    rows.append(("melbo_lens AMSGrad", _first_reaching(one_curve, target_value), one_ms))
    rows.append(("melbo_lens power", _first_reaching(power_curve, target_value), power_ms))
    print(f"\n(d) time to solution (objective >= {target_value:.4g}, vector 0):")
    tts = {}
    for name, steps, ms in rows:
        if steps is None:
            print(f"    {name:<22} not reached")
            continue
        seconds = (steps + 1) * ms / 1e3
        tts[name] = seconds
        print(f"    {name:<22} {steps + 1:>4} steps  {seconds:8.2f} s  {naive_tts / seconds:7.1f}x")
    print(f"    (power solver objective after {args.power_steps} steps: {power_curve[-1]:.4g})")

    # (e) diversity with orthogonality on: AMSGrad vs power, same K, same init
    kd = args.diversity_vectors
    div_cfg: dict[str, Any] = dict(**base, n_vectors=kd, orthogonal="simultaneous")
    slow = train_steering_vectors(
        model, prompts, MelboConfig(**div_cfg, steps=args.naive_steps), progress=False
    )
    fast = train_steering_vectors(
        model,
        prompts,
        MelboConfig(**div_cfg, steps=args.power_steps, solver="power"),
        progress=False,
    )
    segment = Segment(model, source, target, prompts)
    div = {}
    print(f"\n(e) {kd} vectors, simultaneous orthogonality:")
    for name, sv in (("AMSGrad", slow), ("power", fast)):
        sim = delta_similarity(segment, sv.vectors)
        div[name] = {
            "objectives": sv.record("objective").tolist(),
            "delta_abs_cos": sim,
            "seconds": sv.metadata["train_seconds"],
        }
        objs = ", ".join(f"{v:.3g}" for v in sv.record("objective").tolist())
        print(
            f"    {name:<8} {sv.metadata['train_seconds']:7.1f} s  objectives [{objs}]  "
            f"mean |cos| of target deltas {sim:.3f}"
        )

    # (f) time to N orthogonal vectors: the default config vs the previous default
    slots = time_to_vectors(model, prompts, base, args, naive_ms, segment)
    # (g) vector 0 on a model with a planted direction behind a threshold
    planted = planted_vector_0(seeds=range(2 if args.quick else 5))

    result = {
        "model": cfg.model_name,
        "source": source.name,
        "target": target.name,
        "radius": args.radius,
        "prompt_tokens": n_tok,
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": str(dtype),
        "matmul_gflops": peak / 1e9,
        "naive_ms_per_vector_step": naive_ms,
        "one_vector_ms_per_vector_step": one_ms,
        "batched_vectors": k,
        "batched_ms_per_vector_step": k_ms,
        "speedup_batched_vs_naive": naive_ms / k_ms,
        "achieved_gflops": achieved / 1e9,
        "fraction_of_matmul": achieved / peak,
        "naive_final_objective": target_value,
        "melbo_lens_final_objective": one_curve[-1],
        "time_to_solution_s": tts,
        "diversity": div,
        "time_to_vectors": slots,
        "planted_vector_0": planted,
        "peak_memory_mb": _peak_mb(device),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    print(f"\nresults -> {out / 'bench.json'}")
    return result


# ---------------------------------------------------------------------- adapters
def adapters_benchmark(
    model_name: str = "smollm2-135m-instruct",
    k: int = 8,
    steps: int = 5,
    threads: int | None = None,
    *,
    source_layer: int = 7,
    target: str = "blocks.22.hook_resid_pre",
    rank: int = 1,
    radius: float = 4.0,
) -> dict[str, Any]:
    """Steering adapters trained K at a time vs one at a time, same adapter-steps.

    Both runs use the same seeds, so their objective curves must agree; only the
    execution differs (K × prompts rows in one pass vs K passes of the prompts).
    Returns and prints ms per adapter-step of each and the ratio.
    """
    from dataclasses import replace

    from melbo_lens.core.prompts import PromptSet, bundled_prompts
    from melbo_lens.core.sites import HookSite
    from melbo_lens.methods.adapters import AdapterConfig, train_steering_adapters
    from melbo_lens.models.zoo import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_name)
    prompts = PromptSet.coerce(model, bundled_prompts("demo"), chat=True)
    base = AdapterConfig(
        source_layer,
        HookSite.parse(target),
        n_adapters=k,
        rank=rank,
        radius=radius,
        steps=steps,
        orthogonal="none",
    )
    # warm-up (allocator, kernels), not timed
    train_steering_adapters(model, prompts, replace(base, n_adapters=1, steps=1), progress=False)
    together = train_steering_adapters(model, prompts, base, progress=False)
    alone = train_steering_adapters(
        model, prompts, replace(base, adapters_per_batch=1), progress=False
    )
    adapter_steps = k * steps
    together_ms = 1e3 * together.metadata["train_seconds"] / adapter_steps
    alone_ms = 1e3 * alone.metadata["train_seconds"] / adapter_steps
    curves_differ = float(
        (
            (together.record("losses") - alone.record("losses")).abs()
            / alone.record("losses").abs().clamp_min(1e-12)
        ).max()
    )
    n_tok = int(prompts.attention_mask.sum())
    print(
        f"adapters on {model.cfg.model_name}: block {source_layer} MLP -> {target}, rank "
        f"{rank}, R {radius}, prompt {n_tok} tokens, {torch.get_num_threads()} threads, "
        f"{k} adapters x {steps} steps\n"
        f"  one at a time : {alone_ms:8.1f} ms per adapter-step\n"
        f"  {k} together  : {together_ms:8.1f} ms per adapter-step\n"
        f"  ratio (one at a time / together): {alone_ms / together_ms:.2f}x; objective "
        f"curves agree to {curves_differ:.1e} (relative)"
    )
    return {
        "model": model.cfg.model_name,
        "source_layer": source_layer,
        "target": target,
        "rank": rank,
        "radius": radius,
        "k": k,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "prompt_tokens": n_tok,
        "one_at_a_time_ms_per_adapter_step": alone_ms,
        "together_ms_per_adapter_step": together_ms,
        "ratio": alone_ms / together_ms,
        "max_relative_curve_difference": curves_differ,
        "final_objectives": together.record("objective").tolist(),
    }
