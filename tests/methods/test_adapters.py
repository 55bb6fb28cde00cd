"""Steering-adapter tests on tiny models: constraints, equivalences, batching, files."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

from melbo_lens import HookSite, PromptSet, Segment, TrainingError, melbo_objective, steer
from melbo_lens.core.sites import mlp_hidden_name
from melbo_lens.generation import generate_steered, generate_with_adapters
from melbo_lens.methods.adapters import (
    AdapterConfig,
    AdapterFamily,
    adapter_lr,
    train_steering_adapters,
)
from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.artifact import ArtifactError, load_artifact
from melbo_lens.perturbations.vectors import SteeringVectors

torch.set_num_threads(1)

LAYER, TGT = 1, HookSite(3)
TOKENS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]


def cfg(**kw) -> AdapterConfig:
    base = dict(source_layer=LAYER, target=TGT, n_adapters=3, rank=1, radius=2.0, steps=30)
    base.update(kw)
    return AdapterConfig(**base)


def random_adapters(model, n=2, rank=1, radius=3.0, seed=0) -> SteeringAdapters:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, model.cfg.d_mlp, rank, generator=gen)
    b = torch.randn(n, model.cfg.d_model, rank, generator=gen)
    unit = torch.nn.functional.normalize
    return SteeringAdapters(unit(a, dim=1), unit(b, dim=1), layer=LAYER, radius=radius)


def logits(model, prompts):
    return model(prompts.tokens, attention_mask=prompts.attention_mask.long())


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return PromptSet.from_tokens(tiny_model, TOKENS)


@pytest.fixture(scope="module")
def trained(tiny_model, prompts):
    return train_steering_adapters(tiny_model, prompts, cfg(rank=2), progress=False)


def test_columns_are_unit_norm_after_training(trained):
    for omega in (trained.omega_a, trained.omega_b):
        # tol: unit-norm columns, entries O(1)
        torch.testing.assert_close(omega.norm(dim=1), torch.ones(3, 2), rtol=0, atol=1e-6)
    assert trained.radius == 2.0 and trained.layer == LAYER and trained.target == TGT


def test_training_increases_the_objective(trained):
    assert trained.losses.shape == (3, 30) and torch.isfinite(trained.losses).all()
    assert (trained.losses[:, -1] > 1.5 * trained.losses[:, 0]).all()
    assert (trained.objective >= trained.losses[:, -1]).all()
    assert trained.steps_done.tolist() == [30, 30, 30] and trained.complete


def test_recorded_objective_matches_full_model_runs(tiny_model, prompts, trained):
    """The artifact's objective, recomputed with apply() on whole-model runs."""
    mask = prompts.attention_mask.long()
    _, clean = tiny_model.run_with_cache(prompts.tokens, attention_mask=mask)
    for k in range(len(trained)):
        with trained.apply(tiny_model, k):
            _, dirty = tiny_model.run_with_cache(prompts.tokens, attention_mask=mask)
        obj = melbo_objective(dirty[TGT.name], clean[TGT.name], prompts.target_mask)
        assert float(trained.objective[k]) == pytest.approx(float(obj), rel=1e-4)


def test_zero_omega_b_leaves_logits_bit_identical(tiny_model, prompts):
    adapters = random_adapters(tiny_model)
    adapters.omega_b.zero_()
    reference = logits(tiny_model, prompts)
    with adapters.apply(tiny_model, 0):
        same = logits(tiny_model, prompts)
    with adapters.apply(tiny_model, [0, 1]):  # per row
        per_row = logits(tiny_model, prompts)
    assert torch.equal(same, reference) and torch.equal(per_row, reference)
    with random_adapters(tiny_model).apply(tiny_model, 0):  # and a real one does change them
        assert not torch.allclose(logits(tiny_model, prompts), reference, atol=1e-3)


def test_adapter_hook_equals_weight_edit_on_a_copy(tiny_model, prompts):
    adapters = random_adapters(tiny_model, n=2, rank=2, radius=3.0)
    for k in range(2):
        edited = copy.deepcopy(tiny_model)
        with torch.no_grad():  # TL layout: W_out [d_mlp, d_model]
            edited.blocks[LAYER].mlp.W_out += 3.0 * adapters.omega_a[k] @ adapters.omega_b[k].T
        torch.testing.assert_close(
            adapters.weight_deltas()[k], 3.0 * adapters.omega_a[k] @ adapters.omega_b[k].T
        )
        want = logits(edited, prompts)
        assert not torch.allclose(want, logits(tiny_model, prompts), atol=1e-3)
        with adapters.apply(tiny_model, k):
            torch.testing.assert_close(logits(tiny_model, prompts), want, rtol=1e-4, atol=1e-5)
        # per-row: adapter k on row 0 only, adapter 1-k on row 1
        with adapters.apply(tiny_model, [k, 1 - k]):
            rows = logits(tiny_model, prompts)
        torch.testing.assert_close(rows[0], want[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(rows[1], want[1], atol=1e-3)


def test_rank1_adapter_on_constant_hidden_is_the_equivalent_vector(prompts):
    """W_in = 0 makes the MLP hidden h = act(b_in) the same at every position, so the
    adapter adds the constant R·(h·ω_a)·ω_b at mlp_out: a steering vector there."""
    model = make_tiny()
    mlp = model.blocks[LAYER].mlp
    with torch.no_grad():
        mlp.W_in.zero_()
        mlp.b_in.copy_(torch.randn(model.cfg.d_mlp, generator=torch.Generator().manual_seed(3)))
    mask = prompts.attention_mask.long()
    _, cache = model.run_with_cache(prompts.tokens, attention_mask=mask)
    hidden = cache[mlp_hidden_name(LAYER)]
    h = hidden[0, 0]
    assert torch.equal(hidden, h.expand_as(hidden))  # constant across prompts and positions
    adapters = random_adapters(model, n=1, rank=1, radius=5.0, seed=4)
    a, b = adapters.omega_a[0, :, 0], adapters.omega_b[0, :, 0]
    vector = 5.0 * (h @ a) * b
    assert float(vector.norm()) > 0.1
    # target activations through whole-model runs
    with adapters.apply(model, 0):
        _, by_adapter = model.run_with_cache(prompts.tokens, attention_mask=mask)
    with steer(model, HookSite(LAYER, "mlp_out"), vector):
        _, by_vector = model.run_with_cache(prompts.tokens, attention_mask=mask)
    torch.testing.assert_close(by_adapter[TGT.name], by_vector[TGT.name], rtol=1e-5, atol=1e-5)
    # and the objective through the two trainers' segment paths
    config = cfg(n_adapters=1, radius=5.0)
    segment = Segment(model, config.source, TGT, prompts)
    family = AdapterFamily(config, model, prompts)
    z_adapter = family.target(segment, {"omega_a": adapters.omega_a, "omega_b": adapters.omega_b})
    adapter_obj = [melbo_objective(z_adapter[0], segment.unsteered, prompts.target_mask)]
    z = segment.run(vector[None])
    vector_obj = melbo_objective(z[0], segment.unsteered, prompts.target_mask)
    assert float(adapter_obj[0]) > 1e-3
    assert float(adapter_obj[0]) == pytest.approx(float(vector_obj), rel=1e-5)


def test_batched_training_equals_one_at_a_time(tiny_model, prompts):
    together = train_steering_adapters(tiny_model, prompts, cfg(n_adapters=3), progress=False)
    alone = train_steering_adapters(
        tiny_model, prompts, cfg(n_adapters=3, adapters_per_batch=1), progress=False
    )
    # tol: unit-norm columns, entries O(1)
    torch.testing.assert_close(together.omega_a, alone.omega_a, rtol=0, atol=1e-5)
    # tol: unit-norm columns, entries O(1)
    torch.testing.assert_close(together.omega_b, alone.omega_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(together.losses, alone.losses, rtol=1e-5, atol=0)


def test_sequential_adapters_write_into_orthogonal_subspaces(tiny_model, prompts):
    sa = train_steering_adapters(
        tiny_model, prompts, cfg(n_adapters=3, rank=2, orthogonal="sequential"), progress=False
    )
    cols = sa.omega_b.transpose(1, 2)  # [n, r, d_model]
    for j in range(3):
        for k in range(j):
            assert (cols[j] @ cols[k].T).abs().max() < 1e-5, (j, k)
    gram = torch.einsum("kmd,jmd->kj", sa.weight_deltas(), sa.weight_deltas())  # Frobenius
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-4 * gram.diagonal().min()
    none = train_steering_adapters(tiny_model, prompts, cfg(n_adapters=3, rank=2), progress=False)
    cols = none.omega_b.transpose(1, 2)
    assert (cols[1] @ cols[0].T).abs().max() > 1e-2  # without it they are not orthogonal


def test_auto_lr_is_recorded(trained, tiny_model):
    lr = trained.metadata["lr_used"]
    assert lr["omega_a"] == pytest.approx(adapter_lr(tiny_model.cfg.d_mlp))
    assert lr["omega_b"] == pytest.approx(adapter_lr(tiny_model.cfg.d_model))
    assert trained.metadata["lr_rule"].startswith("0.011/sqrt")


def test_save_load_round_trip_is_exact(trained, tmp_path):
    path = trained.save(tmp_path / "adapters.safetensors")
    back = SteeringAdapters.load(path)
    for name in ("omega_a", "omega_b", "losses", "objective", "steps_done"):
        assert torch.equal(getattr(back, name), getattr(trained, name)), name
    assert (back.layer, back.radius, back.target) == (trained.layer, trained.radius, TGT)
    assert back.config == trained.config and back.prompts == trained.prompts
    assert back.metadata == trained.metadata and back.method == "melbo_adapters"
    assert AdapterConfig.from_dict(back.config) == cfg(rank=2)
    part = back[[2, 0]]
    assert torch.equal(part.omega_a, trained.omega_a[[2, 0]]) and len(back[1:]) == 2
    with pytest.raises(IndexError):
        back[3]


def test_pickles_and_vector_files_are_refused(trained, tmp_path):
    pickled = tmp_path / "adapters.pt"
    torch.save({"omega_a": trained.omega_a}, pickled)
    with pytest.raises(ArtifactError, match="never unpickles"):
        SteeringAdapters.load(pickled)
    vectors = tmp_path / "vectors.safetensors"
    SteeringVectors(torch.eye(3), HookSite(1)).save(vectors)
    with pytest.raises(ArtifactError, match="SteeringVectors.load"):
        SteeringAdapters.load(vectors)
    with pytest.raises(ArtifactError, match="format"):
        SteeringVectors.load(trained.save(tmp_path / "a.safetensors"))
    assert isinstance(load_artifact(tmp_path / "a.safetensors"), SteeringAdapters)
    assert isinstance(load_artifact(vectors), SteeringVectors)
    with pytest.raises(ArtifactError, match="never unpickles"):
        load_artifact(pickled)


def test_hooks_are_removed_after_apply_even_when_the_body_raises(tiny_model, prompts):
    adapters = random_adapters(tiny_model)
    points = [
        tiny_model.hook_dict[n] for n in (mlp_hidden_name(LAYER), f"blocks.{LAYER}.hook_mlp_out")
    ]
    reference = logits(tiny_model, prompts)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters.apply(tiny_model, 1, scale=2.0):
            assert all(len(p._forward_hooks) == 1 for p in points)
            raise RuntimeError("boom")
    assert all(len(p._forward_hooks) == 0 for p in points)
    assert torch.equal(logits(tiny_model, prompts), reference)


def test_nan_stops_with_step_and_adapter(tiny_model, prompts):
    with pytest.raises(TrainingError, match=r"step \d+ for adapter 0"):
        train_steering_adapters(tiny_model, prompts, cfg(radius=1e30, steps=20), progress=False)


def test_callback_false_returns_partial_result(tiny_model, prompts):
    seen = []
    sa = train_steering_adapters(
        tiny_model,
        prompts,
        cfg(),
        progress=False,
        callback=lambda s: seen.append(s.step) or s.step < 4,
    )
    assert seen == [0, 1, 2, 3, 4] and sa.steps_done.tolist() == [5, 5, 5]
    assert not sa.complete and torch.isfinite(sa.losses[:, :5]).all()
    torch.testing.assert_close(sa.omega_a.norm(dim=1), torch.ones(3, 1))


def test_generate_with_adapters(tiny_tok_model):
    model = tiny_tok_model
    adapters = random_adapters(model, n=2, radius=40.0)
    adapters.omega_b[0].zero_()  # adapter 0 does nothing
    kw = dict(max_new_tokens=6)
    gens = generate_with_adapters(model, adapters, ["hello", "a cat"], **kw)
    plain = generate_steered(
        model, SteeringVectors(torch.zeros(1, 32), HookSite(1)), ["hello", "a cat"], **kw
    )
    assert gens.unsteered == plain.unsteered
    assert gens.steered[0] == gens.unsteered
    assert gens.steered[1] != gens.unsteered
    # a row of adapter 1 decoded alone, under apply(), gives the same text
    ps = PromptSet.from_texts(model, ["hello"])
    with adapters.apply(model, 1):
        alone = generate_steered(model, SteeringVectors(torch.zeros(1, 32), HookSite(1)), ps, **kw)
    assert alone.unsteered[0] == gens.steered[1][0]


def test_bad_configs_and_hosts_are_clear():
    with pytest.raises(ValueError, match="must come after"):
        AdapterConfig(3, HookSite(2))
    with pytest.raises(ValueError, match="must come after"):
        AdapterConfig(2, HookSite(2, "attn_out"))
    AdapterConfig(2, HookSite(2, "resid_post"))  # mlp_out of 2 comes before resid_post of 2
    with pytest.raises(ValueError, match="orthogonal must be"):
        AdapterConfig(1, TGT, orthogonal="diagonal")
    with pytest.raises(ValueError, match="rank must be"):
        AdapterConfig(1, TGT, rank=0)
    with pytest.raises(ValueError, match="radius"):
        AdapterConfig(1, TGT, radius=float("inf"))
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        AdapterConfig.from_dict({**cfg().to_dict(), "bogus": 1})
    c = cfg(lr=0.01, betas=(0.8, 0.9), orthogonal="sequential", rank=3)
    assert AdapterConfig.from_dict(c.to_dict()) == c
    gemma_like = make_tiny(normalization_type="RMS", use_normalization_before_and_after=True)
    ps = PromptSet.from_tokens(gemma_like, TOKENS)
    with pytest.raises(ValueError, match="ln2_post"):
        train_steering_adapters(gemma_like, ps, cfg(), progress=False)


# ---------------------------------------------------------------------- one trainer
def test_adapters_gain_the_power_solver(tiny_model, prompts):
    sa = train_steering_adapters(
        tiny_model, prompts, cfg(solver="power", steps=8, rank=2), progress=False
    )
    for omega in (sa.omega_a, sa.omega_b):
        # tol: unit-norm columns, entries O(1)
        torch.testing.assert_close(omega.norm(dim=1), torch.ones(3, 2), rtol=0, atol=1e-6)
    assert (sa.objective > 2.0 * sa.losses[:, 0]).all()  # far above the random start
    assert (sa.objective >= sa.losses.max(dim=1).values * (1 - 1e-5)).all()  # safeguarded


def test_simultaneous_and_soft_orthogonality_for_adapters(tiny_model, prompts):
    def cross(sa):
        cols = torch.nn.functional.normalize(sa.omega_b.transpose(1, 2), dim=-1)  # [n, r, d]
        return max(float((cols[j] @ cols[k].T).abs().max()) for j in range(3) for k in range(j))

    simultaneous = train_steering_adapters(
        tiny_model, prompts, cfg(orthogonal="simultaneous", rank=2), progress=False
    )
    assert cross(simultaneous) < 1e-5
    none = train_steering_adapters(tiny_model, prompts, cfg(rank=2), progress=False)
    soft = train_steering_adapters(
        tiny_model, prompts, cfg(orthogonal="soft", rank=2, soft_weight=50.0), progress=False
    )

    def mean_cos(sa):
        flat = torch.nn.functional.normalize(sa.omega_b.flatten(1), dim=-1)
        gram = (flat @ flat.T).abs()
        return float((gram.sum() - gram.diagonal().sum()) / 6)

    assert mean_cos(soft) < mean_cos(none)
