"""Choosing the radius R: sweep it and take the cusp.

R is MELBO's one scale knob. Too small and the steered completions are the unsteered
ones; too large and the model stops writing language. The MELBO source found the
useful vectors at the *cusp*: the largest behavioural diversity reached before fluency
collapses. `select_radius` measures that curve. For each R in a grid it trains vectors
(the config with `radius=R`), completes the prompts under each, and records

* objective  - mean over vectors of the final MELBO objective;
* diversity  - mean pairwise cosine distance between the vectors' completions of the
  same prompt (sentence embeddings, see `analysis.diversity`), averaged over prompts;
* fluency    - median perplexity of the steered completions under the unsteered model;
* repetition - mean fraction of repeated word trigrams in the steered completions.

`radius="auto"` (`methods.radius`) makes the same choice before every training run,
cheaply, from next-token distributions instead of generated text.

**Recommendation rule** (`recommend_radius`). Fluency has *collapsed* at R when its
median perplexity exceeds `fluency_limit` × the median perplexity of the unsteered
completions (the model's own greedy text, the fluency floor), or, with
`repetition_limit` set, when the mean repetition exceeds it. Scanning R upwards, the
radii before the first collapse are admissible; the recommended R is the admissible one
with the highest diversity (ties: the smaller R). None when already the smallest R collapses.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from melbo_lens.core.host import Host
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.methods.melbo import MelboConfig, train_steering_vectors
from melbo_lens.methods.radius import recommend_radius
from melbo_lens.perturbations.vectors import SteeringVectors
from melbo_lens.workflows.saved import load_unit, save_unit

__all__ = ["RadiusSweep", "recommend_radius", "select_radius"]


@dataclass
class RadiusSweep:
    """Objective, diversity, fluency and repetition per radius, and the recommended R.

    Lists run parallel to `radii`. `completions[k][v][i]` is vector v's completion of
    prompt i at `radii[k]`; `unsteered[i]` the unsteered one. `fluency` is a median
    perplexity (lower is more fluent), `baseline_fluency` the unsteered completions'.
    `vectors` (not serialised) holds the trained vectors per radius.

    Attributes:
        radii: The radii swept.
        objective: Mean MELBO objective per radius.
        diversity: Completion diversity per radius.
        fluency: Median perplexity per radius.
        repetition: Mean trigram repetition per radius.
        recommended: The chosen R (None when every R collapsed).
        baseline_fluency: The unsteered completions' median perplexity.
        fluency_limit: Collapse above `fluency_limit × baseline_fluency`.
        repetition_limit: Collapse above this repetition (None: not used).
        variance: Embedding variance per radius.
        completions: `completions[k][v][i]`, vector v on prompt i at `radii[k]`.
        unsteered: The unsteered completions.
        prompts: The prompts.
        settings: The sweep's settings.
        vectors: The trained vectors per radius (not serialised).
    """

    radii: list[float]
    objective: list[float]
    diversity: list[float]
    fluency: list[float]
    repetition: list[float]
    recommended: float | None
    baseline_fluency: float
    fluency_limit: float
    repetition_limit: float | None = None
    variance: list[float] = field(default_factory=list)
    completions: list[list[list[str]]] = field(default_factory=list)
    unsteered: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    vectors: list[SteeringVectors] | None = field(default=None, repr=False, compare=False)

    _LISTS = ("objective", "diversity", "fluency", "repetition")

    def __post_init__(self) -> None:
        for name in self._LISTS:
            if len(getattr(self, name)) != len(self.radii):
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values for {len(self.radii)} radii"
                )

    def recompute(
        self, fluency_limit: float | None = None, repetition_limit: float | None = None
    ) -> float | None:
        """Re-apply the recommendation rule with other limits; updates and returns it."""
        if fluency_limit is not None:
            self.fluency_limit = fluency_limit
        if repetition_limit is not None:
            self.repetition_limit = repetition_limit
        self.recommended = recommend_radius(
            self.radii,
            self.diversity,
            self.fluency,
            self.baseline_fluency,
            self.fluency_limit,
            repetition=self.repetition,
            repetition_limit=self.repetition_limit,
        )
        return self.recommended

    def to_dict(self) -> dict[str, Any]:
        return {
            "radii": self.radii,
            "objective": self.objective,
            "diversity": self.diversity,
            "fluency": self.fluency,
            "repetition": self.repetition,
            "recommended": self.recommended,
            "baseline_fluency": self.baseline_fluency,
            "fluency_limit": self.fluency_limit,
            "repetition_limit": self.repetition_limit,
            "variance": self.variance,
            "completions": self.completions,
            "unsteered": self.unsteered,
            "prompts": self.prompts,
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RadiusSweep:
        known = set(cls.__dataclass_fields__) - {"vectors"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RadiusSweep fields {sorted(unknown)}")
        return cls(**data)

    def table(self) -> str:
        """One row per R; `<-` marks the recommended R, `x` the collapsed ones."""
        bound = self.fluency_limit * self.baseline_fluency
        lines = [
            f"{'R':>8} {'objective':>11} {'diversity':>9} {'fluency':>9} {'x base':>7} "
            f"{'repeat':>6}",
        ]
        for k, r in enumerate(self.radii):
            ratio = self.fluency[k] / self.baseline_fluency if self.baseline_fluency else math.nan
            mark = "  <- recommended" if r == self.recommended else ""
            if not self.fluency[k] <= bound:
                mark = "  x fluency collapsed"
            elif self.repetition_limit is not None and self.repetition[k] > self.repetition_limit:
                mark = "  x repetition collapsed"
            lines.append(
                f"{r:>8.4g} {self.objective[k]:>11.4g} {self.diversity[k]:>9.3f} "
                f"{self.fluency[k]:>9.3g} {ratio:>7.2f} {self.repetition[k]:>6.2f}{mark}"
            )
        rec = (
            "none (fluency collapsed at every R)" if self.recommended is None else self.recommended
        )
        lines.append(
            f"unsteered median perplexity {self.baseline_fluency:.3g}; collapse bound "
            f"{self.fluency_limit:g} x that = {bound:.3g}; recommended R = {rec}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _measure(
    model: Host,
    prompts: PromptSet,
    vectors: SteeringVectors,
    max_new_tokens: int,
    embed: Any,
    unsteered: list[str] | None,
    baseline: float,
) -> dict[str, Any]:
    """Objective, diversity, fluency and repetition of one radius's vectors (and, on the
    first radius, the unsteered completions and their fluency)."""
    from melbo_lens.analysis.diversity import completion_diversity, fluency, repetition_score
    from melbo_lens.generation import generate_steered

    gens = generate_steered(
        model, vectors, prompts, max_new_tokens=max_new_tokens, include_unsteered=not unsteered
    )
    if not unsteered:
        unsteered = list(gens.unsteered or [])
        baseline = _median(fluency(model, prompts, unsteered))
    flat = [text for per_vector in gens.steered for text in per_vector]
    per_prompt = [
        completion_diversity([gens.steered[v][i] for v in range(len(gens.steered))], embed=embed)
        for i in range(len(prompts))
    ]
    obj = vectors.objective
    return {
        "obj": float(obj.float().mean()) if obj is not None else math.nan,
        "div": statistics.fmean(d.mean_distance for d in per_prompt),
        "var": statistics.fmean(d.variance for d in per_prompt),
        "flu": _median(fluency(model, prompts, flat)),
        "rep": statistics.fmean(repetition_score(t) for t in flat),
        "completions": gens.steered,
        "unsteered": unsteered,
        "baseline": baseline,
        "prompts": list(gens.prompts),
    }


def _unit(radius: float) -> str:
    return f"radius_{radius:g}"


def _saved_radius(
    save_dir: str | os.PathLike[str], radius: float, settings: dict[str, Any]
) -> tuple[dict[str, Any], SteeringVectors] | None:
    """The saved measurements and vectors of `radius`, if both are there."""
    saved = load_unit(save_dir, _unit(radius))
    if saved is None:
        return None
    record, vectors = saved
    path = Path(save_dir) / f"{_unit(radius)}.json"
    try:
        saved_settings, row = record["settings"], record["row"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a saved sweep radius ({err}); delete it") from err
    differing = [k for k in settings if k != "config" and saved_settings.get(k) != settings[k]]
    saved_cfg, cfg = saved_settings.get("config") or {}, settings["config"]
    differing += [f"config.{k}" for k in cfg if saved_cfg.get(k) != cfg[k]]
    if differing:
        raise ValueError(
            f"{path} was measured with other settings ({', '.join(differing)}); resume "
            "with the saved settings, or clear the folder to start the sweep over"
        )
    return row, vectors


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def select_radius(
    model: Host,
    prompts: PromptSet,
    config: MelboConfig,
    radii: Sequence[float],
    *,
    max_new_tokens: int = 32,
    fluency_limit: float = 3.0,
    repetition_limit: float | None = None,
    embed: Any = None,
    keep_vectors: bool = False,
    progress: bool = True,
    save_dir: str | os.PathLike[str] | None = None,
    max_rows_per_pass: int | str | None = None,
) -> RadiusSweep:
    """Train at each radius, measure the completions, recommend R at the cusp.

    Each R trains `replace(config, radius=R)` (with `lr="auto"` the step scales with R),
    completes every prompt greedily under every vector (`generate_steered`), and scores
    objective, diversity (`embed`, default all-MiniLM-L6-v2), fluency (median perplexity
    under the unsteered model) and repetition; see the module docstring for the rule.
    Needs a model with a tokenizer and `config.n_vectors >= 2` (diversity is *between*
    vectors). With `progress`, each radius is announced ("radius i of n") and its training
    shows a bar of vector-steps. With `save_dir`, each finished radius is saved there at
    once (`radius_R.json` with its measurements and completions, `radius_R.safetensors`
    with its vectors, both atomic), and a later call with the same settings reuses them,
    so an interrupted sweep resumes at the first unfinished radius; a saved radius made
    with other settings is an error naming them.

    Args:
        model: the model to train and complete with (it needs a tokenizer).
        prompts: the training prompts (`PromptSet`).
        config: the MELBO config trained at each radius (its own radius is replaced).
        radii: the radii to try, each > 0.
        max_new_tokens: tokens per completion.
        fluency_limit: fluency has collapsed at R when the median perplexity exceeds
            this multiple of the unsteered completions' (see the module docstring).
        repetition_limit: fluency has also collapsed when the mean repetition exceeds
            this (None: not used).
        embed: texts -> embeddings for diversity (default: all-MiniLM-L6-v2).
        keep_vectors: keep each radius's vectors in the result.
        progress: announce each radius and show training bars.
        save_dir: save each finished radius there and reuse it on a later call.
        max_rows_per_pass: as for `train_steering_vectors`.

    Returns:
        `RadiusSweep`: the per-radius measurements, `table()` and the recommended R.

    Raises:
        TypeError: prompts that are not a `PromptSet`.
        ValueError: bad radii, fewer than 2 vectors, a model without a tokenizer, or a
            saved radius made with other settings.

    Examples:
        >>> onehot = lambda ts: torch.eye(2)[[len(t) % 2 for t in ts]]   # a stand-in embedder
        >>> sweep = select_radius(model, prompts, MelboConfig(HookSite(1), HookSite(3),
        ...     n_vectors=2, steps=2), [1.0, 4.0], max_new_tokens=4, embed=onehot, progress=False)
        >>> sweep.radii, len(sweep.completions[0])
        ([1.0, 4.0], 2)
    """
    if not isinstance(prompts, PromptSet):
        raise TypeError(
            f"prompts must be a PromptSet, got {type(prompts).__name__}; "
            "build one with PromptSet.from_texts or PromptSet.from_chat"
        )
    radii = [float(r) for r in radii]
    if not radii or any(not (r > 0 and math.isfinite(r)) for r in radii):
        raise ValueError(f"radii must be finite numbers > 0, got {radii}")
    if config.n_vectors < 2:
        raise ValueError(
            f"diversity is measured between vectors; use n_vectors >= 2, got {config.n_vectors}"
        )
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("select_radius generates text; the model needs a tokenizer")
    radii = sorted(radii)
    settings = {  # what a saved radius must share to be reused (its radius is its own)
        "config": {k: v for k, v in config.to_dict().items() if k != "radius"},
        "max_new_tokens": max_new_tokens,
        "prompts": prompts.to_dict()["tokens"],
    }
    rows: dict[str, list[float]] = {k: [] for k in ("obj", "div", "var", "flu", "rep")}
    completions: list[list[list[str]]] = []
    kept: list[SteeringVectors] = []
    unsteered: list[str] = []
    prompt_texts: list[str] = []
    baseline = math.nan
    for i, radius in enumerate(radii):
        saved = _saved_radius(save_dir, radius, settings) if save_dir is not None else None
        if saved is not None:
            row, vectors = saved
            say(progress, f"radius {i + 1} of {len(radii)}: R={radius:g} (saved, reused)")
        else:
            say(
                progress,
                f"radius {i + 1} of {len(radii)}: R={radius:g}, {config.n_vectors} vectors x "
                f"{config.loop_steps()} steps",
            )
            vectors = train_steering_vectors(
                model,
                prompts,
                replace(config, radius=radius),
                progress=progress,
                max_rows_per_pass=max_rows_per_pass,
            )
            row = _measure(
                model, prompts, vectors, max_new_tokens, embed, unsteered or None, baseline
            )
            if save_dir is not None:
                record = {"radius": radius, "settings": settings, "row": row}
                save_unit(save_dir, _unit(radius), vectors, record)
        if not unsteered:
            unsteered, baseline = row["unsteered"], row["baseline"]
        prompt_texts = row["prompts"]
        for key in rows:
            rows[key].append(row[key])
        completions.append(row["completions"])
        if keep_vectors:
            kept.append(vectors)
    sweep = RadiusSweep(
        radii=radii,
        objective=rows["obj"],
        diversity=rows["div"],
        fluency=rows["flu"],
        repetition=rows["rep"],
        recommended=None,
        baseline_fluency=baseline,
        fluency_limit=fluency_limit,
        repetition_limit=repetition_limit,
        variance=rows["var"],
        completions=completions,
        unsteered=unsteered,
        prompts=prompt_texts,
        settings={"config": config.to_dict(), "max_new_tokens": max_new_tokens},
        vectors=kept if keep_vectors else None,
    )
    sweep.recompute()
    return sweep
