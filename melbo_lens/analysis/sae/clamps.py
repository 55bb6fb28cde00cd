"""SAE-feature clamps: set one latent to a value at the SAE's site and keep the SAE's
error term, as a perturbation (`FeatureClamp`, one clamp per member, for `generate`,
`apply` and every other consumer) or as a context manager (`clamp_feature`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from melbo_lens.analysis.sae.loading import sae_site, warn_unfolded
from melbo_lens.core.host import Host
from melbo_lens.core.sites import HookSite, require_hook
from melbo_lens.perturbations.base import apply, pick_members, row_members

__all__ = ["FeatureClamp", "clamp_feature"]


@dataclass
class FeatureClamp:
    """SAE-feature clamps as a `Perturbation`: member k sets feature `features[k]` of `sae`
    to `values[k]` at the SAE's site, keeping the SAE's error term.

    At every position: f = encode(x), f' = f with f'[feature] = value, and
    x' = x + decode(f') − decode(f), so the reconstruction error (and every other
    feature) stays as it was; `scale` blends x + scale·(x' − x). Rows whose member is None
    are untouched.

    Args:
        sae: A sae-lens `SAE`; its site (`cfg.metadata.hook_name`) is where the clamp acts.
        features: The latent each member clamps.
        values: The value each member sets its latent to, in activation units.

    Examples:
        >>> clamps = FeatureClamp(sae, [3, 7], [10.0, 0.0])
        >>> gens = generate(model, clamps, "tell me a story", max_new_tokens=4)
        >>> len(gens.steered)
        2
    """

    sae: Any
    features: Sequence[int]
    values: Sequence[float] | Tensor

    def __post_init__(self) -> None:
        d_sae = int(self.sae.cfg.d_sae)
        self.features = [int(f) for f in _check_features(self.features, d_sae)]
        values = torch.as_tensor(self.values, dtype=torch.float32)
        if values.ndim == 0 and len(self.features) != 1:
            values = values.expand(len(self.features))
        if values.ndim == 0:
            values = values[None]
        if values.shape[:1] != (len(self.features),):
            raise ValueError(
                f"one value per feature: {len(self.features)} features, values "
                f"{tuple(values.shape)}"
            )
        self.values = values

    @property
    def site(self) -> HookSite:
        return sae_site(self.sae)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int | slice | Sequence[int]) -> FeatureClamp:
        idx = torch.arange(len(self))[[index] if isinstance(index, int) else index]
        values = torch.as_tensor(self.values)[idx]
        return FeatureClamp(self.sae, [self.features[int(i)] for i in idx], values)

    def hooks(self, model: Host, rows: Any, scale: float = 1.0) -> list[tuple[str, Any]]:
        site = require_hook(model, self.site)
        warn_unfolded(self.sae)
        d_model = int(model.cfg.d_model)
        if int(self.sae.cfg.d_in) != d_model:
            raise ValueError(
                f"the SAE reads d_in={self.sae.cfg.d_in} but the model has d_model={d_model}; "
                "use an SAE trained on this model"
            )
        members = row_members(rows, len(self), "feature clamp")
        sae, feats = self.sae, torch.tensor(self.features)
        values = torch.as_tensor(self.values)

        if isinstance(rows, int):  # one clamp on every row; its value may vary by position
            feature, value = int(feats[members[0]]), values[members[0]]

            def hook(act: Tensor, hook: Any = None) -> Tensor:
                both = torch.stack([act, act])  # one encode/decode: per-token norms agree
                f = sae.encode(both).clone()
                target = value.to(dtype=f.dtype, device=f.device)
                f[1, ..., feature] = target.expand(f.shape[1:-1])
                out = sae.decode(f)
                return act + (scale * (out[1] - out[0])).to(act.dtype)

            return [(site.name, hook)]

        if values.ndim != 1:
            raise ValueError("per-row feature clamps take one number per feature")
        on = pick_members(torch.ones(len(self)), members).bool()
        feat_rows = pick_members(feats, members)
        value_rows = pick_members(values, members)

        def per_row(act: Tensor, hook: Any = None) -> Tensor:
            b, g = act.shape[0], feat_rows.shape[0]
            if b % g:
                raise ValueError(
                    f"{g} per-row clamps for a batch of {b} rows; the batch must hold a "
                    "whole number of rows per member"
                )
            both = torch.stack([act, act])
            f = sae.encode(both).clone()
            gate = on.repeat_interleave(b // g).to(f.device)
            rows_ = torch.arange(b, device=f.device)[gate]
            idx = feat_rows.repeat_interleave(b // g).to(f.device)[gate]
            val = value_rows.repeat_interleave(b // g).to(f.device, f.dtype)[gate]
            f[1][rows_, :, idx] = val[:, None].expand(-1, f.shape[2])
            out = sae.decode(f)
            return act + (scale * (out[1] - out[0])).to(act.dtype)

        return [(site.name, per_row)]


def _check_features(features: Sequence[int], d_sae: int) -> Sequence[int]:
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int | Tensor) or not 0 <= int(f) < d_sae:
            raise ValueError(f"feature must be an int in [0, {d_sae}), got {f!r}")
    return features


@contextmanager
def clamp_feature(
    model: Host,
    sae: SAE,
    feature: int,
    value: float | Tensor,
) -> Iterator[Any]:
    """Set SAE feature `feature` to `value` at the SAE's site, keeping the error term.

    At every position: f = encode(x), f' = f with f'[feature] = value, and
    x' = x + decode(f') − decode(f), so the SAE's reconstruction error (and every other
    feature) stays as it was. `value` is a number or a tensor broadcastable to
    [batch, pos]. The hook is removed on exit, also when the body raises.
    (`FeatureClamp` is the same edit as a perturbation, for `generate` and `apply`.)

    Args:
        model: The model the hook is added to.
        sae: A sae-lens `SAE`, read and written at its own site.
        feature: The latent to clamp.
        value: Its value: a number, or a tensor broadcastable to [batch, pos].

    Yields:
        The model, with the clamp in place.

    Examples:
        >>> with clamp_feature(model, sae, 12, 10.0):
        ...     logits = model(prompts.tokens)
    """
    with apply(model, FeatureClamp(sae, [feature], torch.as_tensor(value)[None]), 0):
        yield model
