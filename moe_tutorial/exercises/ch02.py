"""Checks for notebook 02 (flash attention)."""

import torch
import torch.nn.functional as F

from ..attention import key_blocks
from . import CheckFailed, check, expect, expect_close


def _softmax_state(scores, values):
    """(row max m, row sum l, accumulator acc) of one chunk of scores (N, n) and values (n, D)."""
    m = scores.amax(dim=-1)
    p = torch.exp(scores - m[:, None])
    return m, p.sum(dim=-1), p @ values


@check("merge_softmax_states")
def check_merge_softmax_states(merge_softmax_states):
    """Two partial states over disjoint key chunks -> the state over all keys."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 10, generator=g, dtype=torch.float64) * 4
    scores[0, 6:] += 20.0  # the second chunk holds row 0's maximum: the first must be rescaled
    values = torch.randn(10, 3, generator=g, dtype=torch.float64)
    a, b = _softmax_state(scores[:, :6], values[:6]), _softmax_state(scores[:, 6:], values[6:])
    merged = merge_softmax_states(a, b)
    expect(isinstance(merged, tuple) and len(merged) == 3, "return a tuple (m, l, acc)")
    m, l, acc = merged
    expect_close(m, scores.amax(dim=-1), "the merged row max m")
    full_m, full_l, full_acc = _softmax_state(scores, values)
    if torch.allclose(l, a[1] + b[1]):
        raise CheckFailed("l is the plain sum l_a + l_b: rescale each by exp(m_a - m) and exp(m_b - m)")
    expect_close(l, full_l, "the merged row sum l")
    expect_close(acc, full_acc, "the merged accumulator acc")
    expect_close(acc / l[:, None], F.softmax(scores, dim=-1) @ values, "acc / l (the attention output)")


@check("attend_one_query_block")
def check_attend_one_query_block(attend_one_query_block):
    """q_blk (bq, D), k and v (T, D) -> output (bq, D) and logsumexp (bq,), one key block at a time."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(23, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(23, 8, generator=g, dtype=torch.float64)
    scores = q @ k.T / 8 ** 0.5
    for block_k in (23, 8, 5, 1):  # one block, ragged tails, single keys
        result = attend_one_query_block(q, k, v, block_k)
        expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (output, logsumexp)")
        out, lse = result
        expect_close(out, F.softmax(scores, dim=-1) @ v, f"the output with block_k={block_k}")
        expect_close(lse, torch.logsumexp(scores, dim=-1), f"the logsumexp with block_k={block_k}")


@check("key_blocks_to_visit")
def check_key_blocks_to_visit(key_blocks_to_visit):
    """(q_start, q_end, T, block_k) -> [(k_start, k_end, needs_mask)] for causal attention."""
    for q_start, q_end, T, block_k in ((0, 4, 16, 4), (4, 8, 16, 4), (8, 12, 10, 4), (0, 16, 16, 4),
                                       (12, 16, 16, 8), (5, 10, 20, 3), (16, 20, 18, 4)):
        expected = list(key_blocks(q_start, min(q_end, T), T, block_k, causal=True))
        got = [tuple(b) for b in key_blocks_to_visit(q_start, min(q_end, T), T, block_k)]
        case = f"queries {q_start}..{min(q_end, T) - 1} of T={T}, block_k={block_k}"
        visited = {b[:2] for b in got}
        missing = [b[:2] for b in expected if b[:2] not in visited]
        expect(not missing, f"{case}: key blocks {missing} hold visible keys but are not visited")
        extra = [b[:2] for b in got if b[:2] not in {e[:2] for e in expected}]
        expect(not extra, f"{case}: blocks {extra} are entirely in the future (or out of range): skip them")
        expect(got == expected, f"{case}: expected {expected}, got {got} (check needs_mask: a block needs "
                                f"the mask when some of its keys come after the block's first query)")
