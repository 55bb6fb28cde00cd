"""The defaults that scale with the model: sites by depth, positions by norm, R by search.

`MelboConfig()` leaves three things to the model it meets:

* **sites** (`source=None`, `target=None`): the quarter points of the depth, rounded
  inwards (`default_sites`): SmolLM2-135M (30 layers) gets the output of block 7 ->
  the input of block 22, gemma-3-270m (18) 4 -> 13, the 4-layer toy 0 -> 3. These are
  the sites hand-tuned on both shipped models before any defaults existed (the SmolLM2
  demo's 7 -> 22, where the packaged SAE also reads; the toy benchmark's input of block
  1 -> input of block 3, the same activations). The source perturbs early-middle layers
  and the target reads the change well before the unembedding, where it is still a
  change of computation rather than of the output distribution.
* **target positions** (a `PromptSet` built without `target_positions`): every real
  token except those whose unsteered norm at the target is an outlier
  (`core.outliers`: more than 5x the prompt's median, the first-token sink of
  Llama-style models), which would otherwise take the whole objective.
* **radius** (`radius="auto"`): the search of `methods.radius`, R at the cusp on a
  grid scaled to the median residual norm at the source.

`resolve_defaults` applies them and returns the record the artifact keeps under
`metadata["auto"]`; with `progress` it also prints each choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from melbo_lens.core.host import Host, n_layers_of
from melbo_lens.core.outliers import OUTLIER_FACTOR, without_norm_outliers
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, check_sites
from melbo_lens.methods.radius import RadiusChoice, search_radius
from melbo_lens.methods.training.objective import reads_logits

__all__ = [
    "AutoChoices",
    "SOURCE_DEPTH",
    "TARGET_DEPTH",
    "default_positions",
    "default_sites",
    "describe_defaults",
    "resolve_defaults",
]

SOURCE_DEPTH = 0.25
TARGET_DEPTH = 0.75


def _check_one_auto(config: Any, source: HookSite, target: HookSite) -> None:
    """With one site given and the other automatic, a default that does not fit the given
    one is named as the automatic choice it is, with the fix, not as the user's setting."""
    if (config.source is None) == (config.target is None):
        return
    given, auto, name = (
        (config.target, source, "source")
        if config.source is None
        else (config.source, target, "target")
    )
    first, second = (auto, given) if name == "source" else (given, auto)
    if second.position <= first.position:
        other = "target" if name == "source" else "source"
        where = "before" if name == "source" else "after"
        raise ValueError(
            f"{other}={given.name} was given and {name} left automatic, but the automatic "
            f"{name} ({auto.name}, at a quarter of the depth) is not {where} it; pass "
            f"{name}= explicitly, a site {where} {given.name}"
        )


def default_sites(n_layers: int) -> tuple[HookSite, HookSite]:
    """Source and target at the quarter points of the depth, rounded inwards: the
    residual stream leaving block ⌈n/4⌉ − 1 (= entering block ⌈n/4⌉) and entering block
    ⌊3n/4⌋. Models under 3 layers: the embeddings to the last block's output.

    Args:
        n_layers: the model's number of blocks.

    Returns:
        (source, target) `HookSite`s.

    Examples:
        >>> [s.name for s in default_sites(30)]  # SmolLM2-135M
        ['blocks.7.hook_resid_post', 'blocks.22.hook_resid_pre']
        >>> [s.name for s in default_sites(4)]  # the planted-arithmetic toy
        ['blocks.0.hook_resid_post', 'blocks.3.hook_resid_pre']
        >>> [s.name for s in default_sites(2)]
        ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_post']
    """
    if n_layers < 3:
        return HookSite(0, "resid_pre"), HookSite(n_layers - 1, "resid_post")
    source = HookSite(math.ceil(n_layers * SOURCE_DEPTH) - 1, "resid_post")
    return source, HookSite(math.floor(n_layers * TARGET_DEPTH), "resid_pre")


def default_positions(
    model: Host, prompts: PromptSet, target: HookSite
) -> tuple[PromptSet, dict[str, Any] | None]:
    """Prompts built without `target_positions` lose their outlier-norm positions at
    `target`; explicit positions are kept as given (record None)."""
    if prompts.target_spec is not None:
        return prompts, None
    resolved, excluded = without_norm_outliers(model, prompts, target)
    return resolved, {
        "rule": f"all real tokens except those with norm > {OUTLIER_FACTOR:g} x the prompt's "
        f"median at {target.name}",
        "factor": OUTLIER_FACTOR,
        "excluded": excluded,
    }


@dataclass(frozen=True)
class AutoChoices:
    """What the defaults chose for a run, as the artifact keeps it (`metadata["auto"]`):
    the sites and their rule, the target positions left out and their rule, and the
    radius search's result. Every reader of that record goes through `of`.

    Examples:
        >>> AutoChoices.of({"auto": {"positions": {"rule": "r", "excluded": [[0]]}}}).positions
        {'rule': 'r', 'excluded': [[0]]}
        >>> AutoChoices.of({}).to_dict()
        {}
    """

    sites: dict[str, Any] | None = None
    positions: dict[str, Any] | None = None
    radius: dict[str, Any] | None = None

    @classmethod
    def of(cls, metadata: dict[str, Any] | None) -> AutoChoices:
        """The choices recorded in an artifact's metadata (none: nothing was automatic)."""
        auto = (metadata or {}).get("auto") or {}
        return cls(auto.get("sites"), auto.get("positions"), auto.get("radius"))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def radius_choice(self) -> RadiusChoice | None:
        return None if self.radius is None else RadiusChoice.from_dict(self.radius)


def resolve_defaults(
    model: Host,
    prompts: PromptSet,
    config: Any,
    train_fn: Callable[..., Any],
    *,
    prior: Any = None,
    progress: bool = True,
) -> tuple[Any, PromptSet, dict[str, Any]]:
    """(config with sites and radius filled in, prompts with the default positions, the
    record of what was chosen). A run resumed from `prior` reuses its radius."""
    auto: dict[str, Any] = {}
    if reads_logits(getattr(config, "objective", "melbo")) and config.target is None:
        # the log-probability objective reads the logits: the target is the last block
        config = replace(config, target=HookSite(n_layers_of(model) - 1, "resid_post"))
    if config.source is None or config.target is None:
        source, target = default_sites(n_layers_of(model))
        _check_one_auto(config, source, target)
        config = replace(config, source=config.source or source, target=config.target or target)
        auto["sites"] = {
            "rule": f"quarter points of the depth rounded inwards: the output of block "
            f"ceil({SOURCE_DEPTH:g} n_layers) - 1, the input of block floor({TARGET_DEPTH:g} "
            "n_layers)",
            "source": config.source.name,
            "target": config.target.name,
        }
        say(progress, f"auto sites: {config.source.name} -> {config.target.name}")
    check_sites(model, config.source, config.target)
    prompts, positions = default_positions(model, prompts, config.target)
    if positions is not None:
        auto["positions"] = positions
        left = sum(map(len, positions["excluded"]))
        say(progress, f"auto positions: {left} outlier-norm position(s) left out")
    if config.radius == "auto":
        if prior is not None:
            saved = AutoChoices.of(prior.metadata).radius
            if saved is None:
                raise ValueError(
                    f"the run being resumed chose no radius automatically (it used "
                    f"radius={prior.config.get('radius')!r}); resume with that radius"
                )
            auto["radius"] = saved
            config = replace(config, radius=float(saved["radius"]))
        else:
            choice = search_radius(model, prompts, config, train_fn, progress=progress)
            auto["radius"] = choice.to_dict()
            config = replace(config, radius=choice.radius)
            say(progress, f"auto radius: {choice.summary()}")
    return config, prompts, auto


def describe_defaults(metadata: dict[str, Any] | None) -> dict[str, str]:
    """What the defaults chose for a trained artifact, one line per choice (for the CLI
    and the report); {} when nothing was chosen automatically.

    Examples:
        >>> meta = {"train_seconds": 100.0, "auto": {"positions": {"rule": "r",
        ...     "excluded": [[0], []]}}}
        >>> describe_defaults(meta)
        {'target positions (auto)': 'left out [[0], []] (per prompt): r'}
    """
    meta = metadata or {}
    auto = AutoChoices.of(meta)
    out = {}
    if auto.sites is not None:
        sites = auto.sites
        out["sites (auto)"] = f"{sites['source']} -> {sites['target']}: {sites['rule']}"
    if auto.positions is not None:
        pos = auto.positions
        out["target positions (auto)"] = f"left out {pos['excluded']} (per prompt): {pos['rule']}"
    choice = auto.radius_choice()
    if choice is not None:
        line = choice.summary()
        train = meta.get("train_seconds")
        if train:
            line += f"; the search took {choice.seconds / train:.0%} of the {train:.1f} s training"
        out["radius (auto)"] = line
    return out
