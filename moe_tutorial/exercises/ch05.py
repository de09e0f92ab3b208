"""Checks for notebook 05 (scaling to a GPT-2 MoE)."""

import torch
import torch.nn.functional as F

from .. import serving
from ..config import GPTConfig
from ..costs import model_info
from ..model import MLP
from ..presets import gpt2_config
from ..router import positions_in_expert
from ..serving import PUBLISHED, PublishedMoE, attention_params, parameter_counts
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


@check("gpt2_param_count")
def check_gpt2_param_count(gpt2_param_count):
    """(n_layer, n_embd, vocab_size, block_size) -> parameters of a GPT-2-style model."""
    refuse_library_call(gpt2_param_count, model_info, "count the embeddings, blocks and norms by hand")
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
        # 9C of Linear biases + 2C of LayerNorm biases per block and ln_f's (LayerNorm gains too: 13C and 2C)
        if got in (expected - L * 11 * C - C, expected - L * 13 * C - 2 * C, expected - L * 13 * C - C):
            raise CheckFailed(f"{what}: biases are missing: GPT-2 has them in every Linear and LayerNorm "
                              f"(got {got:,}, expected {expected:,})")
        raise CheckFailed(f"{what} (n_layer={L}, n_embd={C}, vocab={V}, block={T}): got {got:,}, "
                          f"expected {expected:,}")


@check("dispatch_mask")
def check_dispatch_mask(dispatch_mask):
    """expert (N, k), position (N, k), kept (N, k), n_experts, capacity -> one-hot (N, E, C)."""
    expert = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    position = torch.tensor([[0, 0], [1, 0], [1, 2], [2, 2]])
    kept = position < 2
    mask = dispatch_mask(expert, position, kept, 3, 2)
    expect_shape(mask, (4, 3, 2), "the dispatch mask")
    expected = torch.zeros(4, 3, 2)
    for n in range(4):
        for j in range(2):
            if kept[n, j]:
                expected[n, expert[n, j], position[n, j]] = 1.0
    expect(float(mask.sum()) == float(kept.sum()),
           f"the mask has {float(mask.sum()):.0f} ones but {int(kept.sum())} assignments are kept: "
           f"dropped assignments must not appear")
    expect_close(mask.float(), expected, "the dispatch mask")
    generator = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 5, (30, 2), generator=generator)
    position = positions_in_expert(expert, 5)
    kept = position < 8
    mask = dispatch_mask(expert, position, kept, 5, 8)
    expected = torch.zeros(30, 5, 8)
    token, choice = torch.where(kept)
    expected[token, expert[token, choice], position[token, choice]] = 1.0
    expect_close(mask.float(), expected, "the dispatch mask of 30 tokens, top-2 over 5 experts")


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
    refuse_library_call(decode_attention, F.scaled_dot_product_attention, "write the scores, softmax and sum")
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


@check("published_moe_params")
def check_published_moe_params(published_moe_params):
    """m: PublishedMoE, attention: one layer's attention parameters -> (total, active) parameters."""
    refuse_library_call(published_moe_params, parameter_counts, "count the parts yourself")
    refuse_library_call(published_moe_params, serving._parts, "count the parts yourself")
    tied = PublishedMoE(vocab_size=100, hidden_size=16, n_layers=4, n_heads=2, n_experts=8, top_k=2,
                        expert_hidden=12, n_shared_experts=1, n_dense_layers=1, dense_hidden=40,
                        tie_embeddings=True, n_kv_heads=1, head_dim=8)
    for name, m in [*PUBLISHED.items(), ("a tiny tied model with a shared expert and a dense layer", tied)]:
        result = published_moe_params(m, attention_params(m))
        expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (total, active)")
        total, active = (int(n) for n in result)
        right_total, right_active = parameter_counts(m)
        if (total, active) == (right_total, right_active):
            continue
        C, swiglu = m.hidden_size, 3 * m.hidden_size * m.expert_hidden
        hints = [
            (active == total, "every expert counted as active: a token runs only its top_k routed experts"),
            (right_total - total == m.n_moe_layers * m.n_shared_experts * swiglu and m.n_shared_experts,
             "the shared experts are missing: every token runs them, beside the routed ones"),
            (total - right_total == m.n_dense_layers * (m.n_experts * (swiglu + C) + m.n_shared_experts * swiglu
                                                        - 3 * C * m.dense_hidden) and m.n_dense_layers,
             "the first n_dense_layers layers hold one dense MLP (dense_hidden wide), not experts"),
            (total - right_total == m.vocab_size * C and m.tie_embeddings,
             "with tied embeddings the output layer is the token embedding: count it once"),
            (right_total - total == m.n_moe_layers * m.n_experts * C, "the routers are missing: E x C per MoE layer"),
            (right_total - total == (2 * m.n_layers + 1) * C, "the RMSNorm weights are missing: two per layer, "
                                                               "one final"),
        ]
        for wrong, message in hints:
            if wrong:
                raise CheckFailed(f"{name}: {message}")
        expect(total == right_total, f"{name}: total {total:,} parameters, expected {right_total:,}")
        raise CheckFailed(f"{name}: active {active:,} parameters, expected {right_active:,}")

