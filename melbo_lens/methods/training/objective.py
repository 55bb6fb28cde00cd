"""What the loop maximises: an objective is a small object, not a branch in the loop.

Each takes a segment (the prompts, their target mask and the unperturbed target
activations) and the members' target activations z [k, n, pos, d] and returns one
value per member. `couples_prompts` says whether a member's value needs all its
prompts in one pass (then a step cannot be split across prompt blocks):

* `melbo`: Σ_i (Σ_t ||Δ_t||^p)^(1/q), the MELBO objective (a sum over prompts);
* `consistency`: the mean pairwise cosine of the prompts' mean target deltas
  (`methods.objectives.consistency_per_member`): one consistent effect, whatever its
  size (the sphere fixes the size of θ);
* `melbo+consistency`: MELBO's value plus `weight` × (its value, held constant) ×
  consistency, so with weight 1 a perfectly consistent direction counts double;
* `logprob`: Σ over target positions of log p(next token), teacher-forced: the prompts
  carry their continuations (`PromptSet.with_continuations`) and the target is the last
  block's output, read through the model's final norm and unembedding (supervised: the
  perturbation that makes a given answer likely);
* `neg-logprob`: minus that (the perturbation that makes a given answer unlikely: what
  suppresses a behaviour, as a refusal or a backdoor's phrase).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from melbo_lens.core.host import Host, n_layers_of
from melbo_lens.core.prompts import PromptSet
from melbo_lens.core.segment import Segment
from melbo_lens.core.sites import HookSite
from melbo_lens.methods.objectives import consistency_per_member, melbo_objective_per_prompt

__all__ = [
    "OBJECTIVES",
    "Consistency",
    "LogProb",
    "Melbo",
    "Objective",
    "ObjectiveName",
    "make_objective",
    "reads_logits",
]

ObjectiveName = Literal["melbo", "consistency", "melbo+consistency", "logprob", "neg-logprob"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)


def reads_logits(name: str) -> bool:
    """Whether objective `name` scores continuations from the logits (its prompts carry
    continuations and its target is the last block's output).

    Examples:
        >>> reads_logits("neg-logprob"), reads_logits("melbo")
        (True, False)
    """
    return name in ("logprob", "neg-logprob")


class Objective(Protocol):
    """One value per member from its target activations (larger is better)."""

    @property
    def name(self) -> str: ...

    @property
    def couples_prompts(self) -> bool:
        """Whether a member's value needs all its prompts in one pass."""
        ...

    def __call__(
        self, segment: Segment, z: Float[Tensor, "k n pos d_model"]
    ) -> Float[Tensor, " k"]: ...

    def check(self, model: Host, prompts: PromptSet, target: HookSite) -> None:
        """Refuse, before training, prompts or a target this objective cannot use."""
        ...


def _operands(segment: Segment, z: Tensor) -> tuple[Tensor, Tensor]:
    # on a model split over devices z comes from the target block's device
    mask = segment.prompts.target_mask.to(z.device).expand(z.shape[:-1])
    return segment.unsteered.to(z.device).expand_as(z), mask


@dataclass(frozen=True)
class Melbo:
    """MELBO's objective (see the module docstring)."""

    power: float = 2.0
    q: float = 1.0
    name: str = "melbo"
    couples_prompts: bool = False

    def __call__(self, segment: Segment, z: Tensor) -> Tensor:
        unsteered, mask = _operands(segment, z)
        per_prompt = melbo_objective_per_prompt(z, unsteered, mask, power=self.power, q=self.q)
        return per_prompt.sum(-1)

    def check(self, model: Host, prompts: PromptSet, target: HookSite) -> None:
        return None


@dataclass(frozen=True)
class Consistency:
    """The consistency objective, alone (`weight=None`) or added to MELBO's."""

    weight: float | None = None
    power: float = 2.0
    q: float = 1.0
    name: str = "consistency"
    couples_prompts: bool = True

    def __call__(self, segment: Segment, z: Tensor) -> Tensor:
        unsteered, mask = _operands(segment, z)
        c = consistency_per_member(z, unsteered, mask)
        if self.weight is None:
            return c
        melbo = Melbo(self.power, self.q)(segment, z)
        return melbo + self.weight * melbo.detach().abs() * c

    def check(self, model: Host, prompts: PromptSet, target: HookSite) -> None:
        if len(prompts) < 2:
            raise ValueError(
                f"objective={self.name!r} compares prompts with each other and needs at least "
                f"2 prompts, got {len(prompts)}; add prompts or use objective='melbo'"
            )


@dataclass(frozen=True)
class LogProb:
    """Teacher-forced log-probability of the continuations, times `sign` (+1 to make
    them likely, -1 unlikely; see the module docstring)."""

    sign: float = 1.0
    name: str = "logprob"
    couples_prompts: bool = False

    def __call__(self, segment: Segment, z: Tensor) -> Tensor:
        hooked: Any = segment.model  # a HookedTransformer's final norm and unembedding
        k, n, pos, d = z.shape
        logits = hooked.unembed(hooked.ln_final(z.reshape(k * n, pos, d))).reshape(k, n, pos, -1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = segment.prompts.tokens.to(z.device)
        following = torch.roll(tokens, -1, dims=1)  # the token after each position
        picked = logp.gather(-1, following[None, :, :, None].expand(k, n, pos, 1))[..., 0]
        mask = segment.prompts.target_mask.to(z.device)
        return self.sign * torch.where(mask, picked, torch.zeros_like(picked)).sum((-1, -2))

    def check(self, model: Host, prompts: PromptSet, target: HookSite) -> None:
        last = n_layers_of(model) - 1
        if target != HookSite(last, "resid_post"):
            raise ValueError(
                f"objective={self.name!r} reads the logits from the last block's output, so the "
                f"target must be blocks.{last}.hook_resid_post, got {target.name}"
            )
        lengths = prompts.attention_mask.sum(-1)
        for i, positions in enumerate(prompts.target_lists()):
            if positions and max(positions) >= int(lengths[i]) - 1:
                raise ValueError(
                    f"objective={self.name!r} scores the token after each target position, and "
                    f"prompt {i}'s target position {max(positions)} is its last token; build "
                    "the prompts with PromptSet.with_continuations(model, prompts, answers)"
                )


def make_objective(name: str, *, power: float, q: float, weight: float) -> Objective:
    """The objective called `name` (one of `OBJECTIVES`)."""
    if name == "melbo":
        return Melbo(power, q)
    if name == "consistency":
        return Consistency(None, power, q)
    if name == "melbo+consistency":
        return Consistency(weight, power, q, name="melbo+consistency")
    if name == "logprob":
        return LogProb()
    if name == "neg-logprob":
        return LogProb(-1.0, name="neg-logprob")
    raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {name!r}")
