"""FlashAttention-2 forward as one Triton kernel, for NVIDIA GPUs (notebook 02).

The same algorithm as `moe_tutorial.attention.flash_attention_forward`: each program instance
owns one block of queries of one (batch, head), keeps the online-softmax state (m, l, acc) in
registers, and streams key/value blocks through on-chip memory. Forward only: training uses
SDPA's fused kernels, this is for learning and measuring.

Optional: without Triton or CUDA, `triton_available()` says why and nothing here runs. Tests
run the kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1) when Triton is
installed.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional, GPU-only dependency
    triton = None


def triton_available():
    """(True, "") where the kernel can run on a GPU, else (False, the reason)."""
    if triton is None:
        return False, "Triton is not installed (pip install triton; it needs an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU here; the Triton kernel runs on NVIDIA GPUs"
    return True, ""


if triton is not None:

    @triton.jit
    def _flash_forward_kernel(Q, K, V, O, LSE, T, scale,
                              CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                              HEAD_DIM: tl.constexpr):
        q_block = tl.program_id(0)
        head = tl.program_id(1)  # flattened (batch, head): tensors are (B*H, T, D), contiguous
        base = head * T * HEAD_DIM
        q_pos = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
        dims = tl.arange(0, HEAD_DIM)
        q_rows = q_pos[:, None] < T
        q = tl.load(Q + base + q_pos[:, None] * HEAD_DIM + dims[None, :], mask=q_rows, other=0.0)

        row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
        if CAUSAL:
            k_stop = tl.minimum(T, (q_block + 1) * BLOCK_Q)  # later key blocks are all future
        else:
            k_stop = T
        for k_start in range(0, k_stop, BLOCK_K):
            k_pos = k_start + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_rows = k_pos[:, None] < T
            k = tl.load(K + base + k_pos[:, None] * HEAD_DIM + dims[None, :], mask=k_rows, other=0.0)
            v = tl.load(V + base + k_pos[:, None] * HEAD_DIM + dims[None, :], mask=k_rows, other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (BLOCK_Q, BLOCK_K)
            visible = k_pos[None, :] < T
            if CAUSAL:
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            probs = tl.exp(scores - new_max[:, None])
            correction = tl.exp(row_max - new_max)
            row_sum = row_sum * correction + tl.sum(probs, 1)
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v).to(tl.float32)
            row_max = new_max
        out = acc / row_sum[:, None]
        tl.store(O + base + q_pos[:, None] * HEAD_DIM + dims[None, :], out.to(O.dtype.element_ty), mask=q_rows)
        tl.store(LSE + head * T + q_pos, row_max + tl.log(row_sum), mask=q_pos < T)


def triton_flash_attention(q, k, v, causal=True, block_q=64, block_k=64, return_lse=False):
    """q, k, v (B, H, T, D) with D a power of two >= 16 -> output (B, H, T, D)."""
    if triton is None:
        raise RuntimeError(triton_available()[1])
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, T, D); got {q.shape}, {k.shape}, {v.shape}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16 for tl.dot, got {D}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(T, block_q), B * H)
    _flash_forward_kernel[grid](q, k, v, out, lse, T, 1.0 / math.sqrt(D),
                                CAUSAL=causal, BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=D)
    return (out, lse) if return_lse else out
