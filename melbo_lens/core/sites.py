# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""A hook site is one named place in a transformer's residual computation.

Every tool in melbo_lens talks about *where* in the model something happens through a
`HookSite`: a block index and a hook point inside that block. `HookSite(7, "resid_post")`
is the residual stream after block 7, named `blocks.7.hook_resid_post` in TransformerLens
(both `HookedTransformer` and `TransformerBridge` in compatibility mode use these names).

This module is the only place where hook-name strings are built, parsed and checked.

Residual sites have a natural order: `resid_pre` of block L, then the sites inside block
L (`attn_out`, `resid_mid`, `mlp_out`, ...), then `resid_post` of block L, which is the
same tensor as `resid_pre` of block L + 1. `Segment` relies on that order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from melbo_lens.core.host import Host, check_no_attached_saes

__all__ = [
    "HookSite",
    "POINTS",
    "STREAM_POINTS",
    "as_site",
    "attn_z_name",
    "check_order",
    "mlp_hidden_name",
    "require_hook",
    "residual_stream_sites",
]

# Hook points of a block that carry a [batch, pos, d_model] tensor, in computation order.
# The integer is the point's order within its block (resid_pre first, resid_post last).
POINTS: dict[str, int] = {
    "resid_pre": 0,
    "attn_out": 1,
    "resid_mid": 2,
    "mlp_out": 3,
    "resid_post": 4,
}

_NAME = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


@dataclass(frozen=True, order=False)
class HookSite:
    """A residual-width hook point: block `layer`, point `point` (default `resid_post`).

    Args:
        layer: The block index.
        point: `"resid_pre"`, `"resid_mid"` or `"resid_post"`.

    Examples:
        >>> HookSite(7).name
        'blocks.7.hook_resid_post'
        >>> HookSite.parse("blocks.22.hook_resid_pre")
        HookSite(layer=22, point='resid_pre')
        >>> HookSite(3, "resid_post").position < HookSite(4, "resid_pre").position
        False
    """

    layer: int
    point: str = "resid_post"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"HookSite layer must be an int, got {self.layer!r}")
        if self.layer < 0:
            raise ValueError(
                f"HookSite layer must be >= 0, got {self.layer}; count blocks from 0 "
                "(negative indices are not resolved here because the model is not known)"
            )
        if self.point not in POINTS:
            raise ValueError(
                f"unknown hook point {self.point!r}; expected one of {sorted(POINTS)} "
                "(residual-width points, written without the 'hook_' prefix)"
            )

    @property
    def name(self) -> str:
        """The TransformerLens hook name, e.g. `blocks.7.hook_resid_post`."""
        return f"blocks.{self.layer}.hook_{self.point}"

    @property
    def position(self) -> tuple[int, int]:
        """Order key in the forward pass; `resid_post` of L and `resid_pre` of L+1 tie."""
        if self.point == "resid_post":
            return (self.layer + 1, 0)
        return (self.layer, POINTS[self.point])

    @property
    def is_block_boundary(self) -> bool:
        """True for `resid_pre` / `resid_post`: sites between two whole blocks."""
        return self.point in ("resid_pre", "resid_post")

    @property
    def next_block(self) -> int:
        """Index of the first block that runs *after* a vector is added here.

        For a boundary site this is the block whose input is the site; for a point inside
        block L it is L itself (the rest of block L runs after the hook).
        """
        return self.layer + 1 if self.point == "resid_post" else self.layer

    def validate_for(self, n_layers: int) -> HookSite:
        """Check the site exists in a model with `n_layers` blocks; return self."""
        if self.layer >= n_layers:
            raise ValueError(
                f"{self.name} does not exist: the model has {n_layers} blocks "
                f"(layers 0..{n_layers - 1}); choose a layer below {n_layers}"
            )
        return self

    @classmethod
    def parse(cls, name: str) -> HookSite:
        """Parse a TransformerLens hook name such as `blocks.7.hook_resid_post`."""
        match = _NAME.match(name)
        if match is None:
            raise ValueError(
                f"cannot parse hook name {name!r}; expected 'blocks.<layer>.hook_<point>' "
                f"with point in {sorted(POINTS)}, e.g. 'blocks.7.hook_resid_post'"
            )
        return cls(int(match.group(1)), match.group(2))

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "point": self.point}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookSite:
        return cls(int(data["layer"]), str(data.get("point", "resid_post")))

    def __str__(self) -> str:
        return self.name


def check_order(source: HookSite, target: HookSite) -> None:
    """Fail unless `target` comes strictly after `source` in the forward pass."""
    if target.position <= source.position:
        raise ValueError(
            f"the target site must come after the source site, got source={source.name} "
            f"target={target.name} (resid_post of layer L is the same tensor as resid_pre "
            "of layer L+1, so those two sites are not a segment)"
        )


def as_site(value: HookSite | str | int) -> HookSite:
    """Accept a HookSite, a hook name, or a bare layer (meaning `resid_post`)."""
    if isinstance(value, HookSite):
        return value
    if isinstance(value, str):
        return HookSite.parse(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return HookSite(value)
    raise TypeError(f"expected a HookSite, a hook name or a layer index, got {value!r}")


def require_hook(model: Host, site: HookSite) -> HookSite:
    """Check that `model` exposes `site` as a hook point; return the site."""
    check_no_attached_saes(model)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if n_layers is not None:
        site.validate_for(int(n_layers))
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None and site.name not in hook_dict:
        nearby = sorted(h for h in hook_dict if h.startswith(f"blocks.{site.layer}.hook_"))[:8]
        raise ValueError(
            f"the model has no hook point {site.name!r}; hook points of block {site.layer} "
            f"include {nearby} (a TransformerBridge needs enable_compatibility_mode())"
        )
    return site


def mlp_hidden_name(layer: int) -> str:
    """Hook name of block `layer`'s MLP hidden activation, the input of `W_out`.

    It is `d_mlp` wide, so it is not a `HookSite` (those are residual-width); steering
    adapters read it.

    Examples:
        >>> mlp_hidden_name(7)
        'blocks.7.mlp.hook_post'
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0 (blocks count from 0), got {layer!r}")
    return f"blocks.{layer}.mlp.hook_post"


# Points that carry the residual stream itself (not a write into it), in forward order.
STREAM_POINTS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")


def residual_stream_sites(model: Host, points: tuple[str, ...] = STREAM_POINTS) -> list[HookSite]:
    """Every site of `model` where the residual stream itself can be hooked, in order.

    `resid_pre`, `resid_mid` and `resid_post` of each block by default. Sites the model
    does not expose are left out: attention-only and parallel attention/MLP blocks
    (GPT-J, Pythia) have no `resid_mid`. A model without a `hook_dict` gets them all.

    Examples:
        >>> class Cfg: n_layers = 2
        >>> class M: cfg = Cfg()
        >>> [s.name for s in residual_stream_sites(M(), ("resid_mid",))]
        ['blocks.0.hook_resid_mid', 'blocks.1.hook_resid_mid']
    """
    for point in points:
        if point not in POINTS:
            raise ValueError(f"unknown hook point {point!r}; expected some of {sorted(POINTS)}")
    hook_dict = getattr(model, "hook_dict", None)
    sites = [HookSite(layer, p) for layer in range(int(model.cfg.n_layers)) for p in points]
    return [s for s in sites if hook_dict is None or s.name in hook_dict]


def attn_z_name(layer: int) -> str:
    """Hook name of block `layer`'s per-head attention output before `W_O` (`hook_z`).

    It is [batch, pos, n_heads, d_head]; head h writes `z[..., h, :] @ W_O[h]` into the
    residual stream, so it is where per-head contributions are read and patched.

    Examples:
        >>> attn_z_name(3)
        'blocks.3.attn.hook_z'
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0 (blocks count from 0), got {layer!r}")
    return f"blocks.{layer}.attn.hook_z"


def check_sites(model: Host, source: HookSite, target: HookSite) -> None:
    """Fail with a clear message unless both sites exist and target comes after source."""
    check_no_attached_saes(model)
    n_layers = int(model.cfg.n_layers)
    source.validate_for(n_layers)
    target.validate_for(n_layers)
    check_order(source, target)


def parse_site(value: str, default_point: str = "resid_post") -> HookSite:
    """A layer number (`"7"`, at `default_point`) or a full hook name
    (`"blocks.7.hook_resid_pre"`), as written on the command line.

    Examples:
        >>> parse_site("7").name, parse_site("blocks.3.hook_resid_pre").name
        ('blocks.7.hook_resid_post', 'blocks.3.hook_resid_pre')
    """
    if value.startswith("blocks."):
        return HookSite.parse(value)
    return HookSite(int(value), default_point)
