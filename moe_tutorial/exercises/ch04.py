"""Checks for notebook 04 (top-2 and beyond)."""

import torch
import torch.nn.functional as F

from ..config import MoEConfig
from ..router import Router
from . import CheckFailed, check, expect, expect_close, expect_shape


@check("top2_gates")
def check_top2_gates(top2_gates):
    """logits (N, E) -> (experts (N, 2) best first, gates (N, 2) renormalised to sum to 1)."""
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)) * 2
    result = top2_gates(logits.clone())
    expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (experts, gates)")
    experts, gates = result
    expect_shape(experts, (10, 2), "experts")
    expect_shape(gates, (10, 2), "gates")
    reference = Router(6, MoEConfig(n_experts=6, top_k=2))
    with torch.no_grad():
        reference.gate.weight.copy_(torch.eye(6))
    r = reference(logits, capacity_factor=10.0)
    expect(torch.equal(experts.long(), r.expert), f"wrong experts: expected {r.expert[:2].tolist()}..., "
                                                  f"got {experts[:2].tolist()}... (best first)")
    if torch.allclose(gates, F.softmax(logits, -1).gather(1, r.expert)):
        raise CheckFailed("gates are the raw softmax probabilities: renormalise them over the two chosen experts")
    expect(torch.allclose(gates.sum(-1), torch.ones(10), atol=1e-5), "each token's two gates must sum to 1")
    expect_close(gates, r.weights, "gates")


@check("update_selection_bias")
def check_update_selection_bias(update_selection_bias):
    """bias (E,), load (E,) tokens per expert, rate -> new bias: +rate below mean load, -rate above."""
    bias = torch.tensor([0.0, 0.1, -0.2, 0.0])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 over, others under
    new = update_selection_bias(bias.clone(), load, 0.01)
    expect_shape(new, (4,), "the new bias")
    expected = bias + 0.01 * torch.sign(load.mean() - load)
    if torch.allclose(new, bias - 0.01 * torch.sign(load.mean() - load)):
        raise CheckFailed("the sign is reversed: an over-loaded expert must become *less* attractive")
    if torch.allclose(new, bias + 0.01 * (load.mean() - load)):
        raise CheckFailed("use the sign of (mean - load), a fixed step of `rate`, not a step proportional to it")
    expect_close(new, expected, "the new bias")
    same = update_selection_bias(bias.clone(), torch.full((4,), 5.0), 0.01)
    expect_close(same, bias, "the bias at perfectly even load")


@check("dispatch_mask")
def check_dispatch_mask(dispatch_mask):
    """expert (N, k), position (N, k), kept (N, k), n_experts, capacity -> one-hot (N, E, C)."""
    expert = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    position = torch.tensor([[0, 0], [1, 0], [1, 2], [2, 2]])
    kept = position < 2
    mask = dispatch_mask(expert, position, kept, 3, 2)
    expect_shape(mask, (4, 3, 2), "the dispatch mask")
    expected = torch.zeros(4, 3, 2)
    for n in range(4):
        for j in range(2):
            if kept[n, j]:
                expected[n, expert[n, j], position[n, j]] = 1.0
    expect(float(mask.sum()) == float(kept.sum()),
           f"the mask has {float(mask.sum()):.0f} ones but {int(kept.sum())} assignments are kept: "
           f"dropped assignments must not appear")
    expect_close(mask.float(), expected, "the dispatch mask")
