"""Checks for notebook 02 (flash attention)."""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import attention, flash_attention, flash_attention_forward, key_blocks, naive_attention
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
    # A row that sees no key of a chunk keeps the starting state (-inf, 0, 0): rows 0-1 see nothing in
    # chunk A, rows 0 and 2 nothing in chunk B; row 0 sees no key at all and must stay empty, not NaN.
    empty_a = tuple(t.clone() for t in a)
    empty_b = tuple(t.clone() for t in b)
    for state, rows in ((empty_a, [0, 1]), (empty_b, [0, 2])):
        state[0][rows], state[1][rows], state[2][rows] = float("-inf"), 0.0, 0.0
    m, l, acc = merge_softmax_states(empty_a, empty_b)
    for name, t in (("m", m), ("l", l), ("acc", acc)):
        if torch.isnan(t).any():
            raise CheckFailed(f"NaN in the merged {name} where a state is empty (m = -inf, l = 0, acc = 0): "
                              "exp(-inf - (-inf)) is NaN; subtract 0 where the merged m is -inf")
    expect(bool(m[0] == float("-inf")) and bool(l[0] == 0) and bool((acc[0] == 0).all()),
           "two empty states merge to an empty state (-inf, 0, 0)")
    expect_close(torch.stack([l[1], l[2], l[3]]), torch.stack([b[1][1], a[1][2], full_l[3]]),
                 "l where one of the two states is empty (the other state's l)")
    expect_close(acc[1:3], torch.stack([b[2][1], a[2][2]]), "acc where one of the two states is empty")


@check("attend_one_query_block")
def check_attend_one_query_block(attend_one_query_block):
    """q_blk (bq, D), k and v (T, D) -> output (bq, D) and logsumexp (bq,), one key block at a time."""
    for library_fn in (F.scaled_dot_product_attention, flash_attention_forward, flash_attention, naive_attention,
                       attention):  # the package's attention (with q[None, None]) does the whole exercise
        refuse_library_call(attend_one_query_block, library_fn, "the loop is the exercise")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(23, 8, generator=g, dtype=torch.float64) * 2
    v = torch.randn(23, 8, generator=g, dtype=torch.float64)
    scores = q @ k.T / 8 ** 0.5
    for block_k in (23, 8, 5, 1):  # one block, ragged tails, single keys
        with _ScoreWatch(q, k) as watch:
            result = attend_one_query_block(q, k, v, block_k)
        expect(block_k == 23 or watch.wide is None,
               f"with block_k={block_k} the answer made a tensor of shape {watch.wide}: scores (or weights) against "
               f"all 23 keys at once, for the block or for one query row. Compute them one key block of at most "
               f"{block_k} keys at a time")
        most = int(watch.coverage.max())
        expect(most <= 1, f"with block_k={block_k} some scores were computed {most} times (a first pass for the "
                          f"maximum, then another for the sums?). The online softmax needs one pass: each key block's "
                          f"scores once, rescaling l and acc by exp(m - m_new) when the maximum grows")
        expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (output, logsumexp)")
        out, lse = result
        expect_close(out, F.softmax(scores, dim=-1) @ v, f"the output with block_k={block_k}")
        expect_close(lse, torch.logsumexp(scores, dim=-1), f"the logsumexp with block_k={block_k}")


_MATMULS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum", "linear", "inner", "mv", "tensordot",
            "addmm", "baddbmm", "dot"}


class _ScoreWatch(TorchFunctionMode):
    """Watches the tensor ops of an answer computing attention of queries q (bq, D) over keys k (T, D).

    `wide`: the shape of a float tensor with a dimension of all T keys that is not K or V themselves (in any
    layout): scores or weights against every key at once, for the whole block (bq, T) or one row at a time (T,).
    `coverage[i, j]`: how many matmuls produced the score of query i and key j, scaled by 1/sqrt(D) or not, for
    a whole key block or one query row of it, in either layout, in a 2-D output or in any (bq, bk) slice of a
    batched one (bmm, a 4-D matmul). One pass of the online softmax computes each score once."""

    def __init__(self, q, k):
        super().__init__()
        self.keys, self.wide = k.size(0), None
        self.kv_dims = sorted(n for n in k.shape if n != 1)
        unscaled = q @ k.T
        self.scores = (unscaled, unscaled / q.size(-1) ** 0.5)
        self.coverage = torch.zeros(q.size(0), k.size(0), dtype=torch.long)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                continue
            if self.keys in t.shape and sorted(n for n in t.shape if n != 1) != self.kv_dims:
                self.wide = tuple(t.shape)
            if getattr(func, "__name__", "") in _MATMULS and t.dim() >= 1 and t.numel() > 0:
                t = t.detach()
                for tile in (t,) if t.dim() == 1 else t.reshape(-1, *t.shape[-2:]):  # each 2-D slice of a batch
                    self._count_scores(tile)
        return out

    def _count_scores(self, t):
        rows = self.coverage.size(0)
        for block in (t.reshape(1, -1),) if t.dim() == 1 else (t, t.T):
            r, n = block.shape
            if r not in (1, rows) or n > self.keys:
                continue
            for reference in self.scores:
                windows = reference.unfold(1, n, 1)  # (rows, T - n + 1, n): every run of n consecutive keys
                diff = (windows - block[:, None, :]).abs().amax(dim=-1)  # (rows, T - n + 1)
                if r == rows:
                    diff = diff.amax(dim=0, keepdim=True)  # the whole block must match
                close = diff <= 1e-9 * (1 + reference.abs().max())
                if close.any():
                    i, start = close.nonzero()[0].tolist()
                    self.coverage[slice(None) if r == rows else i, start:start + n] += 1
                    return


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
