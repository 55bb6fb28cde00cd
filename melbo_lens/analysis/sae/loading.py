"""Loading SAEs (sae-lens) and what melbo_lens needs to know of one: the packaged SAEs and
their registry, the hook site an SAE reads, its unit decoder directions."""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path

from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from melbo_lens.core.sites import HookSite

__all__ = [
    "PACKAGED_SAES",
    "decoder_directions",
    "load_sae",
    "packaged_sae_dir",
    "packaged_sae_for",
    "sae_site",
]


PACKAGED_SAES: dict[str, str] = {
    # TopK SAEs (k=32) trained offline on the melbo-chat-prose corpus by
    # scripts/train_saes.py; each folder holds metrics.json (FVE, L0, dead fraction and
    # CE loss recovered on held-out prose and chat at 128 and 512 tokens).
    "smollm2-135m-instruct-res7": "saes/smollm2-135m-instruct-res7",
    "smollm2-135m-instruct-res22-pre": "saes/smollm2-135m-instruct-res22-pre",
    "smollm2-135m-instruct/blocks.7.hook_resid_post": "saes/smollm2-135m-instruct-res7",
    "smollm2-135m-instruct/blocks.22.hook_resid_pre": "saes/smollm2-135m-instruct-res22-pre",
}


_SAE_FILES = ("cfg.json", "sae_weights.safetensors")


def packaged_sae_dir(name: str) -> Path:
    """The folder of a packaged SAE (``cfg.json``, ``sae_weights.safetensors`` and the
    ``metrics.json`` its training script wrote); `SAE.load_from_disk` reads it.

    Args:
        name: A packaged SAE's name (e.g. `"smollm2-135m-instruct-res7"`).

    Returns:
        The folder holding its files.

    Raises:
        ValueError: `name` is not a packaged SAE; the message lists those there are.

    Examples:
        >>> (packaged_sae_dir("smollm2-135m-instruct-res7") / "metrics.json").is_file()
        True
    """
    if name not in PACKAGED_SAES:
        raise ValueError(f"{name!r} is not a packaged SAE; packaged: {sorted(PACKAGED_SAES)}")
    folder = resources.files("melbo_lens").joinpath("data", *PACKAGED_SAES[name].split("/"))
    return Path(str(folder))


def packaged_sae_for(model_names: list[str | None], site: HookSite | str) -> str | None:
    """The `PACKAGED_SAES` key of the packaged SAE for any of `model_names` at `site`.

    Examples:
        >>> packaged_sae_for(["smollm2-135m-instruct"], "blocks.7.hook_resid_post")
        'smollm2-135m-instruct/blocks.7.hook_resid_post'
        >>> packaged_sae_for([None, "gpt2"], "blocks.7.hook_resid_post") is None
        True
    """
    name = site.name if isinstance(site, HookSite) else site
    keys = [f"{str(n).lower()}/{name}" for n in model_names if n]
    return next((k for k in keys if k in PACKAGED_SAES), None)


# ---------------------------------------------------------------------- loading
def load_sae(
    name_or_path: str | os.PathLike[str] | SAE,
    *,
    sae_id: str | None = None,
    device: str = "cpu",
) -> SAE:
    """Load an SAE: a packaged name, a local sae-lens directory, or a pretrained release.

    * a name in `PACKAGED_SAES` loads the SAE shipped with melbo_lens (offline);
    * a directory written by sae-lens (`sae.save_model(dir)`: `cfg.json` and
      `sae_weights.safetensors`) loads with `SAE.load_from_disk`;
    * `load_sae(release, sae_id=...)` calls `SAE.from_pretrained(release, sae_id)`, which
      needs the Hugging Face hub; offline it fails with a message saying so.

    An `SAE` object is returned as it is.

    Args:
        name_or_path: a name in `PACKAGED_SAES`, a sae-lens directory, a pretrained
            release (with `sae_id`), or an `SAE` (returned as it is).
        sae_id: the SAE within a pretrained release.
        device: where to load the weights.

    Returns:
        The sae-lens `SAE`.

    Raises:
        FileNotFoundError: a name that is no packaged SAE and no sae-lens directory.
        ValueError: a pretrained release or id that sae-lens does not know.
        RuntimeError: a pretrained release that cannot be downloaded (offline), with
            how to load a local copy instead.

    Examples:
        >>> sae7 = load_sae("smollm2-135m-instruct-res7")   # packaged, offline
        >>> sae_site(sae7), sae7.cfg.d_sae
        (HookSite(layer=7, point='resid_post'), 8192)

        A folder `SAE.save_model` wrote loads the same way (`load_sae("runs/sae_l7")`), and so
        does a sae-lens release with its id, which needs the Hugging Face hub (not run here:
        no network in the tests):

        >>> sae = load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")  # doctest: +SKIP
    """
    if isinstance(name_or_path, SAE):
        return name_or_path
    name = os.fspath(name_or_path)
    if sae_id is None and name in PACKAGED_SAES:
        return _load_dir(packaged_sae_dir(name), device)
    path = Path(name).expanduser()
    if sae_id is None:
        if path.is_dir():
            return _load_dir(path, device)
        if path.is_file() and path.name in _SAE_FILES:
            return _load_dir(path.parent, device)
        known = sorted(PACKAGED_SAES) or "none packaged yet"
        raise FileNotFoundError(
            f"no SAE directory at {name!r}; expected a folder written by sae-lens "
            f"(sae.save_model(dir): {' + '.join(_SAE_FILES)}), a packaged SAE name "
            f"({known}), or a pretrained release with sae_id=..., e.g. "
            "load_sae('gpt2-small-res-jb', sae_id='blocks.8.hook_resid_pre')"
        )
    try:
        return SAE.from_pretrained(name, sae_id, device=device)
    except ValueError as err:  # unknown release / id: sae-lens says which
        raise ValueError(f"cannot load pretrained SAE {name!r} / {sae_id!r}: {err}") from err
    except (OSError, ConnectionError) as err:  # hub unreachable, offline, not in cache
        raise RuntimeError(
            f"could not download pretrained SAE {name!r} / {sae_id!r} "
            f"({type(err).__name__}: {str(err)[:160]}): "
            "no pretrained SAE can be downloaded without network access to the Hugging Face "
            "hub. Pass a local sae-lens directory instead: load_sae('/path/to/dir'), a "
            "folder holding cfg.json and sae_weights.safetensors (written by "
            "sae.save_model(dir), or copied from a machine with network access)"
        ) from err


def _load_dir(path: Path, device: str) -> SAE:
    missing = [f for f in _SAE_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a sae-lens SAE directory: it lacks {missing}; save one with "
            "sae.save_model(dir)"
        )
    return SAE.load_from_disk(path, device=device)


def hook_name(sae: SAE) -> str | None:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    return name if name is not None else getattr(sae.cfg, "hook_name", None)


def sae_site(sae: SAE) -> HookSite:
    """The residual-width `HookSite` the SAE reads (from `cfg.metadata.hook_name`).

    Args:
        sae: A sae-lens `SAE`.

    Returns:
        The site it reads.

    Raises:
        ValueError: The SAE records no hook name, or reads a site that is not residual-width
            (an attention head's output).

    Examples:
        >>> sae_site(sae)
        HookSite(layer=1, point='resid_post')
    """
    name = hook_name(sae)
    if name is None:
        raise ValueError(
            "the SAE records no hook name (cfg.metadata.hook_name is None), so its site is "
            "unknown; set it, e.g. sae.cfg.metadata.hook_name = 'blocks.7.hook_resid_post'"
        )
    head = getattr(sae.cfg.metadata, "hook_head_index", None)
    if head is not None:
        raise ValueError(f"the SAE reads head {head} of {name}, not a residual-width site")
    try:
        return HookSite.parse(name)
    except ValueError as err:
        raise ValueError(
            f"the SAE reads {name!r}, which is not a residual-width hook site; steering "
            f"vectors live in the residual stream ({err})"
        ) from err


def site_or_none(sae: SAE) -> HookSite | None:
    try:
        return sae_site(sae)
    except ValueError:
        return None


def warn_unfolded(sae: SAE) -> None:
    mode = getattr(sae.cfg, "normalize_activations", "none")
    if mode in ("expected_average_only_in", "covariance_whitening"):
        warnings.warn(
            f"the SAE expects normalised inputs (normalize_activations={mode!r}) that it "
            "does not apply itself; fold the normalisation into its weights first "
            "(sae.fold_activation_norm_scaling_factor(...)), or activations are misread",
            stacklevel=3,
        )


def decoder_directions(sae: SAE) -> Float[Tensor, "d_sae d_in"]:
    """What each feature writes at activation 1: `W_dec` rows (unit rows for TopK SAEs
    that rescale activations by decoder norm, whose decode divides by it)."""
    w = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return w
