# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""Steering adapters: each member edits one MLP's output weights by a low-rank matrix.

A steering adapter on block L is a rank-r change of that block's MLP output weights,

    W_out' = W_out + s · Ω_A Ω_Bᵀ        (Ω_A: d_mlp × r, Ω_B: d_model × r)

in the TransformerLens convention, where `W_out` is [d_mlp, d_model] and the MLP writes
h·W_out + b_out for its hidden activation h. (Written the other way round, for weights
that act on column vectors, this is W' = W + s · Ω_B Ω_Aᵀ.) melbo_lens never touches
the weights: one hook reads h at `blocks.L.mlp.hook_post` and a second adds
s · (h Ω_A) Ω_Bᵀ at `blocks.L.hook_mlp_out`, which is the same computation.

Many adapters run in one batch. With g adapters (`omega_a` [g, d_mlp, r]) and a batch of
B rows, B a multiple of g, adapter j acts on the j-th block of B/g consecutive rows:
g = B gives one adapter per row, and K adapters over K × n prompt rows (the layout of
`Segment.run_hooked` and of steered generation) give adapter k to rows k·n .. k·n+n-1.
A single adapter (`omega_a` [d_mlp, r]) acts on every row.

Normalisation (`SteeringAdapters.normalization`) says what fixes the edit's size:

* `"columns"` (the MELBO write-up's): every column of Ω_A and Ω_B has unit norm, and the
  edit is s · Ω_A Ω_Bᵀ as stored;
* `"frobenius"` / `"spectral"`: the edit is s · Ω_A Ω_Bᵀ / ||Ω_A Ω_Bᵀ||, in the Frobenius
  or the spectral norm, so ||ΔW|| = s exactly in that norm whatever the factors' scale
  (`adapter_norms.edit_norm`; computed from r x r matrices: Ω_A Ω_Bᵀ = Q_A (R_A R_Bᵀ) Q_Bᵀ has the
  singular values of R_A R_Bᵀ).

Sparse positions (`thresholds`, [n, r]): adapter k's component j acts at a token only
where its read-out |h·Ω_A[:, j]| exceeds `thresholds[k, j]`, so it writes at a few
positions, chosen by what it reads (a learned mask: training sets each threshold to a
quantile of the read-out over the training prompts' tokens, `AdapterConfig.
position_quantile`). The rule is per token, so teacher-forced training, right-padded
batches and KV-cached generation apply it alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.host import Host, post_norm
from melbo_lens.core.io import ArtifactError, read_artifact, read_metadata
from melbo_lens.core.sites import HookSite, mlp_hidden_name
from melbo_lens.perturbations.adapter_norms import NORMALIZATIONS, normalized_factors
from melbo_lens.perturbations.artifact import ArtifactRows, loaded_fields, register_format
from melbo_lens.perturbations.base import Hook, Rows, apply, pick_members, row_members

__all__ = [
    "ADAPTERS_FORMAT",
    "SteeringAdapters",
    "adapt",
    "adapter_hooks",
    "check_adapter_host",
]


ADAPTERS_FORMAT = "melbo_lens.steering_adapters/1"
VECTORS_FORMAT = "melbo_lens.steering_vectors/1"


def check_adapter_host(model: Host, layer: int) -> None:
    """Fail with a clear message unless an adapter on block `layer` is a weight edit.

    The adapter's output is added at `hook_mlp_out`, which must be the raw MLP output
    h·W_out + b_out; models that normalise the MLP output before that hook (Gemma 2/3's
    `ln2_post`, OLMo-2-style post-norm) are refused rather than silently adapted
    differently.
    """
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(
            f"adapter layer must be an int in 0..{n_layers - 1} (the model has {n_layers} "
            f"blocks), got {layer!r}"
        )
    if getattr(cfg, "attn_only", False):
        raise ValueError("the model is attention-only; a steering adapter needs an MLP")
    if post_norm(model):
        raise ValueError(
            f"{getattr(cfg, 'model_name', 'this model')} normalises the MLP output before "
            "hook_mlp_out (ln2_post / post-norm), so adding the adapter's output there is "
            "not an edit of W_out; steering adapters support pre-norm models (GPT-2, "
            "Llama, SmolLM2, Qwen, Mistral, ...)"
        )
    hook_dict = getattr(model, "hook_dict", None)
    for name in (mlp_hidden_name(layer), HookSite(layer, "mlp_out").name):
        if hook_dict is not None and name not in hook_dict:
            raise ValueError(
                f"the model has no hook point {name!r}, which a steering adapter needs "
                "(mixture-of-experts MLPs have none; a TransformerBridge needs "
                "enable_compatibility_mode())"
            )


def _grouped(omega: Tensor, width_name: str) -> Tensor:
    if omega.ndim == 2:
        return omega[None]
    if omega.ndim == 3:
        return omega
    raise ValueError(
        f"adapter factors must be [{width_name}, r] or [g, {width_name}, r], "
        f"got {tuple(omega.shape)}"
    )


def adapter_hooks(
    layer: int,
    omega_a: Float[Tensor, "*g d_mlp r"],
    omega_b: Float[Tensor, "*g d_model r"],
    scale: float | Tensor,
    thresholds: Float[Tensor, "*g r"] | None = None,
) -> list[Hook]:
    """TransformerLens (name, hook) pairs adding `scale · (h Ω_A) Ω_Bᵀ` to block `layer`'s
    MLP output; per group of batch rows when the factors are 3-D (see the module doc).
    With `thresholds`, a read-out h·Ω_A[:, j] counts only where its magnitude exceeds
    threshold j (sparse positions).

    Gradients flow to `omega_a` and `omega_b`; the delta is computed in their dtype.

    Examples:
        >>> hooks = adapter_hooks(1, torch.randn(64, 1), torch.zeros(32, 1), 4.0)
        >>> [name for name, _ in hooks]
        ['blocks.1.mlp.hook_post', 'blocks.1.hook_mlp_out']
    """
    a, b = _grouped(omega_a, "d_mlp"), _grouped(omega_b, "d_model")
    tau = None if thresholds is None else thresholds.reshape(a.shape[0], 1, a.shape[2])
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"omega_a {tuple(omega_a.shape)} and omega_b {tuple(omega_b.shape)} disagree on "
            "the number of adapters or the rank"
        )
    hidden_name, out_name = mlp_hidden_name(layer), HookSite(layer, "mlp_out").name
    store: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any = None) -> None:
        store["h"] = act

    def write(act: Tensor, hook: Any = None) -> Tensor:
        h = store.pop("h", None)
        if h is None:
            raise RuntimeError(
                f"the adapter hook at {out_name} ran but {hidden_name} did not run before it "
                "in this forward pass; does the host expose TransformerLens MLP hook names?"
            )
        g, rows = a.shape[0], act.shape[0]
        if rows % g:
            raise ValueError(
                f"{g} adapters for a batch of {rows} rows; the batch must hold a whole "
                "number of rows per adapter (rows = adapters × prompts)"
            )
        if h.shape[-1] != a.shape[1] or act.shape[-1] != b.shape[1]:
            raise ValueError(
                f"adapter has d_mlp={a.shape[1]}, d_model={b.shape[1]} but block {layer} "
                f"has d_mlp={h.shape[-1]}, d_model={act.shape[-1]}"
            )
        a_ = a.to(act.device)
        b_ = b.to(act.device)
        coeff = h.to(a_.dtype).reshape(g, -1, h.shape[-1]) @ a_  # [g, rows/g·pos, r]
        if tau is not None:  # sparse positions: only read-outs above the threshold
            coeff = coeff * (coeff.abs() > tau.to(coeff.device, coeff.dtype))
        delta = (coeff @ b_.transpose(-1, -2)) * scale  # [g, rows/g·pos, d_model]
        return act + delta.reshape(act.shape).to(act.dtype)

    return [(hidden_name, read), (out_name, write)]


@contextmanager
def adapt(
    model: Host,
    layer: int,
    omega_a: Float[Tensor, "*g d_mlp r"],
    omega_b: Float[Tensor, "*g d_model r"],
    *,
    scale: float = 1.0,
) -> Generator[Any, None, None]:
    """Apply an adapter (or one per group of batch rows) inside the block.

    `scale` is the whole multiplier s (an artifact passes radius × its own scale). The
    hooks are removed on exit, also when the body raises.

    Args:
        model: The model the hooks are added to.
        layer: The block whose MLP output is edited.
        omega_a: [d_mlp, r] input factors, or [g, d_mlp, r] one per group of batch rows.
        omega_b: [d_model, r] output factors, shaped like `omega_a`.
        scale: The multiplier s of Ω_A Ω_Bᵀ.

    Yields:
        The model, with the adapter in place.

    Raises:
        ValueError: The factors contain NaN or inf.

    Examples:
        >>> unit = torch.nn.functional.normalize
        >>> a = unit(torch.randn(model.cfg.d_mlp, 1), dim=0)
        >>> b = unit(torch.randn(model.cfg.d_model, 1), dim=0)
        >>> with adapt(model, 1, a, b, scale=4.0):
        ...     logits = model("Hello")
    """
    check_adapter_host(model, layer)
    if not (torch.isfinite(omega_a).all() and torch.isfinite(omega_b).all()):
        raise ValueError("adapter factors contain NaN or inf")
    with model.hooks(fwd_hooks=adapter_hooks(layer, omega_a, omega_b, scale)):
        yield model


@register_format(ADAPTERS_FORMAT)
@dataclass
class SteeringAdapters(ArtifactRows):
    """n steering adapters on block `layer`'s MLP output weights, with provenance.

    Adapter k is the weight edit W_out' = W_out + radius · Ω_A[k] Ω_B[k]ᵀ (TransformerLens
    convention, W_out [d_mlp, d_model]; `melbo_lens.perturbations.adapters` explains the hooks that
    apply it). With `normalization="columns"` (default) the factors have unit-norm
    columns, so `radius` is the whole scale; with "frobenius" / "spectral" the product is
    divided by its norm, so ||ΔW_out|| = radius in that norm (`factors` gives the
    normalised factors every consumer uses).

    Args:
        omega_a: [n, d_mlp, r] input factors Ω_A.
        omega_b: [n, d_model, r] output factors Ω_B.
        layer: The block whose MLP output weights are edited.
        radius: The scale R of the edit.
        target: The site the training objective read.
        method: How they were made (`"melbo_adapters"`, `"random_adapters"`, ...).
        config: The training settings.
        model_name: The model they were trained on.
        prompts: The training prompts and target positions.
        losses: [n, steps] the training curves.
        objective: [n] the final objectives.
        steps_done: [n] steps each adapter trained for.
        metadata: Free-form provenance.
        resume_state: Optimiser state for resuming an unfinished run.
        normalization: `"columns"`, `"frobenius"` or `"spectral"` (see above).
        thresholds: [n, r] read-out thresholds for sparse positions (None: every token).

    Examples:
        >>> a = torch.eye(4)[:, :1].expand(2, 4, 1); b = torch.eye(3)[:, :1].expand(2, 3, 1)
        >>> sa = SteeringAdapters(a, b, layer=1, radius=2.0)
        >>> len(sa), sa.rank, sa[1].weight_deltas().shape
        (2, 1, torch.Size([1, 4, 3]))
    """

    _ITEMS = ("omega_a", "omega_b", "thresholds")
    _NOUN = "adapter"

    omega_a: Float[Tensor, "n d_mlp r"]
    omega_b: Float[Tensor, "n d_model r"]
    layer: int
    radius: float
    target: HookSite | None = None
    method: str = "melbo_adapters"
    config: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    prompts: dict[str, Any] | None = None
    losses: Float[Tensor, "n steps"] | None = None
    objective: Float[Tensor, " n"] | None = None
    steps_done: Int[Tensor, " n"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    resume_state: dict[str, Tensor] = field(default_factory=dict, repr=False)
    normalization: str = "columns"
    thresholds: Float[Tensor, "n r"] | None = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        a, b = self.omega_a, self.omega_b
        if a.ndim != 3 or b.ndim != 3:
            raise ValueError(
                f"omega_a must be [n, d_mlp, r] and omega_b [n, d_model, r], got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
            raise ValueError(
                f"omega_a {tuple(a.shape)} and omega_b {tuple(b.shape)} disagree on the "
                "number of adapters n or the rank r"
            )
        if self.thresholds is not None and tuple(self.thresholds.shape) != (a.shape[0], a.shape[2]):
            raise ValueError(
                f"thresholds must be [n={a.shape[0]}, r={a.shape[2]}], got "
                f"{tuple(self.thresholds.shape)}"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        self.radius = float(self.radius)
        if not (self.radius > 0 and self.radius != float("inf")):
            raise ValueError(f"radius must be a finite number > 0, got {self.radius!r}")
        self._check_rows()

    @property
    def d_mlp(self) -> int:
        return self.omega_a.shape[1]

    @property
    def d_model(self) -> int:
        return self.omega_b.shape[1]

    @property
    def rank(self) -> int:
        return self.omega_a.shape[2]

    @property
    def site(self) -> HookSite:
        """Where the adapters write: `blocks.{layer}.hook_mlp_out`."""
        return HookSite(self.layer, "mlp_out")

    @property
    def norms(self) -> Float[Tensor, " n"]:
        """Size of each member: the Frobenius norm of its weight edit ΔW_out."""
        return self.weight_deltas().flatten(1).norm(dim=-1)

    def factors(self) -> tuple[Float[Tensor, "n d_mlp r"], Float[Tensor, "n d_model r"]]:
        """(Ω_A, Ω_B) as applied: Ω_B divided by ||Ω_A Ω_Bᵀ|| under "frobenius" or
        "spectral" normalisation, as stored under "columns"."""
        return normalized_factors(self.omega_a.float(), self.omega_b.float(), self.normalization)

    def weight_deltas(self, scale: float = 1.0) -> Float[Tensor, "n d_mlp d_model"]:
        """ΔW_out of each adapter: radius · scale · Ω_A Ω_Bᵀ (normalised factors), to add
        to `W_out`."""
        a, b = self.factors()
        return self.radius * scale * (a @ b.transpose(-1, -2))

    # ------------------------------------------------------------------ use
    @contextmanager
    def apply(
        self, model: Host, index: int | Sequence[int] = 0, *, scale: float = 1.0
    ) -> Generator[Any, None, None]:
        """Adapt `model` with adapter `index`; a list gives adapter j to the j-th block of
        batch rows (one adapter per row when the list is as long as the batch).

        Hooks, not weights: they are removed on exit, also when the body raises.

        Examples:
            >>> with adapters.apply(model, 1):
            ...     logits = model("hello")
            >>> logits.shape[0], logits.shape[-1]
            (1, 50)
        """
        with apply(model, self, index, scale=scale) as m:
            yield m

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]:
        """Hooks giving adapter `rows[i]` to batch row (block) i; None rows get Ω = 0,
        which is exactly unsteered (see `base` for the layout)."""
        check_adapter_host(model, self.layer)
        members = row_members(rows, len(self), "adapter")
        a, b = self.factors()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("adapter factors contain NaN or inf")
        tau = None if self.thresholds is None else self.thresholds.float()
        if isinstance(rows, int):
            one = None if tau is None else tau[members[0]]
            return adapter_hooks(self.layer, a[members[0]], b[members[0]], self.radius * scale, one)
        a, b = pick_members(a, members), pick_members(b, members)  # row -1: Ω = 0
        tau = None if tau is None else pick_members(tau, members)
        return adapter_hooks(self.layer, a, b, self.radius * scale, tau)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (tensors) with JSON metadata; atomic."""
        info = {"layer": self.layer, "radius": self.radius, "normalization": self.normalization}
        return self._save(path, ADAPTERS_FORMAT, info)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringAdapters:
        """Read an artifact written by `save`. Never unpickles."""
        found = read_metadata(path).get("format")
        if found == VECTORS_FORMAT:
            raise ArtifactError(
                f"{path} holds steering vectors, not adapters; load it with "
                "SteeringVectors.load (or load_artifact)"
            )
        tensors, meta = read_artifact(path, ADAPTERS_FORMAT)
        info = json.loads(meta["json"])
        missing = {"omega_a", "omega_b"} - set(tensors)
        if missing:
            raise ArtifactError(f"{path} has no {sorted(missing)} tensor; the file is incomplete")
        try:
            layer, radius = int(info["layer"]), float(info["radius"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path} has corrupt adapter metadata: {err!r}") from err
        normalization = info.get("normalization", "columns")  # files before it existed
        if normalization not in NORMALIZATIONS:
            raise ArtifactError(f"{path} has an unknown adapter normalization {normalization!r}")
        return cls(
            omega_a=tensors["omega_a"],
            omega_b=tensors["omega_b"],
            layer=layer,
            radius=radius,
            normalization=normalization,
            thresholds=tensors.get("thresholds"),
            **loaded_fields(path, info, tensors, "melbo_adapters"),
        )

    def __repr__(self) -> str:
        target = f" -> {self.target.name}" if self.target is not None else ""
        norm = "" if self.normalization == "columns" else f"normalization={self.normalization!r}, "
        return (
            f"SteeringAdapters(n={len(self)}, rank={self.rank}, d_mlp={self.d_mlp}, "
            f"d_model={self.d_model}, layer={self.layer}{target}, radius={self.radius:g}, "
            f"{norm}method={self.method!r}, model={self.model_name!r})"
        )
