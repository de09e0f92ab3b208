"""The Triton kernel: checked on a GPU when there is one, else through Triton's CPU interpreter."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from moe_tutorial.triton_attention import triton_available

HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERPRETED = r"""
import torch, torch.nn.functional as F
from moe_tutorial.triton_attention import triton_flash_attention
torch.manual_seed(0)
for causal in (True, False):
    for T in (16, 50, 64):                      # one block, a ragged tail, several blocks
        q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
        out, lse = triton_flash_attention(q, k, v, causal, block_q=16, block_k=16, return_lse=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        s = (q @ k.transpose(-2, -1)) / 4.0
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (optional, GPU-only dependency)")
def test_kernel_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.skipif(not triton_available()[0], reason=triton_available()[1])
def test_kernel_on_gpu_matches_sdpa():
    import torch.nn.functional as F

    from moe_tutorial.triton_attention import triton_flash_attention

    for causal in (True, False):
        q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(triton_flash_attention(q, k, v, causal), ref, atol=2e-2, rtol=2e-2)


def test_reports_why_it_cannot_run():
    ok, reason = triton_available()
    assert ok or ("Triton" in reason or "CUDA" in reason)
