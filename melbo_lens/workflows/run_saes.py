"""The SAEs a run is explained with: the one its vectors are decomposed onto (at their
site) and the one its cards read latents from (at the target), by default the packaged
SAEs for the model, and the dashboards of the latents they name."""

from __future__ import annotations

import os
from typing import Any

from melbo_lens.analysis.corpus import Corpus
from melbo_lens.core.host import Host
from melbo_lens.core.sites import HookSite
from melbo_lens.perturbations.vectors import SteeringVectors

__all__ = ["dashboards_of", "model_names", "pick_sae", "pick_target_sae"]


def dashboards_of(
    model: Host, sae: Any, corpus: Corpus, latents: list[int], max_tokens: int, progress: bool
) -> Any:
    from melbo_lens.analysis.sae.dashboards import feature_dashboards

    return feature_dashboards(
        model, sae, corpus, latents=latents, max_tokens=max_tokens, progress=progress
    )


def pick_target_sae(model: Host, vectors: Any, tgt: HookSite, sae: Any, notes: list[str]) -> Any:
    """The SAE whose latents cards list: `sae` itself, or the packaged one at the target."""
    if sae is None:
        return None
    from melbo_lens.analysis.sae import load_sae, packaged_sae_for, sae_site

    if not (isinstance(sae, str) and sae == "auto"):
        sae_obj = load_sae(sae)
        if sae_site(sae_obj).layer < vectors.site.layer:
            raise ValueError(
                f"target_sae reads {sae_site(sae_obj).name}, before the vectors' site "
                f"{vectors.site.name}; a card's latents must come after the perturbation"
            )
        return sae_obj
    key = packaged_sae_for(model_names(model, vectors), tgt)
    if key is None:
        notes.append(f"cards list no latents: no packaged SAE at the target {tgt.name}")
        return None
    return load_sae(key)


def model_names(model: Host, vectors: Any) -> list[str | None]:
    """What the model may be called in `PACKAGED_SAES`: load name, provenance, cfg name."""
    return [
        vectors.metadata.get("load_name"),
        vectors.model_name,
        getattr(getattr(model, "cfg", None), "model_name", None),
    ]


def pick_sae(model: Host, vectors: SteeringVectors, sae: Any, notes: list[str]) -> tuple:
    """(SAE, name) to decompose onto, or (None, None) with a note saying why."""
    if sae is None:
        notes.append("SAE parts skipped: no SAE was asked for (sae=None)")
        return None, None
    from melbo_lens.analysis.sae import PACKAGED_SAES, load_sae, packaged_sae_for, sae_site

    if isinstance(sae, str) and sae == "auto":
        key = packaged_sae_for(model_names(model, vectors), vectors.site)
        if key is None:
            notes.append(
                f"SAE parts skipped: no packaged SAE fits this model at {vectors.site.name} "
                f"(packaged: {', '.join(k for k in PACKAGED_SAES if '/' in k)}); pass "
                "sae=load_sae(path) for one of your own"
            )
            return None, None
        name = PACKAGED_SAES[key].split("/")[-1]
        sae_obj = load_sae(key)
    else:
        name = sae if isinstance(sae, str | os.PathLike) else type(sae).__name__
        sae_obj = load_sae(sae)
    if int(sae_obj.cfg.d_in) != vectors.d_model:
        raise ValueError(
            f"the SAE {name} reads d_in={sae_obj.cfg.d_in} but the vectors have "
            f"d_model={vectors.d_model}; pass an SAE trained on this model, or sae=None"
        )
    try:
        at = sae_site(sae_obj)
    except ValueError:
        at = None
    if at is not None and at != vectors.site:
        raise ValueError(
            f"the SAE {name} reads {at.name} but the vectors live at {vectors.site.name}; "
            "pass an SAE trained at the vectors' site, or sae=None"
        )
    return sae_obj, str(name)
