"""Checks for notebook 06 (distributed MoE)."""

import torch

from ..distributed import all_to_all_bytes
from . import CheckFailed, check, expect, refuse_library_call


@check("send_splits")
def check_send_splits(send_splits):
    """expert (M,) of each row sorted by expert, n_experts, world_size -> rows for each rank (list)."""
    expert = torch.tensor([0, 0, 1, 3, 3, 3, 5, 7])
    got = send_splits(expert, 8, 2)
    expect(isinstance(got, (list, tuple)) or isinstance(got, torch.Tensor), "return a list of ints, one per rank")
    got = [int(n) for n in got]
    if got == [2, 1, 3, 0, 1, 0, 1, 0] or len(got) == 8:
        raise CheckFailed("that is one count per expert: sum them per rank (rank r owns experts "
                          "r*E/W ... (r+1)*E/W - 1)")
    if got == [4, 4] or got == [len(expert) // 2] * 2:
        raise CheckFailed("the rows are not split evenly: count how many rows go to each rank's experts")
    expect(got == [6, 2], f"expected [6, 2] (experts 0-3 live on rank 0, 4-7 on rank 1), got {got}")
    got = [int(n) for n in send_splits(torch.tensor([1, 2, 2, 5]), 6, 3)]
    expect(got == [1, 2, 1], f"6 experts on 3 ranks, experts [1, 2, 2, 5]: expected [1, 2, 1], got {got}")
    got = [int(n) for n in send_splits(torch.tensor([], dtype=torch.long), 4, 2)]
    expect(got == [0, 0], f"no rows at all must give [0, 0], got {got}")


@check("all_to_all_volume")
def check_all_to_all_volume(volume):
    """(tokens, n_embd, top_k, world_size, bytes_per_element) -> bytes one rank sends, forward."""
    refuse_library_call(volume, all_to_all_bytes, "count the rows that leave and come back yourself")
    cases = [(1024, 768, 2, 8, 2), (4096, 128, 1, 2, 4), (512, 64, 1, 1, 4)]
    for args in cases:
        got, expected = volume(*args), all_to_all_bytes(*args)
        tokens, n_embd, top_k, world, nbytes = args
        if abs(got - expected) <= 1e-6 * max(expected, 1):
            continue
        if abs(got - expected / 2) <= 1e-6 * expected:
            raise CheckFailed("the results come back too: count the dispatch *and* the combine exchange")
        if abs(got - 2 * tokens * top_k * n_embd * nbytes) <= 1e-6 * max(expected, 1):
            raise CheckFailed("rows for this rank's own experts stay local: only (W - 1) / W of them travel")
        if abs(got - expected / top_k) <= 1e-6 * max(expected, 1) and top_k > 1:
            raise CheckFailed("each token sends top_k rows, one per chosen expert")
        raise CheckFailed(f"tokens={tokens}, n_embd={n_embd}, top_k={top_k}, world_size={world}, "
                          f"{nbytes} B/element: expected {expected:,.0f} bytes, got {got:,.0f}")


@check("global_grad_norm")
def check_global_grad_norm(global_norm):
    """shard_squares (one float per rank: its expert shards' squared gradient norm), replicated_square
    (the replicated weights' squared norm, the same on every rank) -> the whole model's gradient norm."""
    cases = [([9.0, 16.0], 0.0, 5.0), ([1.0, 2.0, 3.0, 4.0], 6.0, 4.0), ([0.0], 4.0, 2.0)]
    for shards, replicated, expected in cases:
        got = float(global_norm(list(shards), replicated))
        if abs(got - expected) <= 1e-6 * max(expected, 1):
            continue
        W = len(shards)
        if abs(got - (shards[0] + replicated) ** 0.5) < 1e-6:
            raise CheckFailed("that is the norm one rank sees alone: every rank's expert shards are part of the model")
        if abs(got - (sum(shards) + W * replicated) ** 0.5) < 1e-6:
            raise CheckFailed("the replicated weights are the same on every rank: count their gradient once, "
                              "not once per rank")
        if abs(got - sum((s + replicated) ** 0.5 for s in shards)) < 1e-6 or abs(
                got - sum((s + replicated) ** 0.5 for s in shards) / W) < 1e-6:
            raise CheckFailed("norms do not add: add squared norms, then take one square root")
        if abs(got - (replicated ** 0.5 + sum(s ** 0.5 for s in shards))) < 1e-6:
            raise CheckFailed("norms do not add: add squared norms, then take one square root")
        raise CheckFailed(f"shards {shards}, replicated {replicated}: expected {expected}, got {got}")
