"""Checks for notebook 04 (top-2 and beyond)."""

import torch

from ..config import MoEConfig
from ..router import Router, positions_in_expert
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


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


@check("aux_free_step")
def check_aux_free_step(aux_free_step):
    """probs (N, E), bias (E,), k, rate -> experts (N, k), gates (N, k), next bias (E,): DeepSeek-V3's
    selection bias on a softmax top-k router, checked against the package's Router."""
    g = torch.Generator().manual_seed(0)
    N, E, k, rate = 40, 6, 2, 0.01
    logits, bias = torch.randn(N, E, generator=g), 0.2 * torch.randn(E, generator=g)
    probs = logits.softmax(dim=-1)
    result = aux_free_step(probs.clone(), bias.clone(), k, rate)
    expect(isinstance(result, tuple) and len(result) == 3, "return a tuple (experts, gates, next bias)")
    expert, gate, new_bias = result
    expect_shape(expert, (N, k), "experts")
    expect_shape(gate, (N, k), "gates")
    expect_shape(new_bias, (E,), "the next bias")
    router = Router(E, MoEConfig(n_experts=E, top_k=k, bias_update_rate=rate))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))  # logits in, logits out: the router's probs are `probs`
        router.selection_bias.copy_(bias)
        r = router.train()(logits, capacity_factor=float(E))
    router.update_selection_bias()
    if not torch.equal(expert.sort(1).values, r.expert.sort(1).values):
        unbiased = probs.topk(k, dim=-1).indices.sort(1).values
        if torch.equal(expert.sort(1).values, unbiased):
            raise CheckFailed("the bias must change which experts are chosen: take the top-k of probs + bias")
        raise CheckFailed("wrong experts: take the top-k of probs + bias")
    mine, theirs = expert.sort(1), r.expert.sort(1)
    gate, expected = gate.gather(1, mine.indices), r.weights.gather(1, theirs.indices)
    biased = (probs + bias).gather(1, theirs.values)
    if torch.allclose(gate, biased / biased.sum(1, keepdim=True), atol=1e-5):
        raise CheckFailed("the gates come from the unbiased probabilities: the bias only chooses")
    if torch.allclose(gate, probs.gather(1, theirs.values), atol=1e-5):
        raise CheckFailed("renormalise the chosen probabilities to sum to 1 (GShard's top-k gates)")
    expect_close(gate, expected, "gates")
    load = torch.bincount(r.expert.reshape(-1), minlength=E).float()
    wrong = {
        "count the load of the choices the bias made (probs + bias), not of the unbiased top-k":
            bias + rate * torch.sign((u := torch.bincount(probs.topk(k, -1).indices.reshape(-1), minlength=E).float())
                                     .mean() - u),
        "count every one of the k choices, not only first choices":
            bias + rate * torch.sign((f := torch.bincount(r.expert[:, 0], minlength=E).float()).mean() - f),
        "the sign is reversed: an over-loaded expert must become *less* attractive":
            bias - rate * torch.sign(load.mean() - load),
        "use the sign of (mean - load), a fixed step of `rate`, not a step proportional to it":
            bias + rate * (load.mean() - load),
    }
    for message, answer in wrong.items():
        if not torch.allclose(answer, router.selection_bias) and torch.allclose(new_bias, answer):
            raise CheckFailed(message)
    expect_close(new_bias, router.selection_bias, "the next bias")
    # Second choices that pile onto expert 0 while first choices are even: only an all-k count sees it.
    first, second = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    probs = torch.full((8, 4), 0.1).index_put((torch.arange(8), first), torch.tensor(0.5))
    probs = probs.index_put((torch.arange(8), second), torch.tensor(0.3))
    _, _, new_bias = aux_free_step(probs, torch.zeros(4), 2, rate)
    if torch.allclose(new_bias, torch.zeros(4)):
        raise CheckFailed("count every one of the k choices, not only first choices: here first choices are "
                          "even, but every second choice went to expert 0")
    expect_close(new_bias, rate * torch.tensor([-1.0, 0.0, 1.0, 1.0]), "the next bias when second choices pile up")
