"""Feature dashboards sharded over the sweeps' executors, for corpora beyond one machine.

The corpus stream is cut into `shards` row ranges; each runs `feature_dashboards(...,
shard=(i, n))` (on this process one after another with `executor="local"`, or as tasks on
Ray actors that each load the model once with `executor="ray"`), and the driver merges
the shard states (`merge_dashboard_states`: top-k, hash samples and histograms merge
exactly) and finishes them once. The result equals one pass over the whole corpus.

Examples:
    >>> dash = sharded_dashboards(lambda: model, sae, ["a cat sat"] * 6, shards=3,
    ...                           latents=[0, 1], ctx=8, progress=False)
    >>> dash.latents
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from melbo_lens.core.host import Host
from melbo_lens.core.progress import say

__all__ = ["sharded_dashboards"]


def _shard(sae: Any, corpus: Any, options: dict[str, Any], model: Host, shard: tuple[int, int]):
    from melbo_lens.analysis.sae import load_sae
    from melbo_lens.analysis.sae.dashboards import dashboard_shard

    return dashboard_shard(model, load_sae(sae), corpus, shard, **options)


def sharded_dashboards(
    model_loader: Callable[[], Any],
    sae: Any,
    corpus: Any,
    *,
    shards: int,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_retries: int = 2,
    latents: Sequence[int] | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    k: int = 20,
    n_sample: int = 32,
    corr_every: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> Any:
    """Dashboards of `sae` over `corpus` in `shards` parts (see the module docstring).

    `sae` is an SAE object or what `load_sae` takes (a name or folder: under Ray each
    worker loads it); `corpus` anything `load_corpus` takes. `model_loader()` returns the
    model (on every Ray worker, and once here to finish).

    Args:
        model_loader: Returns the model; called on every worker and once here.
        sae: An SAE, or what `load_sae` takes.
        corpus: What `load_corpus` takes.
        shards: Parts the corpus is split into, one task each.
        executor: `"local"` (this process, in turn) or `"ray"`.
        address: A Ray cluster address (default: a local Ray).
        workers: Tasks run at once.
        num_cpus: CPUs per Ray task.
        num_gpus: GPUs per Ray task.
        max_retries: Ray retries of a failed shard.
        latents: The latents shown (default: all).
        max_tokens: Corpus tokens read (default: all).
        ctx: Tokens per corpus row.
        k: Top activations kept per latent.
        n_sample: Activations sampled across quantile bands per latent.
        corr_every: Tokens between samples for the latent correlations.
        batch_size: Rows per forward pass.
        progress: Show progress.

    Returns:
        The merged `FeatureDashboards`, equal to one pass over the whole corpus.

    Raises:
        ValueError: `shards` < 1 or `executor` is not `"local"` / `"ray"`.
    """
    from melbo_lens.analysis.sae import load_sae
    from melbo_lens.analysis.sae.dashboards import (
        finish_dashboards,
        merge_dashboard_states,
        prepare_pass,
        stamp,
    )

    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    model, sae_obj = model_loader(), load_sae(sae)
    options: dict[str, Any] = dict(
        latents=latents,
        max_tokens=max_tokens,
        ctx=ctx,
        k=k,
        n_sample=n_sample,
        corr_every=corr_every,
        batch_size=batch_size,
    )
    c, settings, rows = prepare_pass(model, sae_obj, corpus, **options)  # checked once, here
    options["ctx"] = settings.ctx
    parts = [(i, shards) for i in range(shards)]
    work = partial(_shard, sae, c, options)
    if executor == "local":
        states = [work(model, part) for part in parts]
    else:
        from melbo_lens.workflows.sweeps_ray import map_on_ray

        states = list(
            map_on_ray(work, parts, model_loader, address, workers, num_cpus, num_gpus, max_retries)
        )
    dash = finish_dashboards(model, sae_obj, merge_dashboard_states(states), rows, settings)
    stamp(dash, model, sae_obj, c, settings)
    dash.info.update(shards=shards, executor=executor)
    say(progress, f"  dashboards: {shards} shards ({executor}) merged: {dash!r}")
    return dash
