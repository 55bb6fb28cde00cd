"""`analyze_run`: compute a run's analysis (`RunAnalysis`, `workflows.run_analysis`) once,
for the report and the CLI to render: the objective against random vectors of the same
size, steered completions, similarities, SAE decompositions, attributions and per-token
views, each step timed and reported on the one progress path."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.analysis.attribution import (
    attribute_target_delta,
)
from melbo_lens.analysis.cards import vector_cards
from melbo_lens.analysis.corpus import Corpus, load_corpus
from melbo_lens.analysis.deltas import perturbation_objectives
from melbo_lens.analysis.similarity import cosine_matrix, delta_similarity
from melbo_lens.analysis.tokens import (
    feature_token_activations,
    token_delta_norms,
)
from melbo_lens.core.host import Host
from melbo_lens.core.progress import say
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite, as_site
from melbo_lens.generation import SteeredGenerations, generate
from melbo_lens.methods.baselines import random_adapters, random_vectors
from melbo_lens.methods.config import objective_settings
from melbo_lens.methods.objectives import segment_objectives
from melbo_lens.perturbations.adapters import SteeringAdapters
from melbo_lens.perturbations.soft_prompts import SoftPrompts
from melbo_lens.perturbations.trained import Trained
from melbo_lens.perturbations.vectors import SteeringVectors
from melbo_lens.workflows.run_saes import dashboards_of, pick_sae, pick_target_sae

if TYPE_CHECKING:
    pass

from melbo_lens.workflows.run_analysis import (
    ANALYSIS_JSON,
    FORMAT,
    VECTORS_FILE,
    RunAnalysis,
    RunAnalysisError,
    compact_attribution,
    package_version,
    run_labels,
)

__all__ = [
    "ANALYSIS_JSON",
    "FORMAT",
    "VECTORS_FILE",
    "RunAnalysis",
    "RunAnalysisError",
    "analyze_run",
    "bundled_corpus",
]


def analyze_run(
    model: Host,
    vectors: Trained,
    prompts: PromptSet | Sequence[str] | None = None,
    *,
    generations: SteeredGenerations | None = None,
    sae: Any = "auto",
    n_random: int = 32,
    random_seed: int = 1234,
    target: HookSite | str | int | None = None,
    max_new_tokens: int = 32,
    attribution: str = "exact",
    attribution_prompts: int = 2,
    attribution_top: int = 8,
    top_features: int = 10,
    feature_token_k: int = 5,
    corpus: Corpus | str | os.PathLike[str] | Sequence[str] | None = None,
    target_sae: Any = "auto",
    dashboard_tokens: int = 32_768,
    cards: bool = True,
    progress: bool = True,
) -> RunAnalysis:
    """Compute everything the report shows about `vectors` (see the module docstring).

    `prompts` default to the ones the vectors were trained on (their provenance);
    `generations` are made (greedy, `max_new_tokens`) when not given and the model has a
    tokenizer. `sae="auto"` picks the packaged SAE for this model at the source site if
    there is one; None skips the SAE parts; an SAE object or a name/path uses that one.
    Attribution runs on the first `attribution_prompts` prompts: by default the exact split
    of Δ into source, heads and MLPs (a few forward passes); `attribution=
    "attribution_patching"` or `"integrated_gradients"` adds node estimates and verifies
    the top `attribution_top` by patching (on SmolLM2 about 10x the cost of "exact").

    Explanations read `corpus` (a name such as "melbo-chat-prose", a file, a `Corpus` or
    texts; None: the bundled prompts, about 100 tokens): feature dashboards of every
    latent the decompositions name (first `dashboard_tokens` tokens, cached), and with
    `cards` a card per vector (`vector_cards`) whose latents come from `target_sae`
    ("auto": the packaged SAE at the target site, if any), with dashboards of those too.

    Args:
        model: the model the vectors were trained on.
        vectors: `SteeringVectors`, `SteeringAdapters` or `SoftPrompts`.
        prompts: the prompts to analyse on (default: the training prompts).
        generations: completions already made (default: made here, greedy).
        sae: "auto", None, an SAE, or a name or path (see above).
        n_random: random vectors of the same R for the objective's baseline.
        random_seed: their seed.
        target: where the change is read (default: the vectors' target).
        max_new_tokens: tokens per completion when they are made here.
        attribution: "exact", "attribution_patching" or "integrated_gradients".
        attribution_prompts: how many prompts the attribution runs on.
        attribution_top: estimated nodes verified by patching.
        top_features: SAE features kept per vector.
        feature_token_k: top tokens kept per feature on the prompts.
        corpus: what the dashboards read (see above).
        target_sae: the SAE the cards read at the target ("auto", None or an SAE).
        dashboard_tokens: corpus tokens the dashboards stream.
        cards: make a card per vector.
        progress: announce each step.

    Returns:
        `RunAnalysis`, what `write_report` renders; `save(folder)` keeps it.

    Raises:
        TypeError: a perturbation that is not a trained artifact.

    Examples:
        >>> run = analyze_run(model, vectors, prompts, sae=None, n_random=4, max_new_tokens=3,
        ...                   cards=False, progress=False)
        >>> len(run.objective), len(run.random_objective)
        (4, 4)
    """
    if not isinstance(vectors, Trained):
        raise TypeError(
            "analyze_run takes SteeringVectors, SteeringAdapters or SoftPrompts, got "
            f"{type(vectors).__name__}"
        )
    steps = _Steps(progress)
    ps = _prompt_set(model, vectors, prompts)
    tgt = _target(vectors, target)
    notes: list[str] = []
    power, q = objective_settings(vectors.method, vectors.config)
    radius = (
        float(vectors.radius)
        if isinstance(vectors, SteeringAdapters)
        else float(vectors.norms.mean())
    )

    with steps("objective and random baseline"):
        if isinstance(vectors, SteeringVectors):
            rand = random_vectors(model, vectors.site, n=n_random, radius=radius, seed=random_seed)
            both = torch.cat([vectors.vectors.float(), rand.vectors.float()])
            scores = _objective(model, both, vectors.site, tgt, ps, power, q)  # one prefix pass
            objective, random_objective = scores[: len(vectors)], scores[len(vectors) :]
        else:  # against random members of the same shape and size
            rand_p = _random_like(model, vectors, n_random, radius, random_seed)
            objective, random_objective = (
                perturbation_objectives(model, p, ps, tgt, power=power, q=q).tolist()
                for p in (vectors, rand_p)
            )

    with steps("similarity"):
        # vectors: cosines of θ; adapters: of their weight edits ΔW_out; soft prompts: of
        # their embeddings, all m tokens together
        vsim = cosine_matrix(
            vectors
            if isinstance(vectors, SteeringVectors)
            else vectors.weight_deltas().flatten(1)
            if isinstance(vectors, SteeringAdapters)
            else vectors.embeddings.flatten(1)
        )
        dsim = delta_similarity(model, ps, vectors, target=tgt)

    if generations is None and getattr(model, "tokenizer", None) is not None:
        with steps("steered generation"):
            generations = generate(model, vectors, ps, max_new_tokens=max_new_tokens)
    elif generations is None:
        notes.append("no completions: the model has no tokenizer to decode text with")

    sae_obj = sae_name = None
    sv = vectors if isinstance(vectors, SteeringVectors) else None  # the vector-only parts
    if sv is not None:
        sae_obj, sae_name = pick_sae(model, sv, sae, notes)
    elif sae is not None:
        notes.append("SAE parts skipped: decomposition onto SAE features is for vectors")
    decompositions = feature_tokens = None
    dashboards: dict[str, Any] = {}
    texts = load_corpus(corpus) if corpus is not None else load_corpus("prompts")
    if corpus is None:
        notes.append(
            "contexts come from the bundled prompts (~100 tokens); pass corpus="
            "'melbo-chat-prose' (`melbo-lens corpus build`) for readable dashboards"
        )
    if sae_obj is not None and sv is not None:
        from melbo_lens.analysis.sae import decompose_onto_sae, sae_site

        with steps("SAE decomposition"):
            decompositions = [
                decompose_onto_sae(sv, sae_obj, index=k, top_k=top_features)
                for k in range(len(vectors))
            ]
        if getattr(model, "tokenizer", None) is not None:
            with steps("feature dashboards (source)"):
                feats = sorted({f for d in decompositions for f in d.features})
                dash = dashboards_of(model, sae_obj, texts, feats, dashboard_tokens, progress)
                dashboards[sae_site(sae_obj).name] = dash
                feature_tokens = {
                    f: [(c.text(), c.value) for c in dash[f].top_activations[:feature_token_k]]
                    for f in feats
                }

    with steps("attribution"):
        sub = ps[: max(1, min(attribution_prompts, len(ps)))]
        attributions = [
            compact_attribution(
                attribute_target_delta(
                    model, sub, vectors, k, method=attribution, target=tgt, top_n=attribution_top
                )
            )
            for k in range(len(vectors))
        ]

    token_deltas = activations = None
    if generations is not None:
        with steps("token views"):
            token_deltas = token_delta_norms(model, vectors, generations, target=tgt)
            if decompositions is not None and sv is not None:
                activations = []
                for k, dec in enumerate(decompositions):
                    if not dec.features:
                        activations.append(None)
                        continue
                    # the strongest feature pointing along θ (adding θ turns it up)
                    up = [f for f, c in zip(dec.features, dec.coefficients, strict=True) if c > 0]
                    text = (generations.prompts[0], generations.for_vector(k)[0])
                    activations.append(
                        feature_token_activations(
                            model, sv, k, sae_obj, (up or dec.features)[0], text
                        )
                    )

    card_list = None
    if cards and getattr(model, "tokenizer", None) is not None:
        tsae = pick_target_sae(model, vectors, tgt, target_sae, notes)
        with steps("vector cards"):
            card_list = vector_cards(
                model,
                vectors,
                texts,
                sae=tsae,
                generations=generations,
                labels=run_labels(vectors),
                context_tokens=min(16_384, dashboard_tokens),
            )
        if tsae is not None:
            with steps("feature dashboards (target)"):
                feats = sorted({f for c in card_list for f, _ in c.latents_on + c.latents_off})
                if feats:
                    dashboards[tgt.name] = dashboards_of(
                        model, tsae, texts, feats, dashboard_tokens, progress
                    )

    info = {
        "model": getattr(getattr(model, "cfg", None), "model_name", None),
        "corpus": {"name": texts.name, "sha256": texts.sha256},
        "site": vectors.site.name,
        "target": tgt.name,
        "radius": radius,
        "power": power,
        "q": q,
        "n_prompts": len(ps),
        "prompts": list(ps.texts) if ps.texts is not None else None,
        "n_random": n_random,
        "random_seed": random_seed,
        "attribution": {
            "method": attribution,
            "prompts": len(sub),
            "verified_top": attribution_top,
        },
        **(
            {"nearest_tokens": vectors.nearest_tokens(model, k=5)}
            if isinstance(vectors, SoftPrompts) and getattr(model, "W_E", None) is not None
            else {}
        ),
        "seconds": steps.seconds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "melbo_lens": package_version(),
    }
    return RunAnalysis(
        vectors=vectors,
        objective=objective,
        random_objective=random_objective,
        generations=generations,
        vector_similarity=vsim,
        delta_similarity=dsim,
        decompositions=decompositions,
        feature_tokens=feature_tokens,
        attributions=attributions,
        token_deltas=token_deltas,
        feature_activations=activations,
        sae_name=sae_name,
        notes=notes,
        info=info,
        dashboards=dashboards or None,
        cards=card_list,
    )


def bundled_corpus() -> list[str]:
    """The texts of `melbo_lens/data/prompts.json` (every list in it, deduplicated)."""
    from importlib import resources

    data = json.loads(resources.files("melbo_lens").joinpath("data/prompts.json").read_text())
    texts = [t for v in data.values() if isinstance(v, list) for t in v if isinstance(t, str)]
    return list(dict.fromkeys(texts))


class _Steps:
    """Times named steps; prints one line per step when `progress`."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        sec = time.perf_counter() - start
        self.seconds[name] = round(sec, 3)
        say(self.progress, f"  analysis: {name} ({sec:.1f} s)")


def _random_like(
    model: Host, art: SteeringAdapters | SoftPrompts, n: int, radius: float, seed: int
) -> SteeringAdapters | SoftPrompts:
    """The random baseline of a non-vector artifact: random adapters of the same layer,
    rank and radius, or soft prompts of Gaussian embeddings with the same m and norm."""
    if isinstance(art, SteeringAdapters):
        return random_adapters(model, art.layer, n=n, radius=radius, rank=art.rank, seed=seed)
    m, d = art.n_tokens, art.embeddings.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, m, d, generator=gen), dim=-1) * radius
    return SoftPrompts(emb, placeholder=art.placeholder, method="random")


def _prompt_set(
    model: Host,
    vectors: Trained,
    prompts: PromptSet | Sequence[str] | None,
) -> PromptSet:
    if isinstance(vectors, SoftPrompts) and prompts is not None:
        return vectors.prepare(model, prompts)  # its placeholders in the user turns
    if isinstance(prompts, PromptSet):
        return prompts
    if prompts is not None:
        return PromptSet.from_texts(model, list(prompts))
    if not vectors.prompts:
        raise ValueError(
            "the vectors record no training prompts; pass prompts=[...] (texts or a PromptSet)"
        )
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
    return PromptSet.from_dict(vectors.prompts, model).to(device)


def _target(vectors: Trained, target: HookSite | str | int | None) -> HookSite:
    if target is not None:
        return as_site(target)
    if vectors.target is None:
        raise ValueError(
            "the vectors record no target site; pass target=HookSite(layer, point) "
            "(where the objective and the deltas are read)"
        )
    return vectors.target


@torch.no_grad()
def _objective(
    model: Host,
    vecs: Float[Tensor, "n d_model"],
    site: HookSite,
    target: HookSite,
    ps: PromptSet,
    power: float,
    q: float,
) -> list[float]:
    """Σ_i (Σ_t mask·||Z_t(θ) − Z_t(0)||^p)^(1/q) for each vector (MELBO's objective)."""
    return segment_objectives(Segment(model, site, target, ps), vecs, power=power, q=q).tolist()
