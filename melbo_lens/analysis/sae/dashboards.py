"""Feature dashboards: what an SAE latent means, read off a corpus in one streamed pass.

A dashboard is the card of a latent (DESIGN.md), laid out as SAEDashboard / sae_vis lay
theirs out, so a user of those is at home:

* **top activations** and **quantile bands**: the corpus tokens where the latent is
  highest, then a uniform sample of where it is active cut into equal-count bands by
  activation, each shown with `left` tokens of left and `right` of right context;
* the **activation histogram** (fixed log-spaced bins) and **firing density** (the share
  of corpus tokens where it is active);
* **logit effects**: the latent's decoder direction through the unembedding, top and
  bottom tokens and their histogram (`logit_effects`);
* **correlated latents**: Pearson correlation of activations over a fixed hash-chosen
  sample of one token in `corr_every`.

`feature_dashboards` runs the model to the SAE's hook only, encodes with sae-lens's own
`encode`, and keeps per-latent state in `TopScores` (bounded memory, no activations
stored). Position 0 of every row (the attention sink) is left out, as in the packaged
SAEs' training. The pass is chunked, shows a progress bar, and with `cache=True` saves
its state every `save_every` rows and its result under a key of (model, SAE, corpus,
settings), so a stopped pass resumes and a finished one is read back. `dashboard_shard`
runs one of n row ranges and returns its state (`dashboard_state`);
`merge_dashboard_states` + `finish_dashboards` (`dashboard_finish`) turn shard states
into exactly the dashboards of one pass.

Why one module over ~400 lines: the streamed pass and its resumable, mergeable shard
state are one algorithm; the finishing step and the result live in `dashboard_finish`
and `dashboard_result`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from melbo_lens.analysis.corpus import Corpus, load_corpus
from melbo_lens.analysis.sae.dashboard_finish import finish_dashboards, logit_effects
from melbo_lens.analysis.sae.dashboard_result import FORMAT, FeatureDashboards, sae_digest
from melbo_lens.analysis.sae.dashboard_state import DashboardState, merge_dashboard_states
from melbo_lens.analysis.sae.loading import sae_site, warn_unfolded
from melbo_lens.analysis.streaming import TopScores, hash_priority
from melbo_lens.core.host import Host
from melbo_lens.core.io import atomic_save_tensors, atomic_write_text, read_artifact
from melbo_lens.core.segment import run_to_site
from melbo_lens.core.sites import require_hook

__all__ = [
    "DashboardState",
    "check_sae_fits",
    "dashboard_shard",
    "prepare_pass",
    "stamp",
    "feature_dashboards",
    "finish_dashboards",
    "logit_effects",
    "merge_dashboard_states",
]

STATE_FORMAT = "melbo_lens.feature_dashboards_state/1"


# ---------------------------------------------------------------------- checks
def check_sae_fits(model: Host, sae: SAE, *, allow_model_mismatch: bool = False) -> None:
    """An error naming the mismatch if `sae` was not made for `model` (width, hook, name)."""
    d_model = int(model.cfg.d_model)
    if int(sae.cfg.d_in) != d_model:
        raise ValueError(
            f"the SAE reads d_in={sae.cfg.d_in} but the model's d_model is {d_model}: it was "
            "trained on another model; load an SAE for this model"
        )
    require_hook(model, sae_site(sae))
    mine = getattr(model.cfg, "model_name", None)
    theirs = getattr(getattr(sae.cfg, "metadata", None), "model_name", None)
    if mine == "custom":  # a model built from a config has no name to compare
        return
    if not allow_model_mismatch and mine and theirs and _norm(mine) != _norm(theirs):
        raise ValueError(
            f"the SAE was trained on model {theirs!r} but this model is {mine!r}; load the "
            "SAE made for this model, or pass allow_model_mismatch=True if they are the same"
        )


def _norm(name: str) -> str:
    return name.split("/")[-1].lower()


def _model_digest(model: Host) -> str:
    h = hashlib.sha256()
    for t in (model.W_U[:, :256], model.W_E[:256]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{h.hexdigest()[:16]}-{model.cfg.model_name}"


@dataclass(frozen=True)
class _Settings:
    ctx: int
    max_tokens: int | None
    latents: tuple[int, ...] | None
    k: int
    n_sample: int
    corr_every: int
    split: str | None

    def key(self, model: Host, sae: SAE, corpus: Corpus) -> str:
        parts = [
            FORMAT,
            _model_digest(model),
            sae_digest(sae),
            corpus.sha256,
            json.dumps(self.__dict__, sort_keys=True),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------- the pass
def _run_rows(
    model: Host,
    sae: SAE,
    rows: Tensor,
    span: tuple[int, int],
    cols: Tensor | None,
    settings: _Settings,
    state: DashboardState,
    batch_size: int,
    on_batch: Any,
) -> None:
    site = sae_site(sae).name
    ctx = rows.shape[1]
    dev = next(iter(model.parameters())).device
    for start in range(span[0], span[1], batch_size):
        stop = min(start + batch_size, span[1])
        batch = rows[start:stop].to(dev)
        with torch.no_grad():
            x = run_to_site(model, batch, torch.ones_like(batch, dtype=torch.bool), site)
            x = x[:, 1:].reshape(-1, x.shape[-1])  # position 0 (attention sink) left out
            f = sae.encode(x.to(sae.W_enc.dtype)).float().cpu()
        locs = (torch.arange(start, stop)[:, None] * ctx + torch.arange(1, ctx)).flatten()
        state.scores.update(f[:, cols] if cols is not None else f, locs)
        pick = hash_priority(locs, torch.zeros_like(locs)) % settings.corr_every == 0
        if pick.any():
            sub = f[pick]
            r, c = torch.nonzero(sub > 0, as_tuple=True)
            offset = len(state.corr_rows)
            state.corr_rows = torch.cat([state.corr_rows, locs[pick]])
            state.corr_index = torch.cat([state.corr_index, torch.stack([r + offset, c], 1)])
            state.corr_values = torch.cat([state.corr_values, sub[r, c]])
        on_batch(stop)


def prepare_pass(
    model: Host,
    sae: SAE,
    corpus: Any,
    *,
    latents: Sequence[int] | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    split: str | None = None,
    k: int = 20,
    n_sample: int = 32,
    corr_every: int = 64,
    batch_size: int = 16,
    allow_model_mismatch: bool = False,
) -> tuple[Corpus, _Settings, Tensor]:
    """Check a pass's inputs (each bad one named) and return (corpus, settings, token rows)."""
    check_sae_fits(model, sae, allow_model_mismatch=allow_model_mismatch)
    warn_unfolded(sae)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if ctx is None:
        ctx = min(128, n_ctx) if isinstance(n_ctx, int) else 128
    if isinstance(n_ctx, int) and ctx > n_ctx:
        raise ValueError(f"ctx={ctx} is longer than the model's context n_ctx={n_ctx}")
    c = load_corpus(corpus)
    if split is not None:
        c = c.split(split)
    d_sae = int(sae.cfg.d_sae)
    if latents is not None:
        bad = [f for f in latents if isinstance(f, bool) or not 0 <= int(f) < d_sae]
        if bad or not latents:
            raise ValueError(
                f"latents {bad or '[]'} out of range: the SAE has {d_sae} latents (0..{d_sae - 1})"
            )
    for name, value, low in (
        ("k", k, 1),
        ("n_sample", n_sample, 0),
        ("corr_every", corr_every, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    settings = _Settings(
        ctx,
        max_tokens,
        None if latents is None else tuple(int(f) for f in latents),
        k,
        n_sample,
        corr_every,
        split,
    )
    rows = c.token_rows(model.tokenizer, settings.ctx, max_tokens=max_tokens)
    return c, settings, rows


def stamp(
    dash: FeatureDashboards, model: Host, sae: SAE, corpus: Corpus, settings: _Settings
) -> None:
    """Record where dashboards came from: the corpus, its digest and the cache key."""
    dash.info.update(
        corpus=corpus.name, corpus_sha256=corpus.sha256, key=settings.key(model, sae, corpus)
    )


def feature_dashboards(
    model: Host,
    sae: SAE,
    corpus: Corpus | str | os.PathLike[str] | Sequence[str] = "melbo-chat-prose",
    *,
    latents: Sequence[int] | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    split: str | None = None,
    k: int = 20,
    n_sample: int = 32,
    corr_every: int = 64,
    n_correlated: int = 5,
    n_logits: int = 10,
    batch_size: int = 16,
    left: int = 10,
    right: int = 5,
    cache: bool | str | os.PathLike[str] = True,
    save_every: int = 256,
    allow_model_mismatch: bool = False,
    progress: bool = True,
) -> FeatureDashboards:
    """Dashboards of `latents` (default: all) of `sae` over `corpus` (see the module docstring).

    Rows are `ctx` tokens (default: 128, or the model's context if shorter). `max_tokens`
    caps the corpus stream; `split` picks ``"train"``/``"heldout"`` (None: all).
    `cache=True` keeps state and result under the melbo_lens cache (a path: there; False:
    nowhere). `dashboard_shard` runs one part of the rows, for `merge_dashboard_states`.

    Args:
        model: the model the SAE reads (run to the SAE's hook only).
        sae: a sae-lens SAE.
        corpus: a packaged corpus name, a `Corpus`, a folder of text, or texts.
        latents: the latents to build dashboards for (default: all).
        max_tokens: cap on the corpus tokens streamed.
        ctx: tokens per row (default 128, or the model's context if shorter).
        split: "train" or "heldout" part of a packaged corpus (None: all).
        k: top activations kept per latent.
        n_sample: activations sampled per latent for the quantile bands.
        corr_every: one token in this many enters the correlation sample.
        n_correlated: correlated latents listed per latent.
        n_logits: top and bottom tokens of each latent's logit effect.
        batch_size: rows per forward pass.
        left: tokens of left context shown around an activation.
        right: tokens of right context.
        cache: True keeps state and result in the melbo_lens cache, a path keeps them
            there, False nowhere.
        save_every: rows between saved states (with a cache).
        allow_model_mismatch: build dashboards for an SAE trained on another model.
        progress: show a progress bar.

    Returns:
        `FeatureDashboards`, one `FeatureDashboard` per latent by `dash[latent]`.

    Raises:
        ValueError: an SAE that does not fit the model, or bad settings, each named.

    Examples:
        >>> dash = feature_dashboards(model, sae, ["the cat sat on the mat"] * 4, ctx=8,
        ...                           latents=[0, 1], cache=False, progress=False)
        >>> len(dash), dash.latents
        (2, [0, 1])
    """
    out = _dashboard_pass(**locals(), shard=None)
    assert isinstance(out, FeatureDashboards)  # a whole pass is finished
    return out


def dashboard_shard(
    model: Host,
    sae: SAE,
    corpus: Corpus | str | os.PathLike[str] | Sequence[str],
    shard: tuple[int, int],
    **options: Any,
) -> DashboardState:
    """The raw state of rows i/n..(i+1)/n of `feature_dashboards`'s pass, `shard=(i, n)`
    (same options; nothing is cached): merge the shards with `merge_dashboard_states`,
    then `finish_dashboards` (`workflows.dashboards.sharded_dashboards` does both).

    Examples:
        >>> parts = [dashboard_shard(model, sae, ["a cat sat"] * 4, (i, 2), ctx=8)
        ...          for i in range(2)]
        >>> merge_dashboard_states(parts).scores.n_tokens  # 5 rows of 8, position 0 left out
        35
    """
    options = {"cache": False, "progress": False, **options}
    out = _dashboard_pass(model, sae, corpus, shard=shard, **options)
    assert isinstance(out, DashboardState)
    return out


def _dashboard_pass(
    model: Host,
    sae: SAE,
    corpus: Any,
    *,
    latents: Sequence[int] | None = None,
    max_tokens: int | None = None,
    ctx: int | None = None,
    split: str | None = None,
    k: int = 20,
    n_sample: int = 32,
    corr_every: int = 64,
    n_correlated: int = 5,
    n_logits: int = 10,
    batch_size: int = 16,
    left: int = 10,
    right: int = 5,
    cache: bool | str | os.PathLike[str] = True,
    save_every: int = 256,
    shard: tuple[int, int] | None = None,
    allow_model_mismatch: bool = False,
    progress: bool = True,
) -> FeatureDashboards | DashboardState:
    c, settings, rows = prepare_pass(
        model,
        sae,
        corpus,
        latents=latents,
        max_tokens=max_tokens,
        ctx=ctx,
        split=split,
        k=k,
        n_sample=n_sample,
        corr_every=corr_every,
        batch_size=batch_size,
        allow_model_mismatch=allow_model_mismatch,
    )
    d_sae = int(sae.cfg.d_sae)
    n_rows = len(rows)
    span = (0, n_rows) if shard is None else _shard_span(shard, n_rows)
    folder = _cache_folder(cache, settings.key(model, sae, c))
    if folder is not None and shard is None and (folder / "dashboards.json").is_file():
        return FeatureDashboards.load(folder, sae=sae)
    cols = None if latents is None else torch.tensor(settings.latents)
    n_cols = d_sae if cols is None else len(cols)
    state = _resume(folder, span) or DashboardState(
        TopScores(n_cols, k=k, n_sample=n_sample),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0),
    )
    begin = state.rows_done[-1][1] if state.rows_done else span[0]
    t0 = time.perf_counter()
    bar = tqdm(
        total=span[1] - span[0],
        initial=begin - span[0],
        desc="dashboards (rows)",
        disable=not progress,
    )
    last_save = [begin]

    def on_batch(stop: int) -> None:
        bar.update(stop - bar.n - span[0])
        state.rows_done = [(span[0], stop)]
        if folder is not None and stop - last_save[0] >= save_every and stop < span[1]:
            _save_state(folder, state, span)
            last_save[0] = stop

    try:
        _run_rows(model, sae, rows, (begin, span[1]), cols, settings, state, batch_size, on_batch)
    finally:
        bar.close()
    state.rows_done = [span]
    if shard is not None:
        return state
    dash = finish_dashboards(
        model,
        sae,
        state,
        rows,
        settings,
        n_correlated=n_correlated,
        n_logits=n_logits,
        left=left,
        right=right,
    )
    stamp(dash, model, sae, c, settings)
    dash.info["seconds"] = round(time.perf_counter() - t0, 1)
    if folder is not None:
        dash.save(folder)
        (folder / "state.safetensors").unlink(missing_ok=True)
        (folder / "state.json").unlink(missing_ok=True)
    return dash


def _shard_span(shard: tuple[int, int], n_rows: int) -> tuple[int, int]:
    i, n = shard
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return (i * n_rows // n, (i + 1) * n_rows // n)


def _cache_folder(cache: bool | str | os.PathLike[str], key: str) -> Path | None:
    if cache is False:
        return None
    if cache is True:
        from melbo_lens.models.cache import default_cache_dir

        return default_cache_dir() / "dashboards" / key
    return Path(cache)


def _save_state(folder: Path, state: DashboardState, span: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(
        state.state_dict(), folder / "state.safetensors", {"format": STATE_FORMAT, "json": "{}"}
    )
    atomic_write_text(
        folder / "state.json", json.dumps({"span": span, "rows_done": state.rows_done})
    )


def _resume(folder: Path | None, span: tuple[int, int]) -> DashboardState | None:
    if folder is None or not (folder / "state.json").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text())
    if tuple(meta["span"]) != span:
        return None
    tensors, _ = read_artifact(folder / "state.safetensors", STATE_FORMAT)
    return DashboardState.from_state_dict(tensors, meta["rows_done"])
