"""A sweep grid and its cells, validated completely before any model loads.

A grid's axes are prompt sets x (source, target) site pairs x radii x seeds x methods;
`config` holds the `MelboConfig` fields every cell shares. Every field is checked when the
grid is made (types, ranges, duplicates, and each MELBO cell's `MelboConfig` built once),
and an error names the grid's file (when it came from one) and the field, e.g.
``grid.yaml: seeds[0]: must be an int in [0, 2**32), got 'a'``. What needs the model
(its depth, its chat template) is checked by `check_against_model` before the sweep writes
anything.

A cell's id is readable and ends in a digest of everything that defines its result (the
model, its prompt texts, the shared config, chat, positions, completion length and the
behaviour patterns), so a cell saved under another grid never counts as finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import parse_positions
from melbo_lens.core.sites import parse_site

__all__ = ["Cell", "GridError", "SweepGrid", "check_against_model"]

METHODS = ("melbo", "random", "jacobian")


class GridError(ValueError):
    """A sweep grid that cannot run; the message names the file (if any) and the field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep and what every cell shares.

    `prompts`: named prompt sets (name -> list of prompts); `sites`: (source, target)
    pairs as layer numbers or hook names; `methods`: dicts with a `method` ("melbo",
    "random", "jacobian") and, for melbo, any `MelboConfig` field (e.g. `solver`);
    `config`: fields every cell's `MelboConfig` shares (n_vectors, steps, ...);
    `behaviors`: name -> regular expression counted in the completions.
    """

    model: str
    prompts: dict[str, list[Any]]
    sites: list[tuple[str, str]]
    radii: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[dict[str, Any]] = field(default_factory=lambda: [{"method": "melbo"}])
    config: dict[str, Any] = field(default_factory=dict)
    behaviors: dict[str, str] = field(default_factory=dict)
    chat: bool = True
    target_positions: str = "auto"
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise GridError("invalid sweep grid: " + "; ".join(problems))
        object.__setattr__(self, "sites", [tuple(map(str, s)) for s in self.sites])
        object.__setattr__(self, "radii", [float(r) for r in self.radii])

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> SweepGrid:
        """A grid from a mapping; `source` (a file name) prefixes every error."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise GridError(
                f"{where}a sweep grid is a mapping of fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GridError(f"{where}unknown fields {unknown}; known: {sorted(known)}")
        missing = [k for k in ("model", "prompts", "sites", "radii") if k not in data]
        if missing:
            raise GridError(f"{where}missing the fields {missing}")
        try:
            return cls(**data)
        except GridError as err:
            raise GridError(f"{where}{err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepGrid:
        """A grid from a .yaml/.yml or .json file; errors name the file and the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise GridError(f"{path}: cannot read it as text ({err})") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise GridError(f"{path}: not valid YAML{at} ({problem})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise GridError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [list(s) for s in self.sites]
        return data

    def cells(self) -> list[Cell]:
        """Every point of the grid, in a fixed order."""
        axes = itertools.product(
            sorted(self.prompts), self.sites, self.radii, self.seeds, self.methods
        )
        shared = {name: self._digest(name) for name in self.prompts}
        return [
            Cell(prompt_set, src, tgt, float(r), int(seed), dict(m), shared[prompt_set])
            for prompt_set, (src, tgt), r, seed, m in axes
        ]

    def _digest(self, prompt_set: str) -> str:
        """What every cell of `prompt_set` shares and that changes its result."""
        shared = {
            "model": self.model,
            "prompts": self.prompts[prompt_set],
            "config": self.config,
            "chat": self.chat,
            "target_positions": self.target_positions,
            "max_new_tokens": self.max_new_tokens,
            "behaviors": self.behaviors,
        }
        text = json.dumps(shared, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One point of a sweep grid (`shared`: the digest of what the grid's cells share)."""

    prompt_set: str
    source: str
    target: str
    radius: float
    seed: int
    method: dict[str, Any]
    shared: str = ""

    @property
    def id(self) -> str:
        """A readable, filesystem-safe name, unique to everything that defines the cell."""
        label = "-".join(f"{k}={v}" for k, v in sorted(self.method.items()) if k != "method")
        text = (
            f"{self.prompt_set}_{self.method['method']}{('-' + label) if label else ''}_"
            f"s{self.source}_t{self.target}_R{self.radius:g}_seed{self.seed}"
        )
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{safe[:100]}_{digest[:8]}"


# ---------------------------------------------------------------------- validation
def _problems(grid: SweepGrid) -> list[str]:
    problems: list[str] = []
    add = problems.append
    if not isinstance(grid.model, str) or not grid.model:
        add(f"model: must be a model name, got {grid.model!r}")
    problems += _prompt_problems(grid.prompts)
    problems += _site_problems(grid.sites)
    problems += _list_problems("radii", grid.radii, _radius_problem, lambda r: float(r))
    problems += _list_problems("seeds", grid.seeds, _seed_problem, lambda s: s)
    problems += _method_problems(grid.methods)
    if not isinstance(grid.config, dict):
        add(f"config: must be a mapping of MelboConfig fields, got {grid.config!r}")
    if not isinstance(grid.chat, bool):
        add(f"chat: must be true or false, got {grid.chat!r}")
    if not isinstance(grid.target_positions, str):
        add(
            f"target_positions: must be a position spec as a string ('auto', 'all', 'last:3', "
            f"'0,3,-1'), got {grid.target_positions!r}"
        )
    else:
        try:
            parse_positions(grid.target_positions)
        except ValueError as err:
            add(f"target_positions: {err}")
    if not _is_int(grid.max_new_tokens) or grid.max_new_tokens < 1:
        add(f"max_new_tokens: must be an int >= 1, got {grid.max_new_tokens!r}")
    if not isinstance(grid.behaviors, dict):
        add(f"behaviors: must map names to regular expressions, got {grid.behaviors!r}")
    else:
        for name, pattern in grid.behaviors.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                add(f"behaviors.{name}: not a regular expression ({err})")
    if not problems:  # every MELBO cell's config, built once per method and site pair
        problems += _config_problems(grid)
    return problems


def _prompt_problems(prompts: Any) -> list[str]:
    if not isinstance(prompts, dict) or not prompts:
        return [f"prompts: must map set names to lists of prompts, got {prompts!r}"]
    out = []
    for name, items in prompts.items():
        if not isinstance(items, list) or not items:
            out.append(f"prompts.{name}: must be a non-empty list of prompts, got {items!r}")
            continue
        for i, p in enumerate(items):
            if not (
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, dict) for t in p))
            ):
                out.append(f"prompts.{name}[{i}]: must be a string or a conversation, got {p!r}")
    return out


def _site_problems(sites: Any) -> list[str]:
    if not isinstance(sites, list) or not sites:
        return [f"sites: must be a list of [source, target] pairs, got {sites!r}"]
    out = []
    for i, pair in enumerate(sites):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            out.append(f"sites[{i}]: must be a [source, target] pair, got {pair!r}")
            continue
        for j, site in enumerate(pair):
            if isinstance(site, bool) or not isinstance(site, int | str):
                out.append(f"sites[{i}][{j}]: must be a layer number or hook name, got {site!r}")
                continue
            try:
                parse_site(str(site), "resid_post")
            except ValueError as err:
                out.append(f"sites[{i}][{j}]: {err}")
    seen = [tuple(map(str, p)) for p in sites if isinstance(p, list | tuple)]
    if len(set(seen)) != len(seen):
        out.append(f"sites: a pair is listed twice in {sites!r}")
    return out


def _radius_problem(r: Any) -> str | None:
    if not _is_number(r) or not 0 < r < math.inf:
        return f"must be a finite number > 0, got {r!r}"
    return None


def _seed_problem(s: Any) -> str | None:
    if not _is_int(s) or not 0 <= s < 2**32:
        return f"must be an int in [0, 2**32), got {s!r}"
    return None


def _list_problems(name: str, values: Any, problem, key) -> list[str]:
    if not isinstance(values, list) or not values:
        return [f"{name}: must be a non-empty list, got {values!r}"]
    out = [f"{name}[{i}]: {p}" for i, v in enumerate(values) if (p := problem(v))]
    if not out:
        keys = [key(v) for v in values]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            out.append(f"{name}: {twice} listed twice (each cell would run twice)")
    return out


def _settable() -> set[str]:
    """The MelboConfig fields a grid may set (the cell sets sites, radius and seed)."""
    from melbo_lens.methods.melbo import MelboConfig

    return {f.name for f in fields(MelboConfig)} - {"source", "target", "radius", "seed"}


def _method_problems(methods: Any) -> list[str]:
    if not isinstance(methods, list) or not methods:
        return [f"methods: must be a non-empty list of {{method: ...}} mappings, got {methods!r}"]
    out = []
    known = _settable()
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or m.get("method") not in METHODS:
            out.append(f"methods[{i}]: needs method: one of {list(METHODS)}, got {m!r}")
            continue
        options = sorted(set(m) - {"method"})
        if m["method"] != "melbo" and options:
            out.append(
                f"methods[{i}]: {m['method']} takes no options (got {options}); its vectors "
                "follow the grid's radii, seeds and config.n_vectors"
            )
        elif unknown := sorted(set(options) - known):
            out.append(f"methods[{i}]: unknown MelboConfig fields {unknown}")
    canon = [json.dumps(m, sort_keys=True) for m in methods if isinstance(m, dict)]
    if len(set(canon)) != len(canon):
        out.append("methods: a method is listed twice")
    return out


def _config_problems(grid: SweepGrid) -> list[str]:
    from melbo_lens.methods.melbo import MelboConfig

    known = _settable()
    unknown = sorted(set(grid.config) - known)
    if unknown:
        return [f"config: unknown MelboConfig fields {unknown}; known: {sorted(known)}"]
    out = []
    for i, method in enumerate(grid.methods):
        if method["method"] != "melbo":
            continue
        options = {k: v for k, v in method.items() if k != "method"}
        for src, tgt in grid.sites:
            try:
                MelboConfig(
                    parse_site(str(src), "resid_post"),
                    parse_site(str(tgt), "resid_post"),
                    radius=float(grid.radii[0]),
                    seed=grid.seeds[0],
                    **{**grid.config, **options},
                )
            except (TypeError, ValueError) as err:
                out.append(f"config + methods[{i}] at sites [{src}, {tgt}]: {err}")
    n = grid.config.get("n_vectors", 1)
    if not _is_int(n) or n < 1:
        out.append(f"config.n_vectors: must be an int >= 1, got {n!r}")
    return out


def check_against_model(grid: SweepGrid, model: Host) -> None:
    """What needs the model: every site within its depth, and a chat template for chat."""
    from melbo_lens.core.host import n_layers_of

    n_layers = n_layers_of(model)
    problems = []
    for i, (src, tgt) in enumerate(grid.sites):
        for j, site in enumerate((src, tgt)):
            layer = parse_site(site, "resid_post").layer
            if layer >= n_layers:
                problems.append(
                    f"sites[{i}][{j}]: layer {layer}, but {grid.model} has {n_layers} "
                    f"layers (0..{n_layers - 1})"
                )
    tokenizer = getattr(model, "tokenizer", None)
    if grid.chat and not getattr(tokenizer, "chat_template", None):
        problems.append(
            f"chat: true, but {grid.model} has no chat template; set chat: false to use the "
            "prompts as plain text"
        )
    if problems:
        raise GridError("the grid does not fit the model: " + "; ".join(problems))
