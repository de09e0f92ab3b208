import pytest
import torch
import torch.nn.functional as F

from moe_tutorial.attention import attention, flash_attention, naive_attention
from moe_tutorial.config import GPTConfig
from moe_tutorial.model import GPT, Kernels

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CASES = [  # (T, block_q, block_k): multiples, ragged tails, one block, T smaller than a block
    (64, 16, 16), (100, 32, 16), (37, 8, 32), (5, 64, 64), (1, 16, 16), (130, 128, 64),
]


def qkv(B, H, T, D, dtype, Tk=None):
    g = torch.Generator().manual_seed(T * 7 + D)
    shape_k = (B, H, Tk or T, D)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(*shape_k, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(*shape_k, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def outputs_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T, block_q, block_k", CASES)
def test_flash_matches_sdpa_and_naive(dtype, causal, T, block_q, block_k):
    q, k, v = qkv(2, 3, T, 24, dtype)
    grad = torch.randn(2, 3, T, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    flash = outputs_and_grads(lambda *a: flash_attention(*a, causal, block_q, block_k), q, k, v, grad)
    sdpa = outputs_and_grads(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal), q, k, v, grad)
    naive = outputs_and_grads(lambda *a: naive_attention(*a, causal), q, k, v, grad)
    for name, f, s, n in zip(("out", "dq", "dk", "dv"), flash, sdpa, naive):
        torch.testing.assert_close(f, s, atol=TOL[dtype], rtol=TOL[dtype], msg=f"{name} vs SDPA")
        torch.testing.assert_close(f, n, atol=TOL[dtype], rtol=TOL[dtype], msg=f"{name} vs naive")


@pytest.mark.parametrize("Tq, Tk", [(7, 20), (20, 7)])
def test_different_query_and_key_lengths(Tq, Tk):
    """Causal masks are top-left aligned, as in SDPA: query i sees keys 0..i."""
    q, k, v = qkv(1, 2, Tq, 8, torch.float64, Tk=Tk)
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(flash_attention(q, k, v, causal, 4, 3), expected, atol=1e-10, rtol=1e-10)


def test_gradcheck():
    q, k, v = qkv(1, 2, 9, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: flash_attention(*a, True, 4, 3), (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: flash_attention(*a, False, 2, 5), (q, k, v))


def test_entry_point_and_errors():
    q, k, v = qkv(1, 2, 10, 8, torch.float32)
    for impl in ("sdpa", "flash", "naive"):
        assert attention(q, k, v, impl=impl).shape == (1, 2, 10, 8)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, impl="flash", dropout_p=0.1)
    with pytest.raises(ValueError, match="block"):
        flash_attention(q, k, v, True, 0, 4)


def test_gpt_with_flash_tracks_sdpa():
    """A few AdamW steps of the same GPT with each attention implementation stay together."""
    losses = {}
    for impl in ("sdpa", "flash"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=20, block_size=48, n_layer=2, n_head=2, n_embd=32), Kernels(attention=impl))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        losses[impl] = []
        for _ in range(8):
            offsets = torch.randint(20, (4, 1), generator=g)
            x = (torch.arange(48) * 3 + offsets) % 20  # a learnable pattern
            loss = model(x, x.roll(-1, dims=1)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["flash"] == pytest.approx(losses["sdpa"], abs=1e-4)
    assert losses["sdpa"][-1] < losses["sdpa"][0]
