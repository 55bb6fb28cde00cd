"""A run's analysis: everything the report shows about a set of steering vectors, and its files.

A *run* is one set of trained vectors together with what was learned about them. Its
analysis (`RunAnalysis`) gathers existing result objects, computed once by
`analyze_run` and then only rendered (`melbo_lens.views.report`):

* the vectors and their objective on the prompts, next to the same objective for
  random vectors of the same radius R at the same site (the baseline);
* steered completions against unsteered ones (`SteeredGenerations`);
* cosine similarity of the vectors and of their target-layer deltas (`CosineMatrix`);
* each vector read in an SAE's dictionary (`SaeDecomposition`) and the top-activating
  tokens of those features over the bundled corpus, when an SAE fits the source site;
* the exact split of each vector's target-layer change Δ into components, with node
  attributions of Σ_t ||Δ_t||² checked against patching (`DeltaAttribution`);
* per-token ||Δ_t|| along a completion (`TokenDeltas`) and the activation of each
  vector's top feature along it, with and without the vector (`TokenActivations`).

Missing parts (no SAE for this model/site, no tokenizer to generate with) are None and
`notes` says why. `save(run_dir)` writes `analysis.json` (plain JSON), `analysis.safetensors`
(the attribution tensors) and `vectors.safetensors`, each atomically, JSON last;
`RunAnalysis.load` checks that the three belong together. Nothing is pickled.

Saved attributions keep each component's projection onto Δ_t instead of the full
[d_model] vector: ⟨c_t, Δ_t⟩/||Δ_t||. That preserves contributions (Σ_t ⟨c_t, Δ_t⟩),
token norms ||Δ_t|| and per-token shares exactly, and is d_model times smaller.

Why one module over ~400 lines: one dataclass and its file format: the save, load and
consistency checks stay next to the fields they write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from melbo_lens.analysis.attribution import (
    DeltaAttribution,
    DeltaDecomposition,
)
from melbo_lens.analysis.cards import PerturbationCard
from melbo_lens.analysis.similarity import CosineMatrix
from melbo_lens.analysis.tokens import (
    TokenActivations,
    TokenDeltas,
)
from melbo_lens.core.io import atomic_save_tensors, atomic_write_text, read_artifact
from melbo_lens.core.sites import HookSite
from melbo_lens.generation import SteeredGenerations
from melbo_lens.perturbations.artifact import load_artifact
from melbo_lens.perturbations.soft_prompts import SoftPrompts
from melbo_lens.perturbations.trained import Trained
from melbo_lens.perturbations.vectors import SteeringVectors

if TYPE_CHECKING:
    from melbo_lens.analysis.sae import SaeDecomposition  # sae-lens is imported only when used
    from melbo_lens.analysis.sae.dashboard_result import FeatureDashboards

__all__ = [
    "ANALYSIS_JSON",
    "FORMAT",
    "RunAnalysis",
    "RunAnalysisError",
    "VECTORS_FILE",
    "compact_attribution",
    "package_version",
    "run_labels",
]

FORMAT = "melbo_lens.run_analysis/1"
_TENSORS_FORMAT = "melbo_lens.run_analysis_tensors/1"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_TENSORS = "analysis.safetensors"
VECTORS_FILE = "vectors.safetensors"
DASHBOARDS_DIR = "dashboards"


class RunAnalysisError(ValueError):
    """A run directory does not hold a readable, consistent saved analysis."""


@dataclass
class RunAnalysis:
    """What the report shows about one run; every part a result object or plain data.

    `objective[k]` is vector k's objective Σ_i (Σ_t ||Δ_t||^p)^(1/q) on `prompts`, and
    `random_objective` the same objective for random vectors of the same radius at the
    same site. Optional parts are None when they could not be computed (see `notes`).

    Attributes:
        vectors: The trained vectors or adapters.
        objective: Each member's objective on the run's prompts.
        random_objective: Random members' objectives at the same R and site.
        generations: Steered completions.
        vector_similarity: Cosines of the vectors.
        delta_similarity: Cosines of their target deltas.
        decompositions: Each vector in the SAE's dictionary.
        feature_tokens: Top-activating tokens of the latents shown.
        attributions: Attribution of the target change per vector.
        token_deltas: ‖Δ_t‖ per token of each completion.
        feature_activations: Per-token activations of each vector's top latent.
        sae_name: The SAE used.
        notes: What could not be computed, and why.
        info: Run settings and provenance.
        dashboards: Dashboards of the latents shown.
        cards: One card per member.
    """

    vectors: Trained
    objective: list[float]
    random_objective: list[float]
    generations: SteeredGenerations | None = None
    vector_similarity: CosineMatrix | None = None
    delta_similarity: CosineMatrix | None = None
    decompositions: list[SaeDecomposition] | None = None
    feature_tokens: dict[int, list[tuple[str, float]]] | None = None
    attributions: list[DeltaAttribution] | None = None
    token_deltas: list[TokenDeltas] | None = None
    feature_activations: list[TokenActivations | None] | None = None
    sae_name: str | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    dashboards: dict[str, FeatureDashboards] | None = None  # by SAE hook
    cards: list[PerturbationCard] | None = None

    def __post_init__(self) -> None:
        n = len(self.vectors)
        for name in ("objective", "decompositions", "attributions", "token_deltas", "cards"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but there are {n} vectors")
        if self.feature_activations is not None and len(self.feature_activations) != n:
            raise ValueError(
                f"feature_activations has {len(self.feature_activations)} entries "
                f"but there are {n} vectors"
            )

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def labels(self) -> list[str]:
        """`vectors.metadata["labels"]` if it has one per vector, else `method[k]`."""
        return run_labels(self.vectors)

    @property
    def scored_vectors(self) -> Trained:
        """The vectors with `objective` set to the objective measured here."""
        return replace(self.vectors, objective=torch.tensor(self.objective))

    def random_ratio(self) -> list[float]:
        """objective[k] / mean random objective (empty without a baseline)."""
        mean = self.random_summary().get("mean")
        if not mean:
            return []
        return [x / mean for x in self.objective]

    def random_rank(self) -> list[float]:
        """Fraction of the random vectors whose objective is below objective[k]."""
        r = self.random_objective
        if not r:
            return []
        return [sum(x < o for x in r) / len(r) for o in self.objective]

    def random_summary(self) -> dict[str, float]:
        """Mean, std, max and count of the random baseline's objective."""
        r = torch.tensor(self.random_objective, dtype=torch.float64)
        if r.numel() == 0:
            return {}
        mean = float(r.mean())
        return {
            "mean": mean,
            "std": float(r.std()) if r.numel() > 1 else 0.0,
            "max": float(r.max()),
            "n": float(r.numel()),
        }

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON of everything but the tensors (`save` writes those separately)."""
        return {
            "format": FORMAT,
            "n_vectors": len(self),
            "vectors_sha256": _artifact_digest(self.vectors),
            "objective": self.objective,
            "random_objective": self.random_objective,
            "generations": None if self.generations is None else self.generations.to_dict(),
            "vector_similarity": _to_dict(self.vector_similarity),
            "delta_similarity": _to_dict(self.delta_similarity),
            "decompositions": None
            if self.decompositions is None
            else [d.to_dict() for d in self.decompositions],
            "feature_tokens": None
            if self.feature_tokens is None
            else {str(f): [[t, a] for t, a in toks] for f, toks in self.feature_tokens.items()},
            "attributions": None
            if self.attributions is None
            else [
                compact_attribution(a).to_saved(f"attr.{k}.")[0]
                for k, a in enumerate(self.attributions)
            ],
            "token_deltas": None
            if self.token_deltas is None
            else [t.to_dict() for t in self.token_deltas],
            "feature_activations": None
            if self.feature_activations is None
            else [None if a is None else a.to_dict() for a in self.feature_activations],
            "sae_name": self.sae_name,
            "notes": list(self.notes),
            "info": self.info,
            "cards": None if self.cards is None else [c.to_dict() for c in self.cards],
            "dashboards": None
            if self.dashboards is None
            else {hook: d.info.get("key") for hook, d in self.dashboards.items()},
        }

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write `run_dir/{vectors.safetensors, analysis.safetensors, analysis.json}`.

        Each file is written atomically; analysis.json goes last and records a digest of
        the vectors, so a crash mid-save or a later retrain is detected by `load`.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.vectors.save(run_dir / VECTORS_FILE)
        tensors: dict[str, Tensor] = {}
        for k, att in enumerate(self.attributions or []):
            tensors.update(compact_attribution(att).to_saved(f"attr.{k}.")[1])
        data = self.to_dict()
        data["tensors_sha256"] = _digest(*[tensors[k] for k in sorted(tensors)])
        if tensors:
            atomic_save_tensors(
                tensors, run_dir / ANALYSIS_TENSORS, {"format": _TENSORS_FORMAT, "json": "{}"}
            )
        else:
            (run_dir / ANALYSIS_TENSORS).unlink(missing_ok=True)
        for hook, dash in (self.dashboards or {}).items():
            dash.save(run_dir / DASHBOARDS_DIR / hook)
        text = json.dumps(data, default=_jsonable)
        return atomic_write_text(run_dir / ANALYSIS_JSON, text)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunAnalysis:
        """Read what `save` wrote. Never unpickles; a foreign or torn run gives a clear error."""
        run_dir = Path(run_dir)
        path = run_dir / ANALYSIS_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"no saved analysis in {run_dir} (expected {ANALYSIS_JSON}); compute one with "
                f"analyze_run(...).save(dir) or `melbo-lens report {run_dir}`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunAnalysisError(
                f"{path} is not valid JSON ({err}); it may be truncated"
            ) from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RunAnalysisError(
                f"{path} is not a melbo_lens run analysis of format {FORMAT!r} "
                f"(found {found!r}); was it written by another tool or version?"
            )
        vectors = load_artifact(run_dir / VECTORS_FILE)
        if _artifact_digest(vectors) != data.get("vectors_sha256"):
            raise RunAnalysisError(
                f"{run_dir / VECTORS_FILE} is not the set of vectors {path.name} was computed "
                "for (the digests differ; were the vectors retrained?). Recompute the "
                f"analysis: `melbo-lens report {run_dir} --recompute`"
            )
        tensors: dict[str, Tensor] = {}
        if data.get("attributions"):
            tensors, _ = read_artifact(run_dir / ANALYSIS_TENSORS, _TENSORS_FORMAT)
        if _digest(*[tensors[k] for k in sorted(tensors)]) != data.get("tensors_sha256"):
            raise RunAnalysisError(
                f"{run_dir / ANALYSIS_TENSORS} does not match {path.name} (digests differ); "
                "the save was interrupted or the files come from different runs. Recompute "
                f"the analysis: `melbo-lens report {run_dir} --recompute`"
            )
        try:
            return cls._from_dict(data, vectors, tensors, run_dir)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise RunAnalysisError(f"{path} has corrupt analysis data: {err!r}") from err

    @classmethod
    def _from_dict(
        cls,
        data: dict[str, Any],
        vectors: SteeringVectors,
        tensors: dict[str, Tensor],
        run_dir: Path | None = None,
    ) -> RunAnalysis:
        def opt(key: str, fn: Any) -> Any:
            return None if data.get(key) is None else fn(data[key])

        return cls(
            vectors=vectors,
            objective=[float(x) for x in data["objective"]],
            random_objective=[float(x) for x in data["random_objective"]],
            generations=opt("generations", lambda d: SteeredGenerations(**d)),
            vector_similarity=opt("vector_similarity", CosineMatrix.from_dict),
            delta_similarity=opt("delta_similarity", CosineMatrix.from_dict),
            decompositions=opt("decompositions", lambda ds: _decompositions(ds)),
            feature_tokens=opt(
                "feature_tokens",
                lambda d: {int(f): [(str(t), float(a)) for t, a in v] for f, v in d.items()},
            ),
            attributions=opt(
                "attributions",
                lambda ds: [
                    DeltaAttribution.from_saved(d, tensors, f"attr.{k}.") for k, d in enumerate(ds)
                ],
            ),
            token_deltas=opt("token_deltas", lambda ds: [TokenDeltas.from_dict(d) for d in ds]),
            feature_activations=opt(
                "feature_activations",
                lambda ds: [None if d is None else TokenActivations.from_dict(d) for d in ds],
            ),
            sae_name=data.get("sae_name"),
            notes=list(data.get("notes", [])),
            info=dict(data.get("info", {})),
            cards=opt("cards", lambda cs: [PerturbationCard.from_dict(c) for c in cs]),
            dashboards=opt("dashboards", lambda d: _load_dashboards(run_dir, d)),
        )

    def __repr__(self) -> str:
        parts = [
            name
            for name in ("generations", "decompositions", "attributions", "token_deltas")
            if getattr(self, name) is not None
        ]
        return (
            f"RunAnalysis(n={len(self)}, site={self.vectors.site.name}, "
            f"random={len(self.random_objective)}, parts={parts}, notes={len(self.notes)})"
        )


# ---------------------------------------------------------------------- compute
def run_labels(vectors: Trained) -> list[str]:
    meta = vectors.metadata.get("labels") if vectors.metadata else None
    if isinstance(meta, list | tuple) and len(meta) == len(vectors):
        return [str(x) for x in meta]
    return [f"{vectors.method}[{k}]" for k in range(len(vectors))]


def compact_attribution(att: DeltaAttribution) -> DeltaAttribution:
    return replace(att, decomposition=_project(att.decomposition))


def _artifact_digest(art: Trained) -> str:
    """The digest that ties a saved analysis to the perturbation it was computed for."""
    if isinstance(art, SteeringVectors):
        return _digest(art.vectors)
    if isinstance(art, SoftPrompts):
        return _digest(art.embeddings)
    return _digest(art.omega_a, art.omega_b)


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_dashboards(run_dir: Path | None, keys: dict[str, Any]) -> dict[str, Any]:
    """The run's saved dashboards, each checked against the key analysis.json recorded."""
    from melbo_lens.analysis.sae.dashboard_result import FeatureDashboards

    out = {}
    for hook, key in keys.items():
        if run_dir is None:
            raise ValueError("dashboards are read from a run directory")
        dash = FeatureDashboards.load(run_dir / DASHBOARDS_DIR / hook)
        if dash.info.get("key") != key:
            raise RunAnalysisError(
                f"{run_dir / DASHBOARDS_DIR / hook} holds other dashboards than analysis.json "
                f"records; recompute: `melbo-lens report {run_dir} --recompute`"
            )
        out[hook] = dash
    return out


def _to_dict(m: CosineMatrix | None) -> dict[str, Any] | None:
    return None if m is None else m.to_dict()


def _decompositions(ds: list[dict[str, Any]]) -> list[SaeDecomposition]:
    from melbo_lens.analysis.sae import SaeDecomposition  # sae-lens only when SAE parts exist

    return [SaeDecomposition.from_dict(d) for d in ds]


def _jsonable(value: Any) -> Any:
    if isinstance(value, HookSite):
        return value.name
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot store {type(value).__name__} in a run analysis")


def package_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("melbo-lens")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _project(dec: DeltaDecomposition) -> DeltaDecomposition:
    """Each component and Δ projected onto Δ_t's direction (d_model → 1); see module doc."""
    if dec.delta.shape[-1] == 1:
        return dec
    norm = dec.delta.norm(dim=-1, keepdim=True)
    unit = dec.delta / norm.clamp_min(1e-30)
    comps = (dec.components * unit[None]).sum(-1, keepdim=True)
    return replace(dec, components=comps.detach().cpu(), delta=norm.detach().cpu())


# ---------------------------------------------------------------------- (de)serialising
