# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""A segment is the part of a model between a source site and a later target site.

MELBO adds a vector θ at the source and measures the change at the target. Nothing
before the source depends on θ and nothing after the target is needed, so a `Segment`
runs the prefix of the model once, caches the residual stream where θ enters (the input
of the first block that runs after the source), and from then on runs only the blocks
between source and target. With K vectors the cached prefix is repeated K times on the
batch axis, so all vectors share one forward and one backward pass per step.

On a host whose forward takes `start_at_layer` / `stop_at_layer` (HookedTransformer)
the segment runs exactly those blocks. On other hosts (TransformerBridge) it runs the
whole model from the tokens, adds θ with a hook and stops at the target by raising from
a hook, so at least nothing after the target runs.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.host import Host, d_model_of, n_layers_of, supports_layer_slicing
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite, as_site, check_sites

__all__ = ["Segment", "run_to_site"]


class _ReachedTarget(Exception):
    """Raised from a hook to stop the forward pass once the target is captured."""


def run_to_site(
    model: Host,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    site: str,
    hooks: Sequence[tuple[str, Any]] = (),
) -> Tensor:
    """The activation at hook `site` for `tokens`, with `hooks` added; the forward pass
    stops as soon as `site` fires, so nothing after it (later blocks, unembedding) runs."""
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any = None) -> Tensor:
        captured["z"] = act
        raise _ReachedTarget

    with model.hooks(fwd_hooks=[*hooks, (site, capture)]):
        try:
            model(tokens, attention_mask=attention_mask.long())
        except _ReachedTarget:
            pass
    if "z" not in captured:
        raise RuntimeError(
            f"the hook {site} never fired; does the model expose TransformerLens hook "
            "names (for a TransformerBridge, call enable_compatibility_mode())?"
        )
    return captured["z"]


_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], Callable[..., Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _compiled_blocks(model: Host, start: int, stop: int) -> Callable[..., Tensor]:
    """A torch.compile'd run of blocks [start, stop), cached per model and slice.

    It is the same loop HookedTransformer.forward runs for start_at_layer/stop_at_layer.
    """
    cache = _COMPILED.setdefault(model, {})
    if (start, stop) not in cache:
        hooked: Any = model  # a HookedTransformer: compile runs its blocks
        blocks = list(hooked.blocks[start:stop])

        def run(x: Tensor, attention_mask: Tensor) -> Tensor:
            for block in blocks:
                x = block(x, attention_mask=attention_mask)
            return x

        cache[(start, stop)] = torch.compile(run)
    return cache[(start, stop)]


def _add_rows(delta: Tensor):
    """Hook adding one vector per batch row: delta is [rows, d_model] or [d_model]."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        d = delta if delta.ndim == 1 else delta[:, None, :]
        return act + d.to(act.device, act.dtype)

    return hook


_EMBEDDING_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


class Segment:
    """Cached prefix at `source`; runs source -> target for batches of vectors.

    Args:
        model: The model.
        source: Where vectors are added (the prefix up to it is cached).
        target: Where activations are read.
        prompts: The prompts, with their target positions.
        layer_slicing: Run only the blocks between source and target (None: when the
            model allows it).
        compile: `torch.compile` the source-to-target step.

    Raises:
        ValueError: A site is not in the model, or `target` is not after `source`.

    Examples:
        >>> seg = Segment(model, HookSite(1), HookSite(3), prompts)
        >>> z = seg.run(theta)  # theta [K, d_model] -> [K, n, pos, d_model]
        >>> delta = z - seg.unsteered
    """

    def __init__(
        self,
        model: Host,
        source: HookSite | str | int,
        target: HookSite | str | int,
        prompts: PromptSet,
        *,
        layer_slicing: bool | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.source = as_site(source)
        self.target = as_site(target)
        check_sites(model, self.source, self.target)
        self.prompts = prompts
        self.layer_slicing = (
            supports_layer_slicing(model) if layer_slicing is None else layer_slicing
        )
        self.n_layers = n_layers_of(model)
        # torch.compile the blocks (HookedTransformer, rotary/standard positions, no hooks
        # inside the segment): ~1.3x per step after a one-off compile of ~1 minute.
        self.compile = bool(
            compile and self.layer_slicing and model.cfg.positional_embedding_type != "shortformer"
        )
        # Blocks that run with θ present: [start, stop).
        self.start, self.stop = self.block_range(self.source, self.target)
        with torch.no_grad():
            self.prefix: Float[Tensor, "n pos d_model"] | None = (
                self._run_prefix() if self.layer_slicing else None
            )
            self.unsteered: Float[Tensor, "n pos d_model"] = self._forward(None).detach()

    # ------------------------------------------------------------------ public
    @staticmethod
    def block_range(source: HookSite, target: HookSite) -> tuple[int, int]:
        """[start, stop): the blocks a segment from `source` to `target` runs.

        Examples:
            >>> Segment.block_range(HookSite(1), HookSite(3, "resid_pre"))
            (2, 3)
        """
        stop = target.layer if target.point == "resid_pre" else target.layer + 1
        return source.next_block, stop

    @staticmethod
    def blocks_between(source: HookSite, target: HookSite) -> int:
        """How many blocks a segment from `source` to `target` runs per pass."""
        start, stop = Segment.block_range(source, target)
        return stop - start

    @property
    def n_blocks(self) -> int:
        """Number of transformer blocks run per step (partial blocks count as whole)."""
        return self.stop - self.start

    def run(self, vectors: Float[Tensor, "k d_model"]) -> Float[Tensor, "k n pos d_model"]:
        """Target activations with each of K vectors added at the source (all positions)."""
        if vectors.ndim != 2 or vectors.shape[-1] != d_model_of(self.model):
            raise ValueError(
                f"vectors must be [k, d_model={d_model_of(self.model)}], got {tuple(vectors.shape)}"
            )
        k, n = vectors.shape[0], len(self.prompts)
        rows = vectors.repeat_interleave(n, dim=0)  # row r = vector r // n, prompt r % n
        out = self._forward(rows)
        return out.view(k, n, *out.shape[1:])

    def run_rows(
        self, rows: Float[Tensor, "rows d_model"], prompt_index: Tensor
    ) -> Float[Tensor, "rows pos d_model"]:
        """Target activations for arbitrary (vector, prompt) rows."""
        return self._forward(rows, prompt_index)

    def run_hooked(
        self, k: int, hooks: list[tuple[str, Callable[..., Any]]]
    ) -> Float[Tensor, "k n pos d_model"]:
        """Target activations for k copies of the prompts, perturbed by `hooks` only.

        Batch row r is copy r // n of prompt r % n; hook functions see that layout.
        Hooks must sit at or after the source (e.g. an adapter on the source block's
        MLP, for a segment whose source is `HookSite(L, "mlp_out")`), or on the
        embeddings (`hook_embed`: a soft prompt), for which the pass runs from the tokens.
        """
        n = len(self.prompts)
        idx = torch.arange(k * n, device=self.prompts.tokens.device) % n
        out = self._forward(None, idx, hooks)
        return out.view(k, n, *out.shape[1:])

    def subset(self, prompt_index: Int[Tensor, " k"]) -> Segment:
        """This segment restricted to some prompts (sharing the cached prefix): for
        splitting a step's rows into passes. Trailing padding the chosen prompts do not
        need is trimmed, which leaves every real token's activations as they are."""
        sub = copy.copy(self)
        sub.prompts = self.prompts[prompt_index]
        length = sub.prompts.tokens.shape[1]
        if self.prefix is not None:
            sub.prefix = self.prefix[prompt_index, :length]
        sub.unsteered = self.unsteered[prompt_index, :length]
        return sub

    # ------------------------------------------------------------------ internals
    def _run_prefix(self) -> Tensor:
        # stop_at_layer=k returns the residual entering block k (k=0: the embeddings).
        return self.model(
            self.prompts.tokens,
            attention_mask=self.prompts.attention_mask.long(),
            stop_at_layer=self.start,
        )

    def _forward(
        self,
        rows: Tensor | None,
        prompt_index: Tensor | None = None,
        extra_hooks: list[tuple[str, Any]] | None = None,
    ) -> Tensor:
        n = len(self.prompts)
        if prompt_index is not None:
            idx = prompt_index
        elif rows is None:
            idx = torch.arange(n, device=self.prompts.tokens.device)
        else:
            idx = torch.arange(rows.shape[0], device=rows.device) % n
        mask = self.prompts.attention_mask[idx]
        extra = list(extra_hooks or [])
        # hooks on the embeddings (a soft prompt's) run before the cached prefix ends:
        # those passes start from the tokens
        before_blocks = any(name in _EMBEDDING_HOOKS for name, _ in extra)
        if self.layer_slicing and not before_blocks:
            return self._forward_sliced(rows, idx, mask, extra)
        return self._forward_hooked(rows, idx, mask, extra)

    def _forward_sliced(
        self, rows: Tensor | None, idx: Tensor, mask: Tensor, hooks: list[tuple[str, Any]]
    ) -> Tensor:
        assert self.prefix is not None
        x = self.prefix[idx]
        if rows is not None:
            if self.source.is_block_boundary:
                x = x + rows[:, None, :].to(x.device, x.dtype)
            else:
                hooks.append((self.source.name, _add_rows(rows)))
        captured: dict[str, Tensor] = {}
        if not self.target.is_block_boundary:

            def capture(act: Tensor, hook: Any = None) -> Tensor:
                captured["z"] = act
                return act

            hooks.append((self.target.name, capture))
        if self.compile and not hooks:
            return _compiled_blocks(self.model, self.start, self.stop)(x, mask.long())
        with self.model.hooks(fwd_hooks=hooks):
            out = self.model(
                x,
                start_at_layer=self.start,
                stop_at_layer=self.stop,
                attention_mask=mask.long(),
            )
        return captured["z"] if "z" in captured else out

    def _forward_hooked(
        self, rows: Tensor | None, idx: Tensor, mask: Tensor, extra: list[tuple[str, Any]]
    ) -> Tensor:
        hooks = list(extra) if rows is None else [(self.source.name, _add_rows(rows)), *extra]
        return run_to_site(self.model, self.prompts.tokens[idx], mask, self.target.name, hooks)
