# pyright: strict, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportUnnecessaryIsInstance=false
# pyright: reportUnnecessaryComparison=false
"""A perturbation is anything that changes a forward pass through hooks, member by member.

A perturbation is a list of *members* (one vector, one adapter, ...) at one site.
`hooks(model, rows, scale)` gives the TransformerLens `(hook name, function)` pairs that
apply member `rows[i]` to batch row `i`, so many members run in one batch; a row whose
member is `None` runs unperturbed. `SteeringVectors` (and the results of vector
arithmetic), `SteeringAdapters`, `DirectionEdit` (directional ablation and clamping) and
`FeatureClamp` (SAE features) implement it; `apply`, `generate`, the deltas and
objectives of `analysis.deltas` and `delta_similarity` take any perturbation without
asking which kind it is, and `analyze_run` / the report take vectors or adapters.

Row layout. `rows` is one int (that member on every batch row) or a sequence of g
entries for a batch of B rows with B a multiple of g: entry j applies to the j-th block
of B/g consecutive rows (g = B: one member per row). Members are indexed from 0 to
len - 1; a negative or too large index is an error, never wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from melbo_lens.core.host import Host
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.sites import HookSite

__all__ = [
    "Hook",
    "Perturbation",
    "Rows",
    "apply",
    "pick_members",
    "prompts_for",
    "row_members",
]

Hook = tuple[str, Callable[..., Any]]
Rows = int | Sequence[int | None]


@runtime_checkable
class Perturbation(Protocol):
    """What every consumer needs of a perturbation (structural: no base class needed).

    Attributes:
        site: The hook site the perturbation acts at (adapters: their block's MLP output).
        hooks: `hooks(model, rows, scale=1.0)` returns TransformerLens `(name, hook)` pairs
            that apply member `rows[i]` to batch row i (None leaves a row untouched).
    """

    @property
    def site(self) -> HookSite: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Any: ...

    def hooks(self, model: Host, rows: Rows, scale: float = 1.0) -> list[Hook]: ...


def row_members(rows: Rows, n_members: int, noun: str = "member") -> Tensor:
    """`rows` as a LongTensor of member indices, -1 for unperturbed rows (validated).

    Examples:
        >>> row_members([2, None, 0], 3).tolist()
        [2, -1, 0]
        >>> row_members(1, 3).tolist()
        [1]
    """
    items = [rows] if isinstance(rows, int) else list(rows)
    out = []
    for item in items:
        if item is None:
            out.append(-1)
            continue
        if isinstance(item, bool) or not isinstance(item, int | torch.Tensor):
            raise TypeError(f"{noun} index must be an int or None, got {item!r}")
        k = int(item)
        if not 0 <= k < n_members:
            raise IndexError(
                f"{noun} index {k} out of range: there are {n_members} {noun}s "
                f"(valid: 0..{n_members - 1})"
            )
        out.append(k)
    return torch.tensor(out, dtype=torch.long)


def pick_members(
    table: Float[Tensor, "members ..."], members: Int[Tensor, " rows"]
) -> Float[Tensor, "rows ..."]:
    """Rows `members` of a per-member table; index -1 gives zeros (an unperturbed row).

    Examples:
        >>> pick_members(torch.ones(2, 3), torch.tensor([1, -1])).tolist()
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    return torch.cat([table, torch.zeros_like(table[:1])])[members]


@contextmanager
def apply(
    model: Host, perturbation: Perturbation, index: Rows = 0, *, scale: float = 1.0
) -> Generator[Any, None, None]:
    """Apply member `index` of `perturbation` (or one member per block of batch rows for
    a list) inside the block; the hooks are removed on exit, also when the body raises.

    Args:
        model: the model to perturb inside the block.
        perturbation: any `Perturbation` (vectors, adapters, soft prompts, clamps).
        index: the member for every row, or a list: one member per block of batch rows.
        scale: multiplies the member's edit (1.0: as trained).

    Yields:
        The model, with the perturbation's hooks attached.

    Examples:
        >>> sv = SteeringVectors(torch.eye(32)[:2] * 4.0, HookSite(1))
        >>> with apply(model, sv, 1):
        ...     logits = model(torch.tensor([[1, 2, 3]]))
        >>> logits.shape
        torch.Size([1, 3, 50])
    """
    with model.hooks(fwd_hooks=perturbation.hooks(model, index, scale)):
        yield model


def prompts_for(
    perturbation: Any, model: Host, prompts: PromptSet | str | Sequence[Any], *, chat: bool
) -> PromptSet:
    """`prompts` as `perturbation` needs them: one that changes the input itself (soft
    prompts) places its tokens with its `prepare`; every other takes them as they are
    (`PromptSet.coerce`). Consumers that build batches from prompts call this once."""
    prepare = getattr(perturbation, "prepare", None)
    if prepare is not None:
        return prepare(model, prompts, chat=chat)
    return PromptSet.coerce(model, prompts, chat=chat)
