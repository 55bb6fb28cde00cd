"""HookSite: names, parsing, ordering, validation, and checks against a real model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny

from melbo_lens.core.sites import POINTS, HookSite, as_site, require_hook

# ---------------------------------------------------------------------- names / parse


def test_default_point_is_resid_post():
    site = HookSite(7)
    assert site.point == "resid_post"
    assert site.name == "blocks.7.hook_resid_post"
    assert str(site) == "blocks.7.hook_resid_post"


@pytest.mark.parametrize("point", sorted(POINTS))
@pytest.mark.parametrize("layer", [0, 3, 22])
def test_name_and_parse_round_trip(layer, point):
    site = HookSite(layer, point)
    assert site.name == f"blocks.{layer}.hook_{point}"
    assert HookSite.parse(site.name) == site
    assert HookSite.from_dict(site.to_dict()) == site
    assert site.to_dict() == {"layer": layer, "point": point}


def test_from_dict_defaults_to_resid_post():
    assert HookSite.from_dict({"layer": 2}) == HookSite(2, "resid_post")


@pytest.mark.parametrize(
    "name",
    [
        "blocks.x.hook_resid_post",
        "blocks.1.attn.hook_z",  # a real TL hook, but not residual-width
        "blocks.-1.hook_resid_post",
        "hook_embed",
        "blocks.1.resid_post",
        " blocks.1.hook_resid_post",
        "blocks.1.hook_resid_post.extra",
    ],
)
def test_parse_rejects_malformed_names(name):
    with pytest.raises(ValueError, match="cannot parse hook name"):
        HookSite.parse(name)


def test_parse_rejects_unknown_point():
    # The name is well-formed but the point is not a residual-width site.
    with pytest.raises(ValueError, match="unknown hook point 'attn_scores'"):
        HookSite.parse("blocks.1.hook_attn_scores")


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("layer", [-1, -5])
def test_negative_layer_is_refused(layer):
    with pytest.raises(ValueError, match="layer must be >= 0"):
        HookSite(layer)


@pytest.mark.parametrize("layer", ["3", 2.0, True, None])
def test_non_int_layer_is_refused(layer):
    with pytest.raises(TypeError, match="layer must be an int"):
        HookSite(layer)  # type: ignore[arg-type]


@pytest.mark.parametrize("point", ["hook_resid_post", "resid", "attn_scores", "RESID_POST", ""])
def test_bad_point_is_refused(point):
    with pytest.raises(ValueError, match="unknown hook point") as err:
        HookSite(1, point)
    # The message lists the accepted points.
    assert "resid_post" in str(err.value) and "mlp_out" in str(err.value)


def test_validate_for_layer_beyond_model():
    site = HookSite(4)
    with pytest.raises(ValueError) as err:
        site.validate_for(4)
    msg = str(err.value)
    assert "blocks.4.hook_resid_post does not exist" in msg
    assert "4 blocks" in msg and "layers 0..3" in msg and "below 4" in msg
    last = HookSite(3)
    assert last.validate_for(4) is last


def test_site_is_frozen_and_hashable():
    site = HookSite(2, "mlp_out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.layer = 3  # type: ignore[misc]
    assert len({HookSite(2, "mlp_out"), HookSite(2, "mlp_out"), HookSite(2)}) == 2


# ---------------------------------------------------------------------- ordering


def test_forward_order_within_and_across_blocks():
    expected = [
        HookSite(1, "resid_pre"),
        HookSite(1, "attn_out"),
        HookSite(1, "resid_mid"),
        HookSite(1, "mlp_out"),
        HookSite(1, "resid_post"),
        HookSite(2, "attn_out"),
        HookSite(2, "resid_mid"),
    ]
    shuffled = [expected[i] for i in (4, 6, 0, 2, 5, 1, 3)]
    assert sorted(shuffled, key=lambda s: s.position) == expected
    positions = [s.position for s in expected]
    assert all(a < b for a, b in zip(positions, positions[1:], strict=False))


def test_resid_post_ties_with_next_resid_pre():
    assert HookSite(3, "resid_post").position == HookSite(4, "resid_pre").position
    assert HookSite(3, "resid_post").position > HookSite(3, "mlp_out").position
    assert HookSite(3, "resid_post").position < HookSite(4, "attn_out").position


def test_block_boundary_and_next_block():
    assert HookSite(2, "resid_pre").is_block_boundary
    assert HookSite(2, "resid_post").is_block_boundary
    for point in ("attn_out", "resid_mid", "mlp_out"):
        assert not HookSite(2, point).is_block_boundary
        assert HookSite(2, point).next_block == 2
    assert HookSite(2, "resid_pre").next_block == 2
    assert HookSite(2, "resid_post").next_block == 3


# ---------------------------------------------------------------------- as_site


def test_as_site_accepts_site_name_and_layer():
    site = HookSite(1, "attn_out")
    assert as_site(site) is site
    assert as_site("blocks.1.hook_attn_out") == site
    assert as_site(5) == HookSite(5, "resid_post")


@pytest.mark.parametrize("value", [True, 1.0, None, (1, "resid_post")])
def test_as_site_rejects_other_types(value):
    with pytest.raises(TypeError, match="expected a HookSite"):
        as_site(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- against a model


@pytest.mark.parametrize("point", sorted(POINTS))
def test_every_point_is_a_real_hook_of_the_model(tiny_model, point):
    for layer in range(tiny_model.cfg.n_layers):
        site = HookSite(layer, point)
        assert require_hook(tiny_model, site) is site
        assert site.name in tiny_model.hook_dict


def test_every_point_carries_a_residual_width_tensor(tiny_model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    names = [HookSite(1, p).name for p in POINTS]
    _, cache = tiny_model.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert cache[name].shape == (1, 4, tiny_model.cfg.d_model), name


def test_resid_post_is_the_same_tensor_as_next_resid_pre(tiny_model):
    tokens = torch.tensor([[5, 6, 7]])
    _, cache = tiny_model.run_with_cache(tokens)
    for layer in range(tiny_model.cfg.n_layers - 1):
        assert torch.equal(
            cache[HookSite(layer, "resid_post").name],
            cache[HookSite(layer + 1, "resid_pre").name],
        )


def test_require_hook_layer_out_of_range(tiny_model):
    n = tiny_model.cfg.n_layers
    with pytest.raises(ValueError, match=rf"the model has {n} blocks \(layers 0\.\.{n - 1}\)"):
        require_hook(tiny_model, HookSite(n))
    with pytest.raises(ValueError, match="does not exist"):
        require_hook(tiny_model, HookSite(n + 10, "resid_pre"))


def test_require_hook_missing_hook_point():
    # An attention-only model has no resid_mid hook.
    model = make_tiny(attn_only=True, n_layers=1)
    assert "blocks.0.hook_resid_mid" not in model.hook_dict
    with pytest.raises(ValueError, match="no hook point 'blocks.0.hook_resid_mid'") as err:
        require_hook(model, HookSite(0, "resid_mid"))
    assert "blocks.0.hook_resid_post" in str(err.value)  # lists what the block has
    assert require_hook(model, HookSite(0, "resid_post")) == HookSite(0)
