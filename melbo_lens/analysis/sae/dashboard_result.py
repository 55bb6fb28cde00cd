"""The result of a dashboard pass: per-latent contexts, histograms, logit effects and
correlations (`FeatureDashboards`), one latent's view of it (`FeatureDashboard`), and
its files (safetensors for the tensors, JSON for the rest; never a pickle).

Field names follow SAEDashboard / sae_vis where they have one: ``top_activations``,
``quantile_bands``, ``frac_nonzero`` (firing density), ``logits_top``/``logits_bottom``,
``correlated_features``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from melbo_lens.analysis.streaming import HIST_EDGES, Context, windows_of
from melbo_lens.core.io import ArtifactError, atomic_save_tensors, atomic_write_text, read_artifact

__all__ = ["Context", "FeatureDashboard", "FeatureDashboards", "sae_digest", "windows_of"]

FORMAT = "melbo_lens.feature_dashboards/1"
_TENSORS = (
    "top_values",
    "top_locations",
    "top_windows",
    "sample_values",
    "sample_locations",
    "sample_windows",
    "hist",
    "active",
    "total",
    "logit_top_ids",
    "logit_top",
    "logit_bottom_ids",
    "logit_bottom",
    "logit_hist",
    "logit_range",
    "corr_ids",
    "corr_values",
)


def sae_digest(sae: Any) -> str:
    """A short digest of an SAE's encoder and decoder weights (what a cache is keyed on)."""
    h = hashlib.sha256()
    for t in (sae.W_dec, sae.W_enc, sae.b_enc):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _distinct(windows: Tensor, values: list[float]) -> list[tuple[Tensor, float]]:
    """(window, value) pairs, each window's text once (a repeated system prompt would
    otherwise fill the list)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for w, v in zip(windows, values, strict=True):
        key = tuple(w.tolist())
        if key not in seen:
            seen.add(key)
            out.append((w, v))
    return out


@dataclass
class FeatureDashboard:
    """One latent's dashboard, as plain data (what a view renders)."""

    latent: int
    frac_nonzero: float
    max_activation: float
    mean_activation: float
    top_activations: list[Context]
    quantile_bands: list[tuple[str, list[Context]]]
    histogram: list[tuple[float, float, int]]  # (low, high, count) of active tokens
    logits_top: list[tuple[str, float]]
    logits_bottom: list[tuple[str, float]]
    logit_histogram: tuple[float, float, list[int]]
    correlated_features: list[tuple[int, float]]

    def summary(self) -> str:
        top = self.top_activations[0].text() if self.top_activations else "(never active)"
        ups = ", ".join(repr(t) for t, _ in self.logits_top[:5])
        return f"latent {self.latent}: density {self.frac_nonzero:.2%}; top {top}; promotes {ups}"


@dataclass
class FeatureDashboards:
    """Dashboards of `latents`; tensors are per latent in that order (see the module doc).

    Attributes:
        latents: The latents shown, in the order of every tensor's first dimension.
        n_tokens: Corpus tokens the pass read.
        top_values: Largest activations per latent, descending.
        top_locations: (document, position) of each top activation.
        top_windows: Token ids of the context window around each top activation.
        sample_values: Activations sampled across the quantile bands (sae_vis's
            `quantile_bands`).
        sample_locations: (document, position) of each sampled activation.
        sample_windows: Token ids of the window around each sampled activation.
        hist: Histogram of positive activations per latent (bins `HIST_EDGES`).
        active: Tokens on which each latent fired.
        total: Tokens seen per latent (`active / total` is the firing density).
        logit_top_ids: Tokens each latent's decoder direction promotes most.
        logit_top: Their direct logit effects.
        logit_bottom_ids: Tokens it suppresses most.
        logit_bottom: Their direct logit effects.
        logit_hist: Histogram of the direct logit effects over the vocabulary.
        logit_range: (min, max) of those effects, the histogram's range.
        corr_ids: The latents most correlated with each latent's activation.
        corr_values: Their Pearson correlations.
        token_strings: Decoded text of every token id the windows hold.
        left: Tokens of context before the activating token in each window.
        right: Tokens of context after it.
        info: Provenance: model, SAE digest, corpus name and settings.
    """

    latents: list[int]
    n_tokens: int
    top_values: Tensor
    top_locations: Tensor
    top_windows: Tensor
    sample_values: Tensor
    sample_locations: Tensor
    sample_windows: Tensor
    hist: Tensor
    active: Tensor
    total: Tensor
    logit_top_ids: Tensor
    logit_top: Tensor
    logit_bottom_ids: Tensor
    logit_bottom: Tensor
    logit_hist: Tensor
    logit_range: Tensor
    corr_ids: Tensor
    corr_values: Tensor
    token_strings: dict[int, str]
    left: int
    right: int
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.latents)

    def __contains__(self, latent: object) -> bool:
        return latent in self._row

    @property
    def _row(self) -> dict[int, int]:
        return {f: i for i, f in enumerate(self.latents)}

    def __repr__(self) -> str:
        return (
            f"FeatureDashboards({len(self)} latents of {self.info.get('sae_hook')}, "
            f"{self.n_tokens:,} tokens of {self.info.get('corpus')!r})"
        )

    # ------------------------------------------------------------------ views
    def _str(self, i: Any) -> str:
        return self.token_strings.get(int(i), f"<{int(i)}>")

    def _context(self, window: Tensor, value: float) -> Context:
        ids = window.tolist()
        show = [self._str(i) if i >= 0 else "" for i in ids]
        return Context(show[: self.left], show[self.left], show[self.left + 1 :], float(value))

    def __getitem__(self, latent: int) -> FeatureDashboard:
        if latent not in self._row:
            shown = self.latents if len(self.latents) <= 12 else f"{len(self.latents)} latents"
            raise KeyError(f"latent {latent} has no dashboard here (this holds {shown})")
        i = self._row[latent]
        top = [
            self._context(w, v)
            for w, v in _distinct(self.top_windows[i], self.top_values[i].tolist())
            if v > -math.inf
        ]
        active = int(self.active[i])
        return FeatureDashboard(
            latent=latent,
            frac_nonzero=active / max(self.n_tokens, 1),
            max_activation=float(self.top_values[i, 0]) if top else 0.0,
            mean_activation=float(self.total[i]) / active if active else 0.0,
            top_activations=top,
            quantile_bands=self._bands(i),
            histogram=self._histogram(i),
            logits_top=[
                (self._str(t), float(v))
                for t, v in zip(self.logit_top_ids[i], self.logit_top[i], strict=True)
            ],
            logits_bottom=[
                (self._str(t), float(v))
                for t, v in zip(self.logit_bottom_ids[i], self.logit_bottom[i], strict=True)
            ],
            logit_histogram=(
                float(self.logit_range[i, 0]),
                float(self.logit_range[i, 1]),
                self.logit_hist[i].tolist(),
            ),
            correlated_features=[
                (int(f), float(v))
                for f, v in zip(self.corr_ids[i], self.corr_values[i], strict=True)
                if f >= 0
            ],
        )

    def _bands(
        self, i: int, n_bands: int = 4, per_band: int = 4
    ) -> list[tuple[str, list[Context]]]:
        """The hash sample (highest first) cut into `n_bands` equal-count bands."""
        real = int((self.sample_locations[i] >= 0).sum())
        out = []
        for b in range(n_bands):
            lo, hi = b * real // n_bands, (b + 1) * real // n_bands
            if hi <= lo:
                continue
            vals = self.sample_values[i, lo:hi]
            span = f"{float(vals.min()):.3g}–{float(vals.max()):.3g}"
            label = f"quantile {1 - hi / real:.0%}–{1 - lo / real:.0%}: {span}"
            pairs = _distinct(self.sample_windows[i, lo:hi], vals.tolist())
            ctxs = [self._context(w, v) for w, v in pairs[:per_band]]
            out.append((label, ctxs))
        return out

    def _histogram(self, i: int) -> list[tuple[float, float, int]]:
        edges = [0.0, *HIST_EDGES.tolist(), math.inf]
        return [(edges[b], edges[b + 1], int(c)) for b, c in enumerate(self.hist[i].tolist()) if c]

    def to_pandas(self) -> Any:
        """One row per latent: density, max and mean activation, top context, logit effects,
        correlated latents."""
        import pandas as pd

        rows = []
        for f in self.latents:
            d = self[f]
            rows.append(
                {
                    "latent": f,
                    "frac_nonzero": d.frac_nonzero,
                    "max_activation": d.max_activation,
                    "mean_activation": d.mean_activation,
                    "top_context": d.top_activations[0].text() if d.top_activations else None,
                    "logits_top": [t for t, _ in d.logits_top],
                    "logits_bottom": [t for t, _ in d.logits_bottom],
                    "correlated_features": [c for c, _ in d.correlated_features],
                }
            )
        return pd.DataFrame(rows).set_index("latent")

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """`folder/dashboards.safetensors` then `folder/dashboards.json` (last), atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name) for name in _TENSORS}
        tensors["latents"] = torch.tensor(self.latents, dtype=torch.long)
        atomic_save_tensors(
            tensors, folder / "dashboards.safetensors", {"format": FORMAT, "json": "{}"}
        )
        data = {
            "format": FORMAT,
            "n_tokens": self.n_tokens,
            "left": self.left,
            "right": self.right,
            "token_strings": {str(k): v for k, v in self.token_strings.items()},
            "info": self.info,
        }
        return atomic_write_text(folder / "dashboards.json", json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, sae: Any = None) -> FeatureDashboards:
        """Read what `save` wrote; with `sae`, refuse dashboards made for another SAE."""
        folder = Path(folder)
        path = folder / "dashboards.json"
        if not path.is_file():
            raise FileNotFoundError(f"no dashboards in {folder} (expected dashboards.json)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path} is not valid JSON ({err})") from err
        if data.get("format") != FORMAT:
            raise ArtifactError(
                f"{path} is not melbo_lens feature dashboards (format {data.get('format')!r})"
            )
        if sae is not None and data["info"].get("sae_sha") != sae_digest(sae):
            raise ArtifactError(
                f"the dashboards in {folder} were made for another SAE (hook "
                f"{data['info'].get('sae_hook')!r}, digest {data['info'].get('sae_sha')}); "
                "recompute them for this SAE or pass the SAE they belong to"
            )
        tensors, _ = read_artifact(folder / "dashboards.safetensors", FORMAT)
        return cls(
            latents=[int(x) for x in tensors.pop("latents")],
            n_tokens=int(data["n_tokens"]),
            token_strings={int(k): v for k, v in data["token_strings"].items()},
            left=int(data["left"]),
            right=int(data["right"]),
            info=dict(data["info"]),
            **{name: tensors[name] for name in _TENSORS},
        )
