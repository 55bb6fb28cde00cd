"""`radius="auto"`: choose R before training, at the diversity/fluency cusp.

R is MELBO's one scale knob, and it scales with the model: residual norms differ by
orders of magnitude between models and layers. Too small and nothing changes; too large
and the model stops writing language. The source chose R at the *cusp*: the largest
behavioural diversity reached before fluency collapses (`workflows.select_radius`
measures that with generated completions). Doing that before every training run costs
more than the run, so the search here measures the same two things without generating:

* **fluency** at R: how plausible the steered model's next-token predictions are to the
  unsteered model, over every real position of the prompts: the median over probe
  vectors of exp(H(p_steered, p_clean) − H(p_clean, p_clean)), the cross-entropy of
  the steered distributions under the clean ones as a perplexity ratio (1: unchanged);
  a model broken by its steering predicts tokens the clean model finds absurd at every
  position. Collapse is a ratio above `FLUENCY_LIMIT` = 30, calibrated against
  generated completions (`select_radius`'s perplexity ratio, limit 3) on both shipped
  models: on SmolLM2 the proxy reads 4.1 at the last fluent radius and 43 at the first
  collapsed one, on the toy 23 and 120;
* **diversity** at R: the mean pairwise Jensen–Shannon divergence (in bits, 0..1)
  between the probe vectors' next-token distributions where the completion starts (each
  prompt's last token).

R is searched on a geometric grid scaled to the model, R = ρ·2^k for k = −6..2, with ρ
the median per-token residual norm at the source. Each measured R trains `PROBE_VECTORS`
vectors with the power solver (`PROBE_STEPS` steps, Gram–Schmidt between them), one
batch, on the first `SEARCH_PROMPTS` prompts. The walk starts at ρ/8, moves up while
fluency holds and down while it has collapsed, then measures the midpoint (a factor √2)
of the bracket it found. The choice is `recommend_radius` on the measured radii (as
`select_radius`): the most diverse R before the first collapse, with collapse meaning
fluency above `FLUENCY_LIMIT`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.outliers import residual_norms
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import steering_hook

__all__ = [
    "FLUENCY_LIMIT",
    "RadiusChoice",
    "recommend_radius",
    "search_radius",
]

PROBE_VECTORS = 4
SEARCH_PROMPTS = 4  # the search runs on the first few prompts
PROBE_STEPS = 5
OCTAVES = range(-6, 3)  # R = ρ·2^k
START_OCTAVE = -3
FLUENCY_LIMIT = 30.0  # see the module docstring for the calibration
_LOGITS_BUDGET = 2**27  # floats of logits per forward pass (512 MB in float32)


def recommend_radius(
    radii: Sequence[float],
    diversity: Sequence[float],
    fluency: Sequence[float],
    baseline_fluency: float,
    fluency_limit: float,
    *,
    repetition: Sequence[float] | None = None,
    repetition_limit: float | None = None,
) -> float | None:
    """The cusp: highest-diversity R before the first R whose fluency collapses.

    Collapse at R: fluency[R] > fluency_limit · baseline_fluency (nan counts as collapse),
    or repetition[R] > repetition_limit when that limit is given. Radii are scanned in
    increasing order.

    Args:
        radii: The radii measured.
        diversity: Diversity per radius.
        fluency: Perplexity (lower is more fluent) per radius.
        baseline_fluency: The unsteered perplexity.
        fluency_limit: Collapse factor over the baseline.
        repetition: Repetition per radius.
        repetition_limit: Collapse above this repetition (None: not used).

    Returns:
        The recommended R, or None when the smallest R already collapses.

    Raises:
        ValueError: The lists differ in length.

    Examples:
        >>> recommend_radius([1, 2, 4, 8], [0.1, 0.3, 0.5, 0.9], [2.0, 2.5, 3.0, 20.0], 2.0, 2.0)
        4
        >>> recommend_radius([1, 2], [0.1, 0.3], [9.0, 9.0], 2.0, 2.0) is None
        True
    """
    if not (len(radii) == len(diversity) == len(fluency)):
        raise ValueError(
            f"radii, diversity and fluency need one value per radius, got lengths "
            f"{len(radii)}, {len(diversity)}, {len(fluency)}"
        )
    bound = fluency_limit * baseline_fluency
    best: tuple[float, float] | None = None  # (diversity, R)
    for k in sorted(range(len(radii)), key=lambda k: radii[k]):
        collapsed = not fluency[k] <= bound  # also true for nan
        if repetition_limit is not None and repetition is not None:
            collapsed |= repetition[k] > repetition_limit
        if collapsed:
            break
        if best is None or diversity[k] > best[0]:
            best = (diversity[k], radii[k])
    return None if best is None else best[1]


@dataclass
class RadiusChoice:
    """What `radius="auto"` measured and chose (saved in the artifact's metadata).

    `radii` are the measured radii in increasing order, with `fluency` (median ratio
    exp(H(p_steered, p_clean) - H(p_clean)); collapse above `fluency_limit`),
    `diversity` (mean pairwise JS divergence of the completion's first token, bits) and
    `objective` (mean MELBO objective of the probe vectors) parallel to them.

    Attributes:
        radius: The chosen R.
        residual_norm: Median residual norm at the source, which scales the grid.
        grid: The candidate radii.
        radii: The radii measured, increasing.
        fluency: Median fluency ratio per measured radius.
        diversity: First-token JS diversity (bits) per measured radius.
        objective: Mean probe objective per measured radius.
        seconds: Time the search took.
        fluency_limit: Collapse above this fluency ratio.
        collapsed_everywhere: Every radius collapsed (the smallest was chosen).
        probe: The probe's settings (vectors, steps).

    Examples:
        >>> c = RadiusChoice(radius=8.0, residual_norm=64.0, grid=[1.0, 2.0, 4.0, 8.0, 16.0],
        ...     radii=[8.0, 16.0], fluency=[1.4, 9.0], diversity=[0.3, 0.6],
        ...     objective=[1e3, 1e5], seconds=2.0)
        >>> RadiusChoice.from_dict(c.to_dict()) == c
        True
        >>> print(c.summary())  # doctest: +NORMALIZE_WHITESPACE
        R = 8 (auto: the most diverse of 2 measured radii before fluency collapses;
        grid 1..16 = median source norm 64 x 2^k; search 2.0 s)
    """

    radius: float
    residual_norm: float
    grid: list[float]
    radii: list[float]
    fluency: list[float]
    diversity: list[float]
    objective: list[float]
    seconds: float
    fluency_limit: float = FLUENCY_LIMIT
    collapsed_everywhere: bool = False
    probe: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RadiusChoice:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown RadiusChoice fields {sorted(unknown)}")
        return cls(**data)

    def summary(self) -> str:
        """One line: the chosen R, how, and what the search cost."""
        how = (
            "fluency collapsed at every measured radius; took the smallest of the grid"
            if self.collapsed_everywhere
            else f"the most diverse of {len(self.radii)} measured radii before fluency collapses"
        )
        return (
            f"R = {self.radius:.4g} (auto: {how}; grid {self.grid[0]:.3g}..{self.grid[-1]:.3g}"
            f" = median source norm {self.residual_norm:.3g} x 2^k; search {self.seconds:.1f} s)"
        )

    def table(self) -> str:
        """One row per measured radius; `<-` marks the choice, `x` a collapse."""
        lines = [f"{'R':>9} {'fluency':>9} {'diversity':>9} {'objective':>11}"]
        for r, flu, div, obj in zip(
            self.radii, self.fluency, self.diversity, self.objective, strict=True
        ):
            mark = "  <- chosen" if r == self.radius else ""
            if not flu <= self.fluency_limit:
                mark = "  x collapsed"
            lines.append(f"{r:>9.4g} {flu:>9.3g} {div:>9.3f} {obj:>11.4g}{mark}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- measurement
def median_source_norm(model: Host, prompts: PromptSet, source: HookSite) -> float:
    """ρ: the median per-token residual norm at the source over the prompts' real tokens."""
    norms = residual_norms(model, prompts, source)
    return float(norms[prompts.attention_mask.to(norms.device)].median())


class _Probe:
    """Fluency and first-token distributions of the model steered by vectors at the
    source: one forward pass per chunk of (vector, prompt) rows, chunked to bound the
    logits' memory; the unsteered log-probabilities are kept for the comparison."""

    def __init__(self, model: Host, prompts: PromptSet, source: HookSite) -> None:
        self.model, self.prompts, self.source = model, prompts, source
        _, pos = prompts.tokens.shape
        vocab = int(getattr(model.cfg, "d_vocab", 50_000))
        self.max_rows = max(1, _LOGITS_BUDGET // max(1, pos * vocab))
        self.clean = self._logp(None)  # [n, pos, vocab]
        self.mask = prompts.attention_mask.to(self.clean.device)
        self.h0 = self._cross_entropy(self.clean, self.clean)

    @torch.no_grad()
    def _logp(self, vector: Tensor | None) -> Tensor:
        """Log-probabilities [n, pos, vocab] of the model steered by `vector` (None: not)."""
        hooks = [] if vector is None else [(self.source.name, steering_hook(vector))]
        out = []
        for lo in range(0, len(self.prompts), self.max_rows):
            tokens = self.prompts.tokens[lo : lo + self.max_rows]
            attn = self.prompts.attention_mask[lo : lo + self.max_rows]
            with self.model.hooks(fwd_hooks=hooks):
                logits = self.model(tokens, attention_mask=attn.long())
            out.append(logits.float().log_softmax(-1))
        return torch.cat(out)

    def _cross_entropy(self, logp: Tensor, clean: Tensor) -> float:
        """Mean over real positions of H(p_steered, p_clean) = -Σ p_s log p_c (nats)."""
        h = -(logp.exp() * clean).sum(-1)
        return float((h * self.mask).sum() / self.mask.sum())

    def __call__(self, vectors: Tensor) -> tuple[float, float]:
        """(fluency, diversity) of the model steered by each row of `vectors`."""
        ratios, firsts = [], []
        last = self.prompts.attention_mask.long().sum(1) - 1
        rows = torch.arange(len(self.prompts))
        for v in vectors:
            logp = self._logp(v)
            ratios.append(math.exp(min(self._cross_entropy(logp, self.clean) - self.h0, 700.0)))
            firsts.append(logp[rows, last.to(logp.device)].exp())
        return float(torch.tensor(ratios).quantile(0.5)), _mean_pairwise_js(firsts)


def _mean_pairwise_js(dists: list[Tensor]) -> float:
    """Mean over pairs and prompts of the Jensen–Shannon divergence in bits (0..1)."""
    values = []
    for a in range(len(dists)):
        for b in range(a + 1, len(dists)):
            p, q = dists[a].double(), dists[b].double()
            m = (p + q) / 2
            kl_pm = (p * (p.clamp_min(1e-300) / m.clamp_min(1e-300)).log()).sum(-1)
            kl_qm = (q * (q.clamp_min(1e-300) / m.clamp_min(1e-300)).log()).sum(-1)
            values.append(((kl_pm + kl_qm) / (2 * math.log(2))).mean())
    return float(torch.stack(values).mean()) if values else 0.0


# ---------------------------------------------------------------------- the search
def search_radius(
    model: Host,
    prompts: PromptSet,
    config: Any,
    train_fn: Callable[..., Any],
    *,
    progress: bool = True,
) -> RadiusChoice:
    """Find R for `config` (sites and prompts as resolved) with the walk described in
    the module docstring; `train_fn` trains the probe vectors (`train_steering_vectors`)."""
    start = time.perf_counter()
    if len(prompts) > SEARCH_PROMPTS:  # R is a property of model and sites; a few suffice
        prompts = prompts[:SEARCH_PROMPTS]
    rho = median_source_norm(model, prompts, config.source)
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(
            f"radius='auto' scales R to the residual norm at {config.source.name}, which is "
            f"{rho!r} here; pass radius=<a number> instead"
        )
    grid = [rho * 2.0**k for k in OCTAVES]
    probe = _Probe(model, prompts, config.source)
    probe_cfg = replace(
        config,
        n_vectors=min(PROBE_VECTORS, config.n_vectors if config.n_vectors > 1 else 2),
        steps=PROBE_STEPS,
        solver="power",
        orthogonal="simultaneous",
        starts_per_vector=1,
        slot_steps="auto",
        vectors_per_batch=None,
    )
    rows: dict[float, tuple[float, float, float]] = {}  # R -> (fluency, diversity, objective)

    def measure(r: float) -> bool:
        """Measure R = r; True when fluency holds there."""
        vectors = train_fn(model, prompts, replace(probe_cfg, radius=r), progress=False)
        flu, div = probe(vectors.vectors)
        obj = float(vectors.objective.float().mean())
        rows[r] = (flu, div, obj)
        say(progress, f"radius search: R = {r:.4g}  fluency {flu:.3g}  diversity {div:.3f}")
        return flu <= FLUENCY_LIMIT

    k = OCTAVES.index(START_OCTAVE)
    if measure(grid[k]):  # walk up while fluency holds
        while k + 1 < len(grid) and measure(grid[k + 1]):
            k += 1
    else:  # walk down until it holds
        while k > 0 and not measure(grid[k - 1]):
            k -= 1
        k -= 1
    if 0 <= k < len(grid) - 1:  # grid[k] holds, grid[k + 1] collapsed: halve the bracket
        measure(grid[k] * math.sqrt(2.0))
    radii = sorted(rows)
    flu = [rows[r][0] for r in radii]
    div = [rows[r][1] for r in radii]
    chosen = recommend_radius(radii, div, flu, 1.0, FLUENCY_LIMIT)
    return RadiusChoice(
        radius=grid[0] if chosen is None else chosen,
        residual_norm=rho,
        grid=grid,
        radii=radii,
        fluency=flu,
        diversity=div,
        objective=[rows[r][2] for r in radii],
        seconds=time.perf_counter() - start,
        collapsed_everywhere=chosen is None,
        probe={
            "n_vectors": probe_cfg.n_vectors,
            "steps": PROBE_STEPS,
            "solver": "power",
            "orthogonal": "simultaneous",
            "prompts": len(prompts),
        },
    )
