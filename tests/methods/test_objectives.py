import pytest
import torch

from melbo_lens.methods.objectives import (
    cosine_penalty,
    melbo_objective,
    melbo_objective_per_prompt,
)


def hand_objective(steered, unsteered, mask, power, q):
    """Loops over prompts and tokens exactly as the formula reads."""
    total = 0.0
    for i in range(steered.shape[0]):
        inner = 0.0
        for t in range(steered.shape[1]):
            if mask[i, t]:
                diff = [float(a - b) for a, b in zip(steered[i, t], unsteered[i, t], strict=True)]
                norm = sum(x * x for x in diff) ** 0.5
                inner += norm**power
        total += inner ** (1.0 / q)
    return total


@pytest.mark.parametrize("power,q", [(2.0, 1.0), (4.0, 1.0), (4.0, 4.0), (1.0, 2.0), (3.0, 1.5)])
def test_objective_matches_hand_computation_with_masks(power, q, rng):
    steered = torch.randn(3, 5, 4, generator=rng, dtype=torch.float64)
    unsteered = torch.randn(3, 5, 4, generator=rng, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = melbo_objective(steered, unsteered, mask, power=power, q=q)
    assert float(got) == pytest.approx(hand_objective(steered, unsteered, mask, power, q), rel=1e-9)


def test_small_exact_values():
    # prompt 0: tokens with ||Δ|| = 5 (masked in) and 1 (masked out); prompt 1: ||Δ|| = 2, 2
    steered = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    zero = torch.zeros_like(steered)
    assert melbo_objective_per_prompt(steered, zero, mask, power=2.0).tolist() == [25.0, 8.0]
    assert melbo_objective_per_prompt(steered, zero, mask, power=4.0).tolist() == [625.0, 32.0]
    # q = 2: square roots of the p=4 sums
    assert melbo_objective(steered, zero, mask, power=4.0, q=2.0).item() == pytest.approx(
        25.0 + 32.0**0.5
    )


def test_norm_is_per_token_not_over_tokens():
    # the source code took the norm over the token axis; for p != 2 that differs
    steered = torch.tensor([[[1.0], [1.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # per token: 1^4 + 1^4 = 2 ; over tokens it would be (sqrt(2))^4 = 4
    assert melbo_objective(steered, torch.zeros_like(steered), mask, power=4.0).item() == 2.0


def test_masked_positions_give_no_nan_gradient():
    steered = torch.zeros(1, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    out = melbo_objective(
        steered + torch.tensor([1.0, 0, 0, 0]) * torch.tensor([[[1.0], [0.0], [0.0]]]),
        torch.zeros(1, 3, 4),
        mask,
        power=1.0,
        q=1.0,
    )
    out.backward()
    assert torch.isfinite(steered.grad).all()
    assert steered.grad[0, 1:].abs().sum() == 0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="mask must be"):
        melbo_objective(
            torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="differ"):
        melbo_objective(
            torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="> 0"):
        melbo_objective(
            torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool), power=0
        )


def test_cosine_penalty_hand_values():
    v = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    # pairs: (0,1) cos = 1/sqrt2 -> 0.5 ; (0,2) 0 ; (1,2) 0
    assert cosine_penalty(v).item() == pytest.approx(0.5)
    assert cosine_penalty(torch.eye(4)).item() == 0.0
