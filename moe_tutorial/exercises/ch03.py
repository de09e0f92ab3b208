"""Checks for notebook 03 (the MoE layer and Switch routing)."""

import torch
import torch.nn.functional as F

from ..router import load_balancing_loss, positions_in_expert, z_loss
from . import CheckFailed, check, expect, expect_close, expect_shape


@check("assign_with_capacity")
def check_assign_with_capacity(assign_with_capacity):
    """expert (N,) top-1 choices, n_experts, capacity -> kept (N,) bool, earlier tokens first."""
    cases = [
        (torch.tensor([0, 0, 0, 1, 0, 1]), 2, 2),
        (torch.tensor([2, 2, 2, 2]), 3, 1),
        (torch.randint(4, (50,), generator=torch.Generator().manual_seed(0)), 4, 9),
        (torch.tensor([1, 0, 1]), 2, 0),
    ]
    for expert, n_experts, capacity in cases:
        kept = assign_with_capacity(expert.clone(), n_experts, capacity)
        expect_shape(kept, expert.shape, "kept")
        expect(kept.dtype == torch.bool, f"kept should be a bool tensor, got {kept.dtype}")
        counts = torch.bincount(expert[kept], minlength=n_experts)
        expect(bool((counts <= capacity).all()),
               f"an expert got {counts.max().item()} tokens but capacity is {capacity} (experts {expert.tolist()})")
        expected = positions_in_expert(expert[:, None], n_experts)[:, 0] < capacity
        if kept.sum() == expected.sum() and not torch.equal(kept, expected):
            raise CheckFailed(f"the right number of tokens is kept, but not the earliest ones: for {expert.tolist()} "
                              f"with capacity {capacity} keep {expected.tolist()}, got {kept.tolist()}")
        expect(torch.equal(kept, expected), f"for experts {expert.tolist()} with capacity {capacity} "
                                            f"expected kept={expected.tolist()}, got {kept.tolist()}")


@check("switch_load_balancing_loss")
def check_switch_load_balancing_loss(switch_load_balancing_loss):
    """probs (N, E) -> E * sum_i f_i * P_i, with f from the argmax (no gradient) and P the mean prob."""
    E, N = 4, 8
    uniform = torch.full((N, E), 1.0 / E)
    value = switch_load_balancing_loss(uniform)
    expect(isinstance(value, torch.Tensor) and value.dim() == 0, "return a scalar tensor")
    expect(abs(value.item() - 1.0) < 1e-5, f"uniform probabilities should give 1.0, got {value.item():.4f}")
    collapsed = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    got = switch_load_balancing_loss(collapsed).item()
    expect(abs(got - E) < 1e-5, f"every token sure of expert 0 should give E={E}, got {got:.4f}")
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(0)).requires_grad_()
    probs = F.softmax(logits, dim=-1)
    loss = switch_load_balancing_loss(probs)
    expect_close(loss, load_balancing_loss(probs, probs.argmax(dim=-1)), "the loss")
    expect(loss.requires_grad, "the loss has no gradient: P_i (the mean probability) must stay differentiable")
    (grad,) = torch.autograd.grad(loss, probs)
    f = torch.bincount(probs.argmax(dim=-1), minlength=E).float() / N
    if not torch.allclose(grad, (E * f / N).expand(N, E), atol=1e-6):
        raise CheckFailed("the gradient is wrong: f_i is a count and must not carry gradient "
                          "(use argmax / bincount, or .detach()); only P_i = probs.mean(0) does")


@check("router_z_loss")
def check_router_z_loss(router_z_loss):
    """logits (N, E) -> mean over tokens of logsumexp(logits)^2."""
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 3
    value = router_z_loss(logits.clone())
    expect(isinstance(value, torch.Tensor) and value.dim() == 0, "return a scalar tensor")
    if torch.allclose(value, logits.square().mean()):
        raise CheckFailed("that is mean(logits^2); the z-loss squares the logsumexp of each row")
    if torch.allclose(value, torch.logsumexp(logits, dim=-1).mean()):
        raise CheckFailed("square the logsumexp before averaging")
    expect_close(value, z_loss(logits), "the z-loss")
    big = router_z_loss(torch.full((2, 4), 1000.0))
    expect(torch.isfinite(big), "overflow for large logits: use torch.logsumexp, not log(sum(exp(...)))")
