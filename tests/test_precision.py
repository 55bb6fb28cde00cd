"""Every public entry point on bf16 and fp16 models (and on each device present).

θ, optimiser state and objectives stay fp32; the model runs in its own dtype. The exact
delta decomposition allows the mismatch the dtype's rounding explains, not more.
"""

from __future__ import annotations

import pytest
import torch

from melbo_lens import (
    AdapterConfig,
    HookSite,
    MelboConfig,
    PromptSet,
    ablate_direction,
    clamp_direction,
    generate,
    train_steering_adapters,
    train_steering_vectors,
)
from melbo_lens.analysis.attribution import attribute_target_delta
from melbo_lens.analysis.attribution.exact import rounding_bound
from melbo_lens.analysis.similarity import delta_similarity
from melbo_lens.methods import baselines, supervised

torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.bfloat16, torch.float16]
CASES = [(dtype, device) for dtype in DTYPES for device in DEVICES]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}".replace("torch.", ""))
def low(request):
    """(the tiny chat model in a low-precision dtype on a device, its prompts)."""
    from conftest import make_tiny, make_tiny_tokenizer

    dtype, device = request.param
    model = make_tiny(dtype=dtype, device=device)
    model.set_tokenizer(make_tiny_tokenizer())
    prompts = PromptSet.from_texts(model, ["hello there", "what is two plus two?"])
    return model, prompts


def _cfg(**kw):
    return MelboConfig(HookSite(1), HookSite(3), n_vectors=3, radius=4.0, steps=15, **kw)


@pytest.fixture(scope="module")
def vectors(low):
    model, prompts = low
    return train_steering_vectors(model, prompts, _cfg(), progress=False)


def test_training_keeps_fp32_parameters_on_the_model_device(low, vectors):
    model, _ = low
    assert vectors.vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.vectors.norm(dim=-1), torch.full((3,), 4.0))
    assert vectors.objective is not None and bool((vectors.objective > vectors.losses[:, 0]).all())
    assert vectors.objective.dtype == torch.float32


@pytest.mark.parametrize("orthogonal,solver", [("simultaneous", "amsgrad"), ("none", "power")])
def test_other_modes_train(low, orthogonal, solver):
    model, prompts = low
    sv = train_steering_vectors(
        model, prompts, _cfg(orthogonal=orthogonal, solver=solver), progress=False
    )
    assert bool(torch.isfinite(sv.vectors).all())


def test_adapters_train_and_generate(low):
    model, prompts = low
    config = AdapterConfig(1, HookSite(3), n_adapters=2, rank=2, steps=8)
    adapters = train_steering_adapters(model, prompts, config, progress=False)
    assert adapters.omega_a.dtype == torch.float32
    gens = generate(model, adapters, prompts, max_new_tokens=3)
    assert len(gens.steered) == 2 and all(isinstance(t, str) for t in gens.steered[0])


def test_generation_and_interventions(low, vectors):
    model, prompts = low
    gens = generate(model, vectors, prompts, max_new_tokens=3)
    assert len(gens.steered) == 3 and gens.unsteered is not None
    direction = vectors.vectors[0]
    with ablate_direction(model, direction):
        ablated = model(prompts.tokens)
    with clamp_direction(model, direction, 2.0, sites=[1]):
        clamped = model(prompts.tokens)
    assert ablated.dtype == model.cfg.dtype and bool(torch.isfinite(clamped).all())


def test_supervised_and_baselines(low):
    model, prompts = low
    pos, neg = ["i love it", "great"], ["i hate it", "awful"]
    made = [
        supervised.mean_difference_vectors(model, pos, neg, 1),
        supervised.pca_vectors(model, pos, neg, 1, n_components=1),
        supervised.probe_vectors(model, pos, neg, 1),
        baselines.random_vectors(model, 1, n=2, radius=4.0),
        baselines.jacobian_vectors(model, prompts, 1, 3, k=2, radius=4.0),
        baselines.hessian_vectors(model, prompts, 1, 3, k=2, radius=4.0),
    ]
    for sv in made:
        assert bool(torch.isfinite(sv.vectors).all()) and float(sv.vectors.norm()) > 0, sv.method


@pytest.mark.parametrize("method", ["exact", "attribution_patching", "integrated_gradients"])
def test_attribution_adds_up_within_the_dtype_rounding(low, vectors, method):
    model, prompts = low
    res = attribute_target_delta(model, prompts, vectors, 0, method=method)
    dec = res.decomposition
    assert dec.components.dtype == torch.float32 and dec.delta.dtype == torch.float32
    # bf16 rounds the residual stream to ~3 digits; fp16 to ~4 (measured 1e-2 / 2e-3 here)
    assert dec.sum_error < 40 * torch.finfo(model.cfg.dtype).eps
    if method != "exact":  # estimates per node (the exact split has its components)
        assert res.nodes and all(torch.isfinite(torch.tensor(n.estimate)) for n in res.nodes)


def test_the_rounding_bound_names_low_precision_only():
    z = torch.full((2, 3, 4), 100.0)
    small = torch.tensor(1.0)
    assert rounding_bound(z, z, 2, small) == pytest.approx(1e-3)  # fp32: the exact tol
    bf = rounding_bound(z.bfloat16(), z.bfloat16(), 2, small)
    assert bf == pytest.approx(torch.finfo(torch.bfloat16).eps * 5 * 100.0)


def test_similarity_analysis_and_report(low, vectors, tmp_path):
    from melbo_lens.views.report import write_report
    from melbo_lens.workflows.runs import analyze_run

    model, prompts = low
    sim = delta_similarity(model, prompts, vectors)
    assert bool(torch.isfinite(sim.values).all())
    run = analyze_run(
        model, vectors, prompts, sae=None, n_random=4, max_new_tokens=3, progress=False
    )
    assert run.attributions is not None and len(run.attributions) == len(vectors)
    assert not any("precision" in note or "unsupported" in note for note in run.notes)
    assert write_report(run, tmp_path / "report.html").stat().st_size > 0


def test_sae_features_on_a_low_precision_model(low):
    from analysis.test_sae import make_sae

    from melbo_lens import SteeringVectors
    from melbo_lens.analysis.sae import clamp_feature, decompose_onto_sae, feature_effects

    model, prompts = low
    sae = make_sae().to(str(model.cfg.device))
    sv = SteeringVectors(sae.W_dec[:2].detach().float() * 4.0, HookSite(1, "resid_post"))
    dec = decompose_onto_sae(sv, sae, index=0, top_k=3)
    assert dec.features[0] == 0
    effects = feature_effects(model, sae, sv, 0, prompts)
    assert effects is not None
    with clamp_feature(model, sae, 0, 3.0):
        assert bool(torch.isfinite(model(prompts.tokens)).all())


@pytest.mark.parametrize("objective", ["consistency", "neg-logprob"])
def test_the_other_objectives_and_families_train(low, objective):
    """Every family and objective keeps fp32 parameters and finite objectives on a
    low-precision model (soft prompts find their placeholders in the model's dtype)."""
    from melbo_lens.methods.soft_prompts import (
        SoftPromptConfig,
        soft_prompt_set,
        train_soft_prompts,
    )

    model, prompts = low
    texts = ["hello there", "what is two plus two?"]
    answers = "ok" if objective == "neg-logprob" else None
    target = HookSite(3, "resid_post") if answers else HookSite(3)
    if answers:
        prompts = PromptSet.with_continuations(model, texts, answers)
    kw = dict(steps=4, objective=objective)
    runs = [
        train_steering_vectors(
            model,
            prompts,
            MelboConfig(HookSite(1), target, n_vectors=3, radius=4.0, on_manifold=4, **kw),
            progress=False,
        ).vectors,
        train_steering_adapters(
            model,
            prompts,
            AdapterConfig(1, target, n_adapters=2, rank=2, normalization="spectral", **kw),
            progress=False,
        ).omega_b,
    ]
    soft = train_soft_prompts(
        model,
        soft_prompt_set(model, texts, 2, continuations=answers),
        SoftPromptConfig(n_prompts=2, n_tokens=2, **kw),
        progress=False,
    )
    for params in [*runs, soft.embeddings]:
        assert params.dtype == torch.float32 and bool(torch.isfinite(params).all())
    assert bool(torch.isfinite(soft.objective).all())
    gens = generate(model, soft, texts, max_new_tokens=3, chat=True)
    assert len(gens.steered) == 2 and all(isinstance(t, str) for t in gens.steered[1])
