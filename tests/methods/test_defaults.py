"""The defaults that scale with the model: sites by depth, outlier-norm positions left out
of the objective, and R chosen by the radius search (`radius="auto"`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from melbo_lens import HookSite, MelboConfig, PromptSet, SteeringVectors, train_steering_vectors
from melbo_lens.core.outliers import OUTLIER_FACTOR, norm_outliers, without_norm_outliers
from melbo_lens.methods import radius as radius_mod
from melbo_lens.methods.defaults import default_sites, describe_defaults
from melbo_lens.methods.radius import FLUENCY_LIMIT, RadiusChoice

torch.set_num_threads(1)
TOKENS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]


@pytest.fixture
def sink_model(tiny_model):
    """A copy of the tiny model with token 1's embedding scaled 400x: an
    attention-sink-like outlier norm wherever token 1 sits, at every later layer."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.W_E[1] *= 400.0
    return model


def test_norm_outliers_by_hand():
    norms = torch.tensor([[100.0, 10.0, 12.0, 9.0, 11.0], [10.0, 49.0, 51.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    # row 0: median 11 -> bound 55; row 1: median 49 -> bound 245 (nothing out)
    assert norm_outliers(norms, mask).tolist() == [
        [True, False, False, False, False],
        [False, False, False, False, False],
    ]
    assert OUTLIER_FACTOR == 5.0


def test_outlier_positions_match_the_norms_at_the_target(sink_model):
    prompts = PromptSet.from_tokens(sink_model, TOKENS)
    target = HookSite(2)
    resolved, excluded = without_norm_outliers(sink_model, prompts, target)
    _, cache = sink_model.run_with_cache(prompts.tokens, attention_mask=prompts.attention_mask)
    norms = cache[target.name].norm(dim=-1)
    want = []
    for i, row in enumerate(TOKENS):
        real = norms[i, : len(row)]
        want.append([t for t in range(len(row)) if real[t] > 5 * real.median()])
    assert excluded == want == [[0], []]  # token 1 sits at position 0 of prompt 0
    assert resolved.target_mask[0].tolist() == [False] + [True] * 5
    assert resolved.target_mask[1].tolist() == prompts.target_mask[1].tolist()


def test_training_leaves_out_the_outlier_and_records_it(sink_model):
    cfg = MelboConfig(HookSite(0), HookSite(2), n_vectors=2, radius=2.0, steps=5)
    default = train_steering_vectors(
        sink_model, PromptSet.from_tokens(sink_model, TOKENS), cfg, progress=False
    )
    auto = default.metadata["auto"]
    assert auto["positions"]["excluded"] == [[0], []] and "sites" not in auto
    assert default.prompts["targets"][0] == [1, 2, 3, 4, 5]
    # explicit positions are kept as given: "all" includes the outlier
    explicit = PromptSet.from_tokens(sink_model, TOKENS, target_positions=slice(None))
    everything = train_steering_vectors(sink_model, explicit, cfg, progress=False)
    assert "auto" not in everything.metadata
    assert everything.prompts["targets"][0] == [0, 1, 2, 3, 4, 5]


def test_default_sites_by_depth():
    for n, want in {30: (7, 22), 18: (4, 13), 4: (0, 3), 24: (5, 18), 40: (9, 30)}.items():
        source, target = default_sites(n)
        assert (source.layer, source.point, target.layer, target.point) == (
            want[0],
            "resid_post",
            want[1],
            "resid_pre",
        )
    for n in range(1, 80):  # always a valid, ordered pair of sites
        source, target = default_sites(n)
        assert source.validate_for(n) and target.validate_for(n)
        assert source.position < target.position


def _fake_search(monkeypatch, collapse_above: float, diversity=lambda r: r):
    """Replace the probe with a planted fluency curve: collapse above `collapse_above`."""
    measured = []

    def probe_call(self, vectors):
        r = float(vectors[0].norm())
        measured.append(r)
        fluency = 1.0 if r <= collapse_above else FLUENCY_LIMIT * 10
        return fluency, diversity(r)

    monkeypatch.setattr(radius_mod._Probe, "__call__", probe_call)
    return measured


@pytest.mark.parametrize(
    "collapse_at", [0.3, 0.05, 2.5, 1e-3, 1e3, 0.02, 0.025]
)  # 0.02, 0.025: in the lowest octave
def test_the_walk_finds_a_planted_cusp(tiny_model, monkeypatch, collapse_at):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS, target_positions=slice(None))
    rho = radius_mod.median_source_norm(tiny_model, prompts, HookSite(0))
    measured = _fake_search(monkeypatch, collapse_at * rho)
    cfg = MelboConfig(HookSite(0), HookSite(2), n_vectors=2, steps=3)
    vectors = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    choice = RadiusChoice.from_dict(vectors.metadata["auto"]["radius"])
    candidates = sorted({*choice.grid, *(g * math.sqrt(2) for g in choice.grid)})
    fluent = [r for r in candidates if r <= collapse_at * rho * (1 + 1e-6)]
    if collapse_at < 2**-6:  # collapsed everywhere: the smallest radius, said so
        assert choice.collapsed_everywhere and choice.radius == choice.grid[0]
    elif collapse_at > 4:  # fluent everywhere: the top of the grid
        assert choice.radius == pytest.approx(choice.grid[-1])
    else:  # the largest fluent radius on the √2-refined grid, measured there
        assert choice.radius == pytest.approx(fluent[-1], rel=1e-6)
        assert not choice.collapsed_everywhere and choice.radius in choice.radii
    assert float(vectors.vectors.norm(dim=-1)[0]) == pytest.approx(choice.radius, rel=1e-5)
    assert vectors.config["radius"] == pytest.approx(choice.radius)
    assert len(measured) <= 7  # a walk (at most 6 up + the midpoint), not the whole grid
    assert choice.grid == pytest.approx([rho * 2.0**k for k in range(-6, 3)])


def test_the_search_prefers_the_most_diverse_fluent_radius(tiny_model, monkeypatch):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS, target_positions=slice(None))
    rho = radius_mod.median_source_norm(tiny_model, prompts, HookSite(0))
    # diversity peaks at rho/8 (the start), fluency holds up to rho
    _fake_search(monkeypatch, rho, diversity=lambda r: -abs(math.log2(r / rho) + 3))
    cfg = MelboConfig(HookSite(0), HookSite(2), n_vectors=2, steps=3)
    vectors = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    assert vectors.config["radius"] == pytest.approx(rho / 8)


def test_default_config_trains_and_records_every_choice(tiny_model, capsys):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    vectors = train_steering_vectors(tiny_model, prompts, MelboConfig(n_vectors=3), progress=True)
    err = capsys.readouterr().err
    assert "auto sites: blocks.0.hook_resid_post -> blocks.3.hook_resid_pre" in err
    assert "auto radius: R = " in err and "radius search: R = " in err
    auto = vectors.metadata["auto"]
    assert set(auto) == {"sites", "positions", "radius"}
    choice = RadiusChoice.from_dict(auto["radius"])
    assert choice.radius in choice.radii and 0 < choice.seconds
    k = choice.radii.index(choice.radius)
    assert choice.fluency[k] <= FLUENCY_LIMIT
    torch.testing.assert_close(vectors.vectors.norm(dim=-1), torch.full((3,), choice.radius))
    lines = describe_defaults(vectors.metadata)
    assert set(lines) == {"sites (auto)", "target positions (auto)", "radius (auto)"}
    assert "of the" in lines["radius (auto)"]  # the search's cost next to the training's
    # the saved artifact keeps it
    assert MelboConfig.from_dict(vectors.config).radius == choice.radius


def test_resume_reuses_the_chosen_radius(tiny_model, tmp_path, monkeypatch):
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    cfg = MelboConfig(n_vectors=3, starts_per_vector=1, steps=6)
    full = train_steering_vectors(tiny_model, prompts, cfg, progress=False)
    path = tmp_path / "ckpt.safetensors"
    part = train_steering_vectors(
        tiny_model,
        prompts,
        cfg,
        progress=False,
        checkpoint=str(path),
        callback=lambda s: not (s.indices == [1] and s.step == 2),
    )
    assert not part.complete

    def no_search(*a, **k):
        raise AssertionError("a resumed run must not search again")

    monkeypatch.setattr(radius_mod, "search_radius", no_search)
    resumed = train_steering_vectors(tiny_model, prompts, cfg, progress=False, resume=str(path))
    assert resumed.complete
    assert torch.equal(resumed.vectors, full.vectors)  # bit-exact
    assert (
        resumed.metadata["auto"]["radius"] == SteeringVectors.load(path).metadata["auto"]["radius"]
    )


def test_auto_radius_errors_name_the_field():
    with pytest.raises(ValueError, match="radius must be 'auto' or a finite number > 0, got -1"):
        MelboConfig(radius=-1)
    with pytest.raises(ValueError, match="is chosen by train_steering_vectors"):
        MelboConfig().radius_value()


def test_positions_are_resolved_once_for_the_run_and_all_its_radius_probes(tiny_model, monkeypatch):
    """The outlier rule runs one forward pass for the whole default run; the radius
    search's probes re-enter `train_steering_vectors` with the resolved prompts, whose
    positions are explicit now, and keep them as they are."""
    import melbo_lens.methods.defaults as defaults

    calls = []
    real = defaults.without_norm_outliers

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(defaults, "without_norm_outliers", counted)
    prompts = PromptSet.from_tokens(tiny_model, TOKENS)
    vectors = train_steering_vectors(tiny_model, prompts, MelboConfig(n_vectors=2), progress=False)
    choice = RadiusChoice.from_dict(vectors.metadata["auto"]["radius"])
    assert len(choice.radii) >= 2  # the search probed several radii
    assert len(calls) == 1
    assert "positions" in vectors.metadata["auto"]
    assert vectors.prompts["targets"] == [
        [t for t in range(len(row)) if t not in out]
        for row, out in zip(TOKENS, vectors.metadata["auto"]["positions"]["excluded"], strict=True)
    ]
