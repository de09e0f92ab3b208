"""Checks for notebook 05 (scaling to a GPT-2 MoE)."""

import torch
import torch.nn.functional as F

from ..config import GPTConfig
from ..costs import model_info
from ..model import MLP
from ..presets import gpt2_config
from . import CheckFailed, check, expect, expect_close, expect_shape


@check("gpt2_param_count")
def check_gpt2_param_count(gpt2_param_count):
    """(n_layer, n_embd, vocab_size, block_size) -> parameters of a GPT-2-style model."""
    cases = [("gpt2", gpt2_config("gpt2")), ("a tiny model", GPTConfig(vocab_size=11, block_size=5, n_layer=2,
                                                                        n_head=1, n_embd=6, bias=True))]
    for what, config in cases:
        L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
        got = gpt2_param_count(L, C, V, T)
        expect(isinstance(got, int), f"return an int, got {type(got).__name__}")
        expected = model_info(config).total_params
        if got == expected:
            continue
        if got == expected + V * C:
            raise CheckFailed(f"{what}: the output projection is tied to the token embedding: count V*C once")
        if got == expected - T * C:
            raise CheckFailed(f"{what}: you forgot the position embedding (block_size x n_embd)")
        if got == expected - L * 13 * C - C:  # 9C of Linear biases + 4C of LayerNorm biases per block, ln_f's
            raise CheckFailed(f"{what}: biases are missing: GPT-2 has them in every Linear and LayerNorm "
                              f"(got {got:,}, expected {expected:,})")
        raise CheckFailed(f"{what} (n_layer={L}, n_embd={C}, vocab={V}, block={T}): got {got:,}, "
                          f"expected {expected:,}")


@check("upcycle_mlp")
def check_upcycle_mlp(upcycle_mlp):
    """(dense MLP, n_experts) -> (c_fc (E, C, 4C), c_proj (E, 4C, C)), every expert a copy."""
    torch.manual_seed(0)
    config = GPTConfig(n_embd=8, n_head=2, bias=False)
    mlp = MLP(config)
    result = upcycle_mlp(mlp, 3)
    expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (c_fc, c_proj)")
    c_fc, c_proj = result
    if tuple(c_fc.shape) == (3, 32, 8):
        raise CheckFailed("c_fc has shape (E, 4C, C): nn.Linear stores (out, in); transpose to (in, out)")
    expect_shape(c_fc, (3, 8, 32), "c_fc")
    expect_shape(c_proj, (3, 32, 8), "c_proj")
    x = torch.randn(5, 8)
    with torch.no_grad():
        dense = mlp(x).out
        for e in range(3):
            expect_close(F.gelu(x @ c_fc[e]) @ c_proj[e], dense, f"expert {e}'s output")
    shares = any(t.stride(0) == 0 or t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
                 for t, w in ((c_fc, mlp.c_fc.weight), (c_proj, mlp.c_proj.weight)))
    expect(not shares, "the experts share memory with the dense MLP (or with each other, via expand): make "
                       "copies (.clone(), .repeat) so each expert can train on its own")


@check("decode_attention")
def check_decode_attention(decode_attention):
    """q (B, nh, 1, hs) of the newest token, cached k, v (B, nh, T, hs) -> (B, nh, 1, hs)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (2, 3, 7, 4)
    out = decode_attention(q[:, :, -1:], k, v)
    expect_shape(out, (2, 3, 1, 4))
    if torch.allclose(out, v[:, :, :1], atol=1e-5):
        raise CheckFailed("the new token only sees the first key: SDPA's is_causal aligns the mask top-left, "
                          "so one query gets only key 0. The newest token may see every cached key: no mask")
    expect_close(out, full[:, :, -1:], "attention of the newest token")
    one = decode_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1])  # a single cached position
    expect_close(one, v[:, :, :1], "attention over a single key (must return its value)")

