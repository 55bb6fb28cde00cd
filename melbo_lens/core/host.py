# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""A host is the model object melbo_lens runs: what it can do, asked in one place.

melbo_lens runs on TransformerLens's `HookedTransformer` (primary) and on its successor
`TransformerBridge` through the same hook names. They differ in what they can do: only
HookedTransformer runs a slice of blocks from a residual (`start_at_layer`), the KV cache
keyword differs by host and version, and some architectures normalise a sublayer's
output before adding it to the stream (post-norm), which changes what a hook at
`hook_mlp_out` means. Every such question is answered here and nowhere else.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Generator, Iterator
from typing import Any, Protocol

__all__ = [
    "Host",
    "check_no_attached_saes",
    "d_model_of",
    "n_layers_of",
    "supports_layer_slicing",
    "supports_kv_cache",
    "post_norm",
    "frozen",
    "hooked_transformer_is_the_host",
]


class Host(Protocol):
    """What melbo_lens needs of a model: a TransformerLens config, hook points, a
    `hooks()` context manager, a forward pass that takes tokens, the tokenizer and the
    embedding / unembedding matrices. `HookedTransformer` and `TransformerBridge` (and
    sae-lens's `HookedSAETransformer`) satisfy it; public functions take `Host`. Modules
    (`blocks`, `embed`) are reached only where a HookedTransformer is required, since a
    TransformerBridge forwards them dynamically."""

    cfg: Any

    def hooks(self, fwd_hooks: Any = ..., *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self) -> Iterator[Any]: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def W_U(self) -> Any: ...  # noqa: N802 (TransformerLens's name)

    @property
    def W_E(self) -> Any: ...  # noqa: N802


def check_no_attached_saes(model: Host) -> None:
    """Refuse a sae-lens `HookedSAETransformer` with SAEs attached: an attached SAE
    replaces the hook point it sits on, and every activation after it is the SAE's
    reconstruction, so vectors would be trained and measured on another model."""
    attached = getattr(model, "acts_to_saes", None)
    if attached:
        raise ValueError(
            f"the model has SAEs attached at {sorted(attached)} (HookedSAETransformer."
            "add_sae); melbo_lens steers and reads the model's own activations, which the "
            "attached SAEs replace. Detach them with model.reset_saes() first; to read a "
            "vector through an SAE, pass the SAE to decompose_vectors, feature_dashboards or "
            "FeatureClamp, which run it beside the model"
        )


def n_layers_of(model: Host) -> int:
    return int(model.cfg.n_layers)


def d_model_of(model: Host) -> int:
    return int(model.cfg.d_model)


def supports_layer_slicing(model: Host) -> bool:
    """HookedTransformer runs a slice of blocks from a residual (`start_at_layer`).

    TransformerBridge accepts the keyword but raises NotImplementedError, so this is a
    check of the host class rather than of the signature.
    """
    from transformer_lens import HookedTransformer

    return isinstance(model, HookedTransformer)


def supports_kv_cache(model: Host) -> bool:
    """The forward pass takes `past_kv_cache` (HookedTransformer)."""
    try:
        return "past_kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _post_norm_architectures() -> frozenset[str]:
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # older TransformerLens: no post-norm architectures known
        return frozenset()
    return frozenset(POST_NORM_ARCHITECTURES)


def post_norm(model: Host) -> bool:
    """The model normalises each sublayer's output before adding it to the stream
    (Gemma 2/3 `ln*_post`, OLMo 2 post-norm)."""
    cfg = model.cfg
    return bool(getattr(cfg, "use_normalization_before_and_after", False)) or (
        getattr(cfg, "original_architecture", None) in _post_norm_architectures()
    )


@contextlib.contextmanager
def frozen(model: Host) -> Generator[None, None, None]:
    """No weight gradients inside (only the perturbation is trained); restores each
    parameter's flag on exit, also when the body raises."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def hooked_transformer_is_the_host() -> Generator[None, None, None]:
    """Silence TransformerLens 3's deprecation notice for HookedTransformer, melbo_lens's
    primary host; ``load_model(..., bridge=True)`` gives the successor API."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"HookedTransformer(\.from_pretrained)? is deprecated"
        )
        yield
