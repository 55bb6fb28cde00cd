"""steer(): adds exactly scale * v at the site, per row if asked, and always cleans up."""

from __future__ import annotations

import pytest
import torch

from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import steer, steering_hook

TOKENS = torch.tensor([[1, 5, 9, 13, 17], [2, 4, 8, 16, 32]])
SITE = HookSite(1, "resid_post")


def _acts(model, names, tokens=TOKENS):
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    return logits, cache


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5])
@pytest.mark.parametrize(
    "site", [HookSite(1), HookSite(0, "resid_pre"), HookSite(2, "attn_out"), HookSite(3, "mlp_out")]
)
def test_steer_adds_exactly_scale_times_v(tiny_model, rng, site, scale):
    v = torch.randn(tiny_model.cfg.d_model, generator=rng)
    before = HookSite(site.layer, "resid_pre") if site.point != "resid_pre" else None
    names = [site.name] + ([before.name] if before else [])
    base_logits, base = _acts(tiny_model, names)
    with steer(tiny_model, site, v, scale=scale):
        logits, steered = _acts(tiny_model, names)
    # The hook returns act + scale * v, computed in the activation's dtype.
    assert torch.equal(steered[site.name], base[site.name] + v * scale)
    torch.testing.assert_close(steered[site.name] - base[site.name], (v * scale).expand(2, 5, -1))
    if before is not None:  # upstream of the site nothing changes
        assert torch.equal(steered[before.name], base[before.name])
    assert not torch.allclose(logits, base_logits)  # and downstream it does
    assert _no_hooks_left(tiny_model)


def test_site_may_be_a_name_or_layer(tiny_model, rng):
    v = torch.randn(tiny_model.cfg.d_model, generator=rng)
    with steer(tiny_model, SITE, v):
        ref = tiny_model(TOKENS)
    with steer(tiny_model, SITE.name, v):
        by_name = tiny_model(TOKENS)
    with steer(tiny_model, SITE.layer, v):
        by_layer = tiny_model(TOKENS)
    assert torch.equal(ref, by_name) and torch.equal(ref, by_layer)


def test_steer_yields_the_model(tiny_model):
    with steer(tiny_model, SITE, torch.zeros(tiny_model.cfg.d_model)) as m:
        assert m is tiny_model


def test_zero_vector_leaves_logits_bit_identical(tiny_model):
    base = tiny_model(TOKENS)
    with steer(tiny_model, SITE, torch.zeros(tiny_model.cfg.d_model), scale=3.0):
        steered = tiny_model(TOKENS)
    assert torch.equal(steered, base)


def test_zero_scale_leaves_logits_bit_identical(tiny_model, rng):
    base = tiny_model(TOKENS)
    with steer(tiny_model, SITE, torch.randn(tiny_model.cfg.d_model, generator=rng), scale=0.0):
        assert torch.equal(tiny_model(TOKENS), base)


def test_per_row_vectors_apply_per_row(tiny_model, rng):
    d = tiny_model.cfg.d_model
    vs = torch.randn(2, d, generator=rng)
    _, base = _acts(tiny_model, [SITE.name])
    with steer(tiny_model, SITE, vs, scale=2.0):
        logits, steered = _acts(tiny_model, [SITE.name])
    for r in range(2):
        assert torch.equal(steered[SITE.name][r], base[SITE.name][r] + vs[r] * 2.0)
        # Same as steering that row alone with its own single vector.
        with steer(tiny_model, SITE, vs[r], scale=2.0):
            alone = tiny_model(TOKENS[r : r + 1])
        torch.testing.assert_close(logits[r : r + 1], alone, atol=1e-5, rtol=1e-5)


def test_per_row_zero_row_leaves_that_row_unchanged(tiny_model, rng):
    vs = torch.stack([torch.zeros(tiny_model.cfg.d_model), torch.randn(32, generator=rng)])
    base = tiny_model(TOKENS)
    with steer(tiny_model, SITE, vs):
        steered = tiny_model(TOKENS)
    assert torch.equal(steered[0], base[0])
    assert not torch.allclose(steered[1], base[1])


# 1 or 2 vectors for 2 rows is a block layout (a whole number of rows per vector)
@pytest.mark.parametrize("rows", [3, 4])
def test_wrong_number_of_rows_is_a_clear_error(tiny_model, rows):
    vs = torch.ones(rows, tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match=rf"{rows} per-row steering vectors for a batch of 2"):
        with steer(tiny_model, SITE, vs):
            tiny_model(TOKENS)
    assert _no_hooks_left(tiny_model)


@pytest.mark.parametrize("shape", [(31,), (2, 33)])
def test_wrong_d_model_is_a_clear_error(tiny_model, shape):
    with pytest.raises(ValueError, match=r"d_model=\d+ but the activation .* has 32"):
        with steer(tiny_model, SITE, torch.ones(shape)):
            tiny_model(TOKENS)
    assert _no_hooks_left(tiny_model)


@pytest.mark.parametrize("shape", [(), (1, 2, 32)])
def test_wrong_rank_is_refused(tiny_model, shape):
    with pytest.raises(ValueError, match=r"must be \[d_model\] or \[rows, d_model\]"):
        with steer(tiny_model, SITE, torch.ones(shape)):
            pass
    with pytest.raises(ValueError):
        steering_hook(torch.ones(shape))
    assert _no_hooks_left(tiny_model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vector_is_refused(tiny_model, bad):
    v = torch.zeros(tiny_model.cfg.d_model)
    v[3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        with steer(tiny_model, SITE, v):
            pytest.fail("the body must not run with a non-finite vector")
    assert _no_hooks_left(tiny_model)


def test_missing_site_is_refused(tiny_model):
    with pytest.raises(ValueError, match="does not exist"):
        with steer(tiny_model, HookSite(tiny_model.cfg.n_layers), torch.zeros(32)):
            pytest.fail("the body must not run for a missing site")


def test_hooks_removed_after_normal_exit(tiny_model, rng):
    base = tiny_model(TOKENS)
    with steer(tiny_model, SITE, torch.randn(32, generator=rng) * 5):
        assert len(tiny_model.hook_dict[SITE.name].fwd_hooks) == 1
        assert not torch.allclose(tiny_model(TOKENS), base)
    assert tiny_model.hook_dict[SITE.name].fwd_hooks == []
    assert torch.equal(tiny_model(TOKENS), base)


def test_hooks_removed_when_the_body_raises(tiny_model, rng):
    base = tiny_model(TOKENS)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with steer(tiny_model, SITE, torch.randn(32, generator=rng) * 5):
            tiny_model(TOKENS)
            raise Boom
    assert tiny_model.hook_dict[SITE.name].fwd_hooks == []
    assert _no_hooks_left(tiny_model)
    assert torch.equal(tiny_model(TOKENS), base)


def test_hooks_removed_when_the_forward_raises(tiny_model):
    base = tiny_model(TOKENS)
    with pytest.raises(ValueError):
        with steer(tiny_model, SITE, torch.ones(3, 32)):
            tiny_model(TOKENS)  # 3 vectors for 2 rows: raises inside the hook
    assert tiny_model.hook_dict[SITE.name].fwd_hooks == []
    assert torch.equal(tiny_model(TOKENS), base)


def test_nested_steering_adds_up(tiny_model, rng):
    a, b = torch.randn(2, 32, generator=rng)
    _, base = _acts(tiny_model, [SITE.name])
    with steer(tiny_model, SITE, a):
        with steer(tiny_model, SITE, b):
            _, both = _acts(tiny_model, [SITE.name])
        assert len(tiny_model.hook_dict[SITE.name].fwd_hooks) == 1
    torch.testing.assert_close(both[SITE.name], base[SITE.name] + a + b)
    assert _no_hooks_left(tiny_model)


def test_vector_dtype_and_caller_tensor_untouched(tiny_model, rng):
    v = torch.randn(32, generator=rng, dtype=torch.float64)
    keep = v.clone()
    _, base = _acts(tiny_model, [SITE.name])
    with steer(tiny_model, SITE, v, scale=2.0):
        _, steered = _acts(tiny_model, [SITE.name])
    assert steered[SITE.name].dtype == torch.float32
    assert torch.equal(steered[SITE.name], base[SITE.name] + v.float() * 2.0)
    assert torch.equal(v, keep)
