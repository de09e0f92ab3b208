"""Checks for notebook 04 (top-2 and beyond)."""

import torch
import torch.nn.functional as F

from ..config import MoEConfig
from ..router import Router, load_balancing_loss, positions_in_expert
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


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


@check("priority_slots")
def check_priority_slots(priority_slots):
    """expert (N, k) chosen experts, n_experts -> position (N, k): each assignment's arrival slot at
    its expert, every token's first choice before any token's second choice, tokens in order."""
    refuse_library_call(priority_slots, positions_in_expert, "that function is the answer")
    expert = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0], [0, 1]])
    position = priority_slots(expert.clone(), 3)
    expect_shape(position, (5, 2), "position")
    token_major = torch.tensor([[0, 0], [1, 1], [2, 0], [1, 3], [4, 2]])  # token 0's choices, then token 1's, ...
    if torch.equal(position.long(), token_major):
        raise CheckFailed("that is token order (each token's two choices, then the next token's): every first "
                          "choice must take its slot before any second choice")
    expected = positions_in_expert(expert, 3)
    expect(torch.equal(position.long(), expected), f"expected slots {expected.tolist()}, got {position.tolist()}")
    big = torch.randint(0, 6, (40, 3), generator=torch.Generator().manual_seed(0))
    expect(torch.equal(priority_slots(big.clone(), 6).long(), positions_in_expert(big, 6)),
           "right on the small case but not on 40 tokens with top-3: count every choice rank, not only two")


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
    first = [p.argmax(-1) for p in probs]
    expect_close(balancing_loss_over_layers(probs, first),
                 sum(load_balancing_loss(p, f) for p, f in zip(probs, first)), "the loss of 3 random layers")


@check("expert_choice_kept")
def check_expert_choice_kept(expert_choice_kept):
    """probs (N, E), capacity C -> kept (N, E) bool: each expert keeps the C tokens that score it highest."""
    probs = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(1)) * 2, dim=-1)
    kept = expert_choice_kept(probs.clone(), 3)
    expect_shape(kept, (12, 4), "kept")
    kept = kept.bool()
    token_choice = torch.zeros(12, 4, dtype=torch.bool)
    token_choice[torch.arange(12)[:, None], probs.topk(3, dim=1).indices] = True
    if torch.equal(kept, token_choice):
        raise CheckFailed("each *token* picked its 3 best experts: under expert choice each *expert* picks its "
                          "3 best tokens (top-C over the tokens, dim=0)")
    expect(kept.sum(dim=0).tolist() == [3] * 4,
           f"every expert must keep exactly capacity = 3 tokens, got {kept.sum(dim=0).tolist()}")
    expected = torch.zeros(12, 4, dtype=torch.bool)
    expected[probs.topk(3, dim=0).indices, torch.arange(4)] = True
    expect(torch.equal(kept, expected), "each expert must keep the tokens with the highest scores *for it*")


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
    generator = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 5, (30, 2), generator=generator)
    position = positions_in_expert(expert, 5)
    kept = position < 8
    mask = dispatch_mask(expert, position, kept, 5, 8)
    expected = torch.zeros(30, 5, 8)
    token, choice = torch.where(kept)
    expected[token, expert[token, choice], position[token, choice]] = 1.0
    expect_close(mask.float(), expected, "the dispatch mask of 30 tokens, top-2 over 5 experts")
