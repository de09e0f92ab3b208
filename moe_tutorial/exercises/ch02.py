"""Checks for notebook 02 (flash attention)."""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import key_blocks
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


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
    refuse_library_call(attend_one_query_block, F.scaled_dot_product_attention, "the loop is the exercise")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(23, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(23, 8, generator=g, dtype=torch.float64)
    scores = q @ k.T / 8 ** 0.5
    for block_k in (23, 8, 5, 1):  # one block, ragged tails, single keys
        with _ScoreRowWatch(rows=5, keys=23) as watch:
            result = attend_one_query_block(q, k, v, block_k)
        expect(block_k == 23 or not watch.seen,
               f"with block_k={block_k} the answer made a tensor of 5 queries x 23 keys: scores against all keys "
               f"at once. Compute them one key block of at most {block_k} keys at a time")
        expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (output, logsumexp)")
        out, lse = result
        expect_close(out, F.softmax(scores, dim=-1) @ v, f"the output with block_k={block_k}")
        expect_close(lse, torch.logsumexp(scores, dim=-1), f"the logsumexp with block_k={block_k}")


class _ScoreRowWatch(TorchFunctionMode):
    """Notes whether any tensor op produces a (rows, keys) tensor: the scores (or weights) of a query
    block against every key at once, which the tiled loop never holds."""

    def __init__(self, rows: int, keys: int):
        super().__init__()
        self.shape, self.seen = (rows, keys), False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and all(n in t.shape for n in self.shape):  # in any order
                self.seen = True
        return out


@check("key_blocks_to_visit")
def check_key_blocks_to_visit(key_blocks_to_visit):
    """(q_start, q_end, T, block_k) -> [(k_start, k_end, needs_mask)] for causal attention."""
    refuse_library_call(key_blocks_to_visit, key_blocks, "that function is the answer")
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


def _backward_tile(q, k, v, d_out, lse, delta, future, subtract_delta=True, scale_grads=True, tile_softmax=False,
                   unmasked=False):
    """(dq, dk, dv) of one tile, wrong in one named way: the mistakes the check recognises by name."""
    scale = q.size(-1) ** -0.5
    scores = q @ k.T * scale
    if future is not None and not unmasked:
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1) if tile_softmax else torch.exp(scores - lse[:, None])
    dv = probs.T @ d_out
    dscores = probs * (d_out @ v.T - (delta[:, None] if subtract_delta else 0.0))
    grad_scale = scale if scale_grads else 1.0
    return dscores @ k * grad_scale, dscores.T @ q * grad_scale, dv


@check("flash_backward_tile")
def check_flash_backward_tile(flash_backward_tile):
    """(q_i, k_j, v_j, do_i, lse_i, delta_i, future) -> this tile's contributions (dq_i, dk_j, dv_j).

    Summed over every key block, the contributions must be the gradients of softmax(q k^T / sqrt(D)) v,
    with the logsumexp taken over *all* keys (not the tile's), causal or not.
    """
    g = torch.Generator().manual_seed(0)
    bq, T, D, block_k = 5, 23, 8, 6  # key blocks of 6, 6, 6, 5 rows: bq != bk catches swapped transposes
    q = torch.randn(bq, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(T, D, generator=g, dtype=torch.float64)
    d_out = torch.randn(bq, D, generator=g, dtype=torch.float64)
    q_pos = torch.arange(10, 10 + bq)  # the queries sit at positions 10..14: the causal mask cuts key blocks
    for causal in (False, True):
        future = (torch.arange(T)[None, :] > q_pos[:, None]) if causal else torch.zeros(bq, T, dtype=torch.bool)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        scores = (leaves[0] @ leaves[1].T * D ** -0.5).masked_fill(future, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ leaves[2]
        ref_dq, ref_dk, ref_dv = torch.autograd.grad(out, leaves, d_out)
        lse, delta = torch.logsumexp(scores, dim=-1).detach(), (d_out * out).sum(dim=-1).detach()
        case = "causal" if causal else "non-causal"
        dq, dk, dv = torch.zeros_like(q), [], []
        mistakes = {"no_delta": {"subtract_delta": False}, "unscaled": {"scale_grads": False},
                    "tile_softmax": {"tile_softmax": True}, "no_mask": {"unmasked": True}}
        wrong = {name: ([], []) for name in mistakes}  # each mistake's dk and dv blocks, to name it if made
        for start in range(0, T, block_k):
            k_j, v_j = k[start:start + block_k], v[start:start + block_k]
            tile_future = future[:, start:start + block_k] if causal else None
            result = flash_backward_tile(q, k_j, v_j, d_out, lse, delta, tile_future)
            expect(isinstance(result, tuple) and len(result) == 3, "return a tuple (dq_i, dk_j, dv_j)")
            expect_shape(result[0], q.shape, "dq_i (the tile's contribution to the query block's gradient)")
            expect_shape(result[1], k_j.shape, "dk_j")
            expect_shape(result[2], v_j.shape, "dv_j")
            dq += result[0]
            dk.append(result[1])
            dv.append(result[2])
            for name, options in mistakes.items():
                _, wrong_dk, wrong_dv = _backward_tile(q, k_j, v_j, d_out, lse, delta, tile_future, **options)
                wrong[name][0].append(wrong_dk)
                wrong[name][1].append(wrong_dv)
        dk, dv = torch.cat(dk), torch.cat(dv)
        same_dk = {name: torch.allclose(dk, torch.cat(w[0])) for name, w in wrong.items()}
        same_dv = {name: torch.allclose(dv, torch.cat(w[1])) for name, w in wrong.items()}
        if same_dv["tile_softmax"]:
            raise CheckFailed(f"{case}: P is a softmax over this tile alone; recompute it with the saved "
                              f"logsumexp of all keys, P = exp(S - L_i)")
        if causal and same_dv["no_mask"]:
            raise CheckFailed("causal: the future keys get weight; set S to -inf where `future` is True "
                              "before exponentiating")
        expect_close(dv, ref_dv, f"{case}: dV (over all key blocks, P_ij^T dO_i with P_ij = exp(S_ij - L_i))")
        if same_dk["no_delta"]:
            raise CheckFailed(f"{case}: dS is P * dP; subtract δ_i = rowsum(dO * O) from each row: dS = P * (dP - δ_i)")
        if same_dk["unscaled"]:
            raise CheckFailed(f"{case}: dK and dQ miss the softmax scale: S = Q K^T / sqrt(D), so multiply "
                              f"dS K and dS^T Q by 1/sqrt(D)")
        expect_close(dk, ref_dk, f"{case}: dK (dS^T Q_i / sqrt(D), key block by key block)")
        expect_close(dq, ref_dq, f"{case}: dQ summed over key blocks (dS K_j / sqrt(D))")
