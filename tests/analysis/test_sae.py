"""SAE analysis with planted ground truth: a known decoder and vectors made of its rows."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from melbo_lens.analysis.sae import (
    clamp_feature,
    compare_with_features,
    decompose_onto_sae,
    feature_effects,
    feature_vectors,
    load_sae,
    sae_site,
)
from melbo_lens.analysis.sae import loading as sae_mod
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors

D_IN, D_SAE = 32, 64
SITE = HookSite(1)
# Planted features: nearly orthogonal to each other (|cos| < 0.06 in this decoder), so
# cosine ranking can find them too. CORRELATED rows overlap (|cos| up to 0.41).
PLANTED = [0, 17, 26]
CORRELATED = [5, 17, 42]
COEFS = [4.0, -3.0, 2.5]


def planted_decoder(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_SAE, D_IN, generator=g)
    return w / w.norm(dim=-1, keepdim=True)


def make_sae(site: HookSite = SITE, *, b_enc: float = 0.0, cls=StandardSAE, **cfg) -> SAE:
    config_cls = {StandardSAE: StandardSAEConfig, TopKSAE: TopKSAEConfig}.get(
        cls, JumpReLUSAEConfig
    )
    config = config_cls(
        d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=site.name, model_name="tiny"), **cfg
    )
    sae = cls(config)
    w = planted_decoder()
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.fill_(b_enc)
        sae.b_dec.zero_()
    return sae


def planted_vector(
    noise: float = 0.05, seed: int = 1, features: list[int] = PLANTED
) -> tuple[torch.Tensor, torch.Tensor]:
    w = planted_decoder()
    clean = sum(c * w[f] for f, c in zip(features, COEFS, strict=True))
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(D_IN, generator=g)
    return clean + noise * n / n.norm() * clean.norm(), clean


@pytest.fixture(scope="module")
def sae() -> SAE:
    return make_sae()


# ---------------------------------------------------------------------- decomposition
def test_sparse_recovers_planted_features_and_coefficients(sae):
    v, clean = planted_vector()
    dec = decompose_onto_sae(v, sae, top_k=3, method="sparse", site=SITE)
    assert dec.features == PLANTED  # ranked by |coefficient|: 4, -3, 2.5
    # least squares moves each coefficient by at most ||noise|| / σ_min (≈ 1 here)
    assert dec.coefficients == pytest.approx(COEFS, abs=float((v - clean).norm()))
    noise_share = float((v - clean).norm() ** 2 / v.norm() ** 2)
    assert dec.explained == pytest.approx(1 - noise_share, abs=0.01)
    assert dec.explained_curve == sorted(dec.explained_curve)
    assert dec.sae_site == SITE and dec.vector_site == SITE
    # noiseless: exact
    exact = decompose_onto_sae(clean, sae, top_k=3, method="sparse")
    assert exact.coefficients == pytest.approx(COEFS, abs=1e-5)  # float32 decoder
    assert exact.explained == pytest.approx(1.0, abs=1e-9)
    # more atoms than needed: the planted ones still rank first, OMP stops at the exact fit
    assert decompose_onto_sae(clean, sae, top_k=20, method="sparse").features == PLANTED


def test_sparse_nonnegative_uses_only_positive_features(sae):
    v, _ = planted_vector(noise=0.0)
    dec = decompose_onto_sae(v, sae, top_k=3, method="sparse", nonnegative=True)
    assert all(c > 0 for c in dec.coefficients)
    assert 17 not in dec.features and {0, 26} <= set(dec.features)
    assert dec.explained < 1.0


def test_cosine_ranks_planted_first_and_explained_is_span_projection(sae):
    v, clean = planted_vector()
    dec = decompose_onto_sae(v, sae, top_k=5, method="cosine")
    assert dec.features[:3] == PLANTED
    w = planted_decoder().double()
    vd = v.double()
    expected_cos = [float(w[f] @ vd / vd.norm()) for f in dec.features]
    assert dec.coefficients == pytest.approx(expected_cos, abs=1e-6)
    assert dec.cosines == dec.coefficients
    # explained after 3 features = projection onto span of the 3 planted rows
    a = w[PLANTED].T
    proj = a @ torch.linalg.lstsq(a, vd[:, None]).solution[:, 0]
    assert dec.explained_curve[2] == pytest.approx(float(proj.norm() ** 2 / vd.norm() ** 2))
    text = dec.table()
    assert "feature" in text and str(PLANTED[0]) in text
    json.dumps(dec.to_dict())


def test_correlated_atoms_sparse_recovers_where_cosine_misranks(sae):
    v, _ = planted_vector(features=CORRELATED)
    sparse = decompose_onto_sae(v, sae, top_k=3, method="sparse")
    assert sparse.features == CORRELATED
    assert sparse.coefficients == pytest.approx(COEFS, abs=0.1)
    cosine = decompose_onto_sae(v, sae, top_k=3, method="cosine")
    assert cosine.features != CORRELATED  # 17 and 42 partly cancel: a random row beats 42
    assert cosine.explained < sparse.explained


def test_decompose_accepts_steering_vectors_with_index(sae):
    v, _ = planted_vector()
    both = torch.stack([torch.randn(D_IN), v])
    assert decompose_onto_sae(both, sae, index=1, top_k=3, method="sparse").features == PLANTED
    sv = SteeringVectors(torch.stack([torch.randn(D_IN), v]), SITE, method="melbo")
    dec = decompose_onto_sae(sv, sae, index=1, top_k=3, method="sparse")
    assert dec.features == PLANTED and dec.label == "melbo[1]"
    with pytest.raises(ValueError, match="index="):
        decompose_onto_sae(sv, sae)


def test_decompose_clear_errors(sae):
    v, _ = planted_vector()
    with pytest.raises(ValueError, match=r"33 dimensions.*d_in=32"):
        decompose_onto_sae(torch.randn(33), sae)
    other = SteeringVectors(v[None], HookSite(2))
    with pytest.raises(
        ValueError, match=r"reads blocks\.1\.hook_resid_post.*blocks\.2\.hook_resid_post"
    ):
        decompose_onto_sae(other, sae)
    with pytest.raises(ValueError, match="allow_site_mismatch"):
        decompose_onto_sae(v, sae, site=HookSite(0))
    dec = decompose_onto_sae(other, sae, allow_site_mismatch=True, top_k=3, method="sparse")
    assert dec.features == PLANTED
    # resid_post of L and resid_pre of L+1 are the same tensor: no mismatch
    decompose_onto_sae(v, sae, site=HookSite(2, "resid_pre"))
    with pytest.raises(ValueError, match="method"):
        decompose_onto_sae(v, sae, method="lasso")
    with pytest.raises(ValueError, match="all zeros"):
        decompose_onto_sae(torch.zeros(D_IN), sae)


# ---------------------------------------------------------------------- loading
def test_save_load_roundtrip_and_site(tmp_path, sae):
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, StandardSAE)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    assert sae_site(loaded) == SITE
    assert load_sae(str(tmp_path / "sae" / "cfg.json")).cfg.d_sae == D_SAE
    assert load_sae(loaded) is loaded
    v, _ = planted_vector()
    assert decompose_onto_sae(v, loaded, top_k=3, method="sparse").features == PLANTED


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="sae.save_model"):
        load_sae(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "half")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(SAE, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match=r"no pretrained SAE can be downloaded.*load_sae\("):
        load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")


def test_packaged_registry_hook(tmp_path, monkeypatch, sae):
    sae.save_model(tmp_path / "data" / "saes" / "toy")  # tmp_path stands in for melbo_lens/
    monkeypatch.setitem(sae_mod.PACKAGED_SAES, "toy-sae", "saes/toy")
    monkeypatch.setattr(sae_mod.resources, "files", lambda package: tmp_path)
    assert sae_site(load_sae("toy-sae")) == SITE
    assert sae_mod.PACKAGED_SAES["toy-sae"] == "saes/toy"


def test_unfolded_normalisation_warns(tiny_model):
    sae = make_sae()
    sae.cfg.normalize_activations = "expected_average_only_in"
    with pytest.warns(UserWarning, match="fold"), clamp_feature(tiny_model, sae, 0, 1.0):
        pass


def test_sae_site_errors():
    sae = make_sae()
    sae.cfg.metadata.hook_name = "blocks.1.attn.hook_z"
    with pytest.raises(ValueError, match="not a residual-width"):
        sae_site(sae)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="no hook name"):
        sae_site(sae)


# ---------------------------------------------------------------------- feature steering
def test_feature_vectors_norms_and_site(sae):
    raw = feature_vectors(sae, [3, 9])
    torch.testing.assert_close(raw.vectors, planted_decoder()[[3, 9]])
    fv = feature_vectors(sae, PLANTED, radius=7.5, target=HookSite(3))
    torch.testing.assert_close(fv.radius, torch.full((3,), 7.5))
    assert fv.site == SITE and fv.target == HookSite(3) and fv.method == "sae_feature"
    per = feature_vectors(sae, [1, 2], radius=[1.0, 2.0])
    torch.testing.assert_close(per.radius, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="out of range"):
        feature_vectors(sae, [64])
    with pytest.raises(ValueError, match="radius"):
        feature_vectors(sae, [1], radius=-1.0)


def test_feature_vectors_for_topk_rescaled_decoder():
    sae = make_sae(cls=TopKSAE, k=4, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    # decode divides by the decoder norm, so the direction at activation 1 has unit norm
    fv = feature_vectors(sae, [0])
    torch.testing.assert_close(fv.radius, torch.ones(1))
    f = torch.zeros(D_SAE)
    f[0] = 1.0
    torch.testing.assert_close(sae.decode(f) - sae.decode(torch.zeros(D_SAE)), fv.vectors[0])


def _resid(model, tokens, site):
    _, cache = model.run_with_cache(tokens, names_filter=site.name)
    return cache[site.name]


def test_clamp_feature_keeps_error_term(tiny_model):
    sae = make_sae(b_enc=0.1)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    base_logits = tiny_model(tokens)
    x = _resid(tiny_model, tokens, SITE)
    f = sae.encode(x).detach()
    feat = int(f.abs().sum((0, 1)).argmax())
    # clamping to the current activation changes nothing (error term kept)
    with clamp_feature(tiny_model, sae, feat, f[..., feat]):
        same = tiny_model(tokens)
    # tol: tiny-model logits / SAE activations are O(1-10)
    torch.testing.assert_close(same, base_logits, atol=1e-5, rtol=0)
    # another value changes exactly that feature's decoded contribution
    with clamp_feature(tiny_model, sae, feat, 5.0):
        x_clamped = _resid(tiny_model, tokens, SITE)
        changed = tiny_model(tokens)
    expected = x + (5.0 - f[..., feat])[..., None] * sae.W_dec[feat].detach()
    # tol: tiny-model logits / SAE activations are O(1-10)
    torch.testing.assert_close(x_clamped, expected, atol=1e-5, rtol=0)
    assert (changed - base_logits).abs().max() > 1e-3
    # hooks removed on exit, also when the body raises
    with pytest.raises(KeyError), clamp_feature(tiny_model, sae, feat, 5.0):
        raise KeyError("boom")
    torch.testing.assert_close(tiny_model(tokens), base_logits)
    with pytest.raises(ValueError, match="feature"):
        with clamp_feature(tiny_model, sae, D_SAE, 1.0):
            pass


@pytest.mark.parametrize(
    "kind",
    ["topk", "jumprelu", "layer_norm"],
)
def test_clamp_feature_other_architectures(tiny_model, kind):
    if kind == "topk":
        sae = make_sae(cls=TopKSAE, k=8, b_enc=0.1)
    elif kind == "jumprelu":
        sae = make_sae(cls=JumpReLUSAE, b_enc=0.1)
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    else:  # per-token normalisation inside the SAE: decode depends on the input's norm
        sae = make_sae(b_enc=0.1, normalize_activations="layer_norm")
    tokens = torch.arange(1, 9)[None]
    base = tiny_model(tokens)
    x = _resid(tiny_model, tokens, SITE)
    f = sae.encode(x).detach()
    feat = int(f.sum((0, 1)).argmax())
    with clamp_feature(tiny_model, sae, feat, f[..., feat]):
        # tol: tiny-model logits / SAE activations are O(1-10)
        torch.testing.assert_close(tiny_model(tokens), base, atol=1e-5, rtol=0)
    with clamp_feature(tiny_model, sae, feat, 0.0):
        x0 = _resid(tiny_model, tokens, SITE)
    # switching the feature off removes its decoded contribution, nothing else
    delta = x0 - x
    direction = sae.W_dec[feat].detach()
    if kind == "layer_norm":  # the contribution is rescaled per token by the input's std
        cos = torch.nn.functional.cosine_similarity(delta, direction.expand_as(delta), dim=-1)
        assert (cos < -0.999).all()
    else:
        # tol: tiny-model logits / SAE activations are O(1-10)
        torch.testing.assert_close(delta, -f[..., feat, None] * direction, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- effects
def test_feature_effects_finds_planted_feature(tiny_model):
    # b_enc large: every feature is active, so the encoder is linear around the prompts
    sae = make_sae(b_enc=20.0)
    feat = 17
    vec = SteeringVectors(3.0 * planted_decoder()[[feat]], SITE, method="planted")
    prompts = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4, 5], [6, 7, 8]])
    fx = feature_effects(tiny_model, sae, vec, 0, prompts, top_n=5)
    assert fx.features[0] == feat
    assert fx.mean_abs_change[0] == pytest.approx(3.0, abs=1e-4)
    assert fx.before.shape == (2, 5, 5) and fx.after.shape == (2, 5, 5)
    assert not fx.before[1, 3:].any()  # padding is zeroed
    # tol: tiny-model logits / SAE activations are O(1-10)
    torch.testing.assert_close(fx.change[..., 0][fx.mask], torch.full((8,), 3.0), atol=1e-4, rtol=0)
    assert fx.l0_before == pytest.approx(D_SAE)
    # resid_pre of the next block is the same tensor: same answer
    fx_pre = feature_effects(
        tiny_model, make_sae(HookSite(2, "resid_pre"), b_enc=20.0), vec, 0, prompts, top_n=5
    )
    assert fx_pre.features == fx.features
    torch.testing.assert_close(fx_pre.after, fx.after)
    json.dumps(fx.to_dict())
    assert str(feat) in fx.table()


def test_feature_effects_at_a_later_site_and_errors(tiny_model):
    sae = make_sae(HookSite(3), b_enc=0.5)
    vec = SteeringVectors(
        torch.randn(2, D_IN, generator=torch.Generator().manual_seed(3)) * 4, HookSite(1)
    )
    prompts = PromptSet.from_tokens(tiny_model, [[1, 2, 3], [4, 5]], target_positions=[-1])
    fx = feature_effects(tiny_model, sae, vec, 1, prompts, top_n=4, positions="target")
    assert len(fx.features) == 4 and fx.mean_abs_change[0] > 0
    assert fx.mask.sum() == 2
    with pytest.raises(ValueError, match="before the vector's site"):
        feature_effects(tiny_model, make_sae(HookSite(0)), vec, 0, prompts)
    with pytest.raises(ValueError, match="no prompts"):
        feature_effects(tiny_model, sae, vec, 0, [])
    foreign = SteeringVectors(torch.randn(1, 48), HookSite(1))
    with pytest.raises(ValueError, match="another model"):
        feature_effects(tiny_model, sae, foreign, 0, prompts)


def test_compare_with_features_equal_norm(tiny_model):
    sae = make_sae()
    v, _ = planted_vector()
    vec = SteeringVectors(v[None], SITE, target=HookSite(3))
    prompts = PromptSet.from_tokens(tiny_model, [[1, 2, 3, 4], [5, 6]])
    cmp = compare_with_features(tiny_model, prompts, vec, 0, sae, PLANTED)
    assert len(cmp.objective) == 4 and len(cmp.delta_cosine) == 3
    assert cmp.radius == pytest.approx(float(v.norm()))
    # the largest-coefficient feature moves the target most like the vector itself
    assert max(range(3), key=lambda j: cmp.delta_cosine[j]) == 0
    json.dumps(cmp.to_dict())
    assert "feature 0" in cmp.table()


# ---------------------------------------------------------------------- ranking
def test_features_are_ranked_by_importance_not_by_index(sae):
    """Planted features whose index order differs from their magnitude order, so a
    result in feature-index order (or in OMP's selection order) cannot pass."""
    w = planted_decoder()
    # cosine: near-orthogonal atoms 26 (4.0) > 0 (-3.0) > 17 (2.5) by |cos|
    v = 4.0 * w[26] - 3.0 * w[0] + 2.5 * w[17]
    assert decompose_onto_sae(v, sae, top_k=2, method="cosine").features == [26, 0]
    # sparse: correlated atoms; OMP selects 5 first, but |coefficients| rank 42, 17, 5
    v = 4.0 * w[42] - 3.5 * w[17] + 3.0 * w[5]
    dec = decompose_onto_sae(v, sae, top_k=3, method="sparse")
    assert dec.features == [42, 17, 5]
    assert dec.coefficients == pytest.approx([4.0, -3.5, 3.0], abs=1e-4)
