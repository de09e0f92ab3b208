"""Checks for notebook 03 (the MoE layer and Switch routing)."""

import torch
import torch.nn.functional as F

from ..router import load_balancing_loss, positions_in_expert, z_loss
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


@check("assign_with_capacity")
def check_assign_with_capacity(assign_with_capacity):
    """expert (N,) top-1 choices, n_experts, capacity -> kept (N,) bool, earlier tokens first."""
    refuse_library_call(assign_with_capacity, positions_in_expert, "count each expert's arrivals yourself")
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
    refuse_library_call(switch_load_balancing_loss, load_balancing_loss, "compute f_i and P_i yourself")
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


@check("balancing_loss_over_layers")
def check_balancing_loss_over_layers(balancing_loss_over_layers):
    """probs: list of (N, E) per MoE layer, first: list of (N,) first choices -> the total balancing
    loss, each layer's Switch loss computed on its own tokens and added."""
    refuse_library_call(balancing_loss_over_layers, load_balancing_loss, "compute each layer's f_i and P_i")
    N, E = 64, 4
    probs = [torch.full((N, E), 0.1), torch.full((N, E), 0.1)]
    probs[0][:, 0], probs[1][:, 1] = 0.7, 0.7  # layer 0 sends everything to expert 0, layer 1 to expert 1
    first = [torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)]
    total = balancing_loss_over_layers([p.clone() for p in probs], [f.clone() for f in first])
    expect(isinstance(total, torch.Tensor) and total.numel() == 1, "return the total loss as a one-element tensor")
    expected = sum(load_balancing_loss(p, f) for p, f in zip(probs, first))
    concatenated = load_balancing_loss(torch.cat(probs), torch.cat(first))
    if torch.allclose(total, concatenated) or torch.allclose(total, 2 * concatenated):
        raise CheckFailed("that is one loss over all layers' tokens concatenated: two layers collapsed onto "
                          "different experts look less collapsed together. Compute each layer's loss on its own "
                          "tokens")
    if torch.allclose(total, expected / 2):
        raise CheckFailed("add the layers' losses (each router gets its own full loss), do not average them")
    expect_close(total, expected, "the total balancing loss")
    generator = torch.Generator().manual_seed(2)
    probs = [torch.softmax(torch.randn(N, E, generator=generator), -1) for _ in range(3)]
    first = [torch.randint(E, (N,), generator=generator) for _ in probs]  # e.g. chosen with a bias: not the argmax
    expect_close(balancing_loss_over_layers(probs, first),
                 sum(load_balancing_loss(p, f) for p, f in zip(probs, first)),
                 "the loss of 3 layers whose first choices are given (count `first`, not the argmax of probs)")


@check("z_loss_gradient")
def check_z_loss_gradient(z_loss_gradient):
    """logits (N, E) -> d z_loss / d logits (N, E), by hand; z_loss = mean over tokens of logsumexp^2."""
    if set(z_loss_gradient.__code__.co_names) & {"backward", "grad", "autograd", "vjp", "jacobian", "jacrev"}:
        raise CheckFailed("derive the gradient by hand: autograd is what this exercise replaces")
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 3 + 2  # z > 0 for most tokens
    logits[:3] -= 8  # and z < 0 for a few: those are pushed up
    with torch.no_grad():
        grad = z_loss_gradient(logits.clone())
    expect_shape(grad, logits.shape, "the gradient")
    N = logits.size(0)
    z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
    probs = F.softmax(logits, dim=-1)  # (N, E)
    wrong = {
        "that is the gradient of mean(logits^2), 2 l / N: the z-loss squares each token's logsumexp": 2 * logits / N,
        "the loss is a mean over tokens: divide by N": 2 * z * probs,
        "d(z^2)/dz = 2z: the factor 2 is missing": z * probs / N,
        "dz/dl_i = softmax(l)_i: each logit is pushed in proportion to its probability": (2 * z / N).expand_as(logits),
        "the softmax runs over each token's experts (dim=-1), not over the tokens": 2 * z * F.softmax(logits, 0) / N,
    }
    for message, answer in wrong.items():
        if torch.allclose(grad, answer, atol=1e-6):
            raise CheckFailed(message)
    expected = logits.clone().requires_grad_()
    z_loss(expected).backward()
    expect_close(grad, expected.grad, "the gradient")
    with torch.no_grad():
        big = z_loss_gradient(torch.full((2, 4), 1000.0))
    expect(bool(torch.isfinite(big).all()), "overflow for large logits: use torch.logsumexp and F.softmax, "
                                            "not exp() written out")
