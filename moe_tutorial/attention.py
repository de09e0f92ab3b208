"""Scaled dot-product attention three ways: naive, FlashAttention-2 in plain PyTorch, and SDPA
(notebook 02; the naive one is notebook 01's).

All take q (B, H, Tq, D), k and v (B, H, Tk, D) and return (B, H, Tq, D). With `causal=True`
query i sees keys 0..i (top-left aligned, as `F.scaled_dot_product_attention(is_causal=True)`).

The flash version never builds the Tq x Tk score matrix: it walks over blocks of queries
(outer loop) and blocks of keys (inner loop), keeping a running row maximum and row sum
("online softmax"), and its backward recomputes each block's probabilities from the saved
logsumexp instead of storing them. Memory grows linearly with T instead of quadratically.
"""

import math

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("sdpa", "flash", "naive")
DEFAULT_BLOCK_Q = 256  # tuned on a 2-core CPU with benchmarks/attention.py
DEFAULT_BLOCK_K = 256


def naive_attention(q, k, v, causal=True, dropout_p=0.0):
    """softmax(q k^T / sqrt(D)) v, materialising the full (B, H, Tq, Tk) matrix."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        Tq, Tk = q.size(-2), k.size(-2)
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, Tq, D)


def causal_tile_mask(q_start, q_end, k_start, k_end, device):
    """True where key position > query position inside one (q block, k block) tile."""
    q_pos = torch.arange(q_start, q_end, device=device)[:, None]
    k_pos = torch.arange(k_start, k_end, device=device)[None, :]
    return k_pos > q_pos  # (bq, bk)


def key_blocks(q_start, q_end, Tk, block_k, causal):
    """(k_start, k_end, needs_mask) for the key blocks a query block must visit.

    With a causal mask, key blocks starting after the block's last query are entirely
    in the future: they are skipped, which halves the work for long sequences.
    """
    for k_start in range(0, Tk, block_k):
        k_end = min(k_start + block_k, Tk)
        if causal and k_start > q_end - 1:
            break
        yield k_start, k_end, causal and k_end - 1 > q_start


def flash_attention_forward(q, k, v, causal=True, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """FlashAttention-2 forward. Returns the output (B, H, Tq, D) and logsumexp (B, H, Tq)."""
    *batch, Tq, D = q.shape
    Tk = k.size(-2)
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    lse = torch.empty(*batch, Tq, dtype=q.dtype, device=q.device)
    for q_start in range(0, Tq, block_q):
        q_end = min(q_start + block_q, Tq)
        q_blk = q[..., q_start:q_end, :] * scale  # (B, H, bq, D), scaled once per block
        row_max = torch.full((*batch, q_end - q_start, 1), float("-inf"), dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)  # (B, H, bq, 1)
        acc = torch.zeros_like(q_blk)  # unnormalised output, (B, H, bq, D)
        for k_start, k_end, needs_mask in key_blocks(q_start, q_end, Tk, block_k, causal):
            scores = q_blk @ k[..., k_start:k_end, :].transpose(-2, -1)  # (B, H, bq, bk)
            if needs_mask:
                scores.masked_fill_(causal_tile_mask(q_start, q_end, k_start, k_end, q.device), float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            probs = scores.sub_(new_max).exp_()  # in place: the scores are not needed again
            correction = (row_max - new_max).exp_()  # rescales what was summed so far
            row_sum.mul_(correction).add_(probs.sum(dim=-1, keepdim=True))
            acc.mul_(correction).add_(probs @ v[..., k_start:k_end, :])
            row_max = new_max
        out[..., q_start:q_end, :] = acc / row_sum  # normalise once, at the end
        lse[..., q_start:q_end] = (row_max + row_sum.log()).squeeze(-1)
    return out, lse


def flash_attention_backward(q, k, v, out, lse, grad_out, causal=True,
                             block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Tiled attention backward: recompute P blockwise from the saved logsumexp; returns dq, dk, dv.

    The loop runs query blocks outer, key blocks inner, like the forward (one `key_blocks` helper
    skips the causal blocks for both). FlashAttention-2's GPU kernel swaps the loops (key blocks
    outer: dK, dV stay in SRAM, dQ is accumulated with atomic adds); on a CPU, with tiles run one
    at a time, both orders give the same sums (notebook 02 builds the FlashAttention-2 order)."""
    Tq, D = q.shape[-2:]
    Tk = k.size(-2)
    scale = 1.0 / math.sqrt(D)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # D_i = rowsum(dO * O), (B, H, Tq, 1)
    for q_start in range(0, Tq, block_q):
        q_end = min(q_start + block_q, Tq)
        q_blk = q[..., q_start:q_end, :]
        do_blk = grad_out[..., q_start:q_end, :]  # (B, H, bq, D)
        lse_blk = lse[..., q_start:q_end, None]  # (B, H, bq, 1)
        for k_start, k_end, needs_mask in key_blocks(q_start, q_end, Tk, block_k, causal):
            k_blk, v_blk = k[..., k_start:k_end, :], v[..., k_start:k_end, :]
            scores = (q_blk @ k_blk.transpose(-2, -1)).mul_(scale)  # (B, H, bq, bk)
            if needs_mask:
                scores.masked_fill_(causal_tile_mask(q_start, q_end, k_start, k_end, q.device), float("-inf"))
            probs = scores.sub_(lse_blk).exp_()  # exactly the forward's softmax, recomputed
            dv[..., k_start:k_end, :] += probs.transpose(-2, -1) @ do_blk
            dprobs = do_blk @ v_blk.transpose(-2, -1)  # (B, H, bq, bk)
            dscores = probs.mul_(dprobs.sub_(delta[..., q_start:q_end, :])).mul_(scale)
            dq[..., q_start:q_end, :] += dscores @ k_blk
            dk[..., k_start:k_end, :] += dscores.transpose(-2, -1) @ q_blk
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k):
        out, lse = flash_attention_forward(q, k, v, causal, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)  # O(T) extra memory: no T x T matrix saved
        ctx.options = (causal, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, grad_out.contiguous(), *ctx.options)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=True, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    return FlashAttention.apply(q, k, v, causal, block_q, block_k)


def repeat_kv(x, n_rep: int):
    """Grouped-query attention's sharing: key/value heads (B, KV, T, D) -> (B, KV * n_rep, T, D),
    each repeated for the n_rep query heads of its group (query head h uses kv head h // n_rep)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention(q, k, v, causal=True, impl="sdpa", dropout_p=0.0):
    """The one entry point the model uses; `impl` is the model's Kernels(attention=...), one of
    ATTENTION_IMPLS."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    if impl == "naive":
        return naive_attention(q, k, v, causal, dropout_p)
    if impl == "flash":
        if dropout_p > 0.0:
            raise ValueError("impl='flash' does not implement attention dropout; set dropout=0.0 "
                             "or use Kernels(attention='sdpa')")
        return flash_attention(q, k, v, causal)
    raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def cached_attention(q, k, v, past: int):
    """Attention for queries at positions past, ..., past + Tq - 1 over keys 0, ..., past + Tq - 1.

    q (B, nh, Tq, hs), k and v (B, nh, past + Tq, hs). The causal mask is aligned to the
    bottom-right: query i sees keys up to past + i. (SDPA's is_causal aligns to the top-left,
    which is only right when past == 0.)
    """
    Tq, Tk = q.size(2), k.size(2)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:  # one new token sees every cached position: no mask at all
        return F.scaled_dot_product_attention(q, k, v)
    visible = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(past, past + Tq, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
