"""Checks for notebook 08 (inside a real MoE)."""

import torch

from ..analysis import assignment_share, token_consistency
from ..router import Routing
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


def _routing(expert: torch.Tensor, n_experts: int) -> Routing:
    N, k = expert.shape
    probs = torch.full((N, n_experts), 1.0 / n_experts)
    zero = torch.zeros(())
    return Routing(logits=probs.log(), probs=probs, expert=expert, weights=probs.gather(1, expert),
                   kept=torch.ones(N, k, dtype=torch.bool), position=torch.zeros(N, k, dtype=torch.long),
                   capacity=N, aux_loss=zero, z_loss=zero)


@check("expert_load")
def check_expert_load(load_of):
    """expert (N, k) chosen experts, n_experts -> (E,) share of all assignments each expert receives."""
    refuse_library_call(load_of, assignment_share, "that function is the answer: count the assignments yourself")
    expert = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    got = load_of(expert.clone(), 5)
    expect_shape(got, (5,), "load")
    if torch.allclose(got.float(), torch.tensor([3, 0, 0, 1, 0]) / 4.0):
        raise CheckFailed("you counted first choices only: every one of a token's k choices is an assignment")
    if torch.allclose(got.float(), torch.tensor([4.0, 2, 1, 1, 0])):
        raise CheckFailed("return shares (summing to 1), not counts")
    expect(abs(float(got.sum()) - 1.0) < 1e-5, "the shares must sum to 1 over the experts")
    expect_close(got.float(), assignment_share(_routing(expert, 5)), "load")
    random = torch.randint(0, 7, (50, 3), generator=torch.Generator().manual_seed(0))
    expect_close(load_of(random.clone(), 7).float(), assignment_share(_routing(random, 7)), "load on random choices")


@check("token_consistency")
def check_token_consistency(consistency):
    """token_ids (N,), expert (N,) first choices -> share of tokens sent to their id's most common expert."""
    refuse_library_call(consistency, token_consistency, "that function is the answer: count the pairs yourself")
    ids = torch.tensor([5, 5, 5, 5, 2, 2, 9])
    experts = torch.tensor([1, 1, 1, 0, 3, 0, 2])
    got = float(consistency(ids.clone(), experts.clone()))
    if abs(got - 4 / 7) < 1e-6:
        raise CheckFailed("a token id whose occurrences split evenly still contributes its most common expert's "
                          "count: id 2 goes once to expert 3 and once to expert 0, so one of its two counts")
    if abs(got - 3 / 7) < 1e-6 or abs(got - 0.75) < 1e-6:
        raise CheckFailed("sum the most common expert's count over every token id, then divide by all tokens")
    expect(abs(got - token_consistency(ids, experts)) < 1e-6, f"expected {token_consistency(ids, experts):.4f}, "
                                                              f"got {got:.4f}")
    gen = torch.Generator().manual_seed(1)
    ids, experts = torch.randint(0, 20, (300,), generator=gen), torch.randint(0, 8, (300,), generator=gen)
    expect(abs(float(consistency(ids, experts)) - token_consistency(ids, experts)) < 1e-6,
           "wrong value on random routing")
