"""Checks for notebook 07 (the modern block and router)."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..attention import repeat_kv
from ..config import MoEConfig
from ..rope import RotaryEmbedding, apply_rope
from ..router import Router
from . import CheckFailed, check, expect, expect_close, expect_shape


@check("rope")
def check_rope(rope):
    """x (B, H, T, D), start position, theta -> x rotated: pair (j, j + D/2) by (start + t) * theta^(-2j/D)."""
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0))
    expected = apply_rope(x, *RotaryEmbedding(8, 32, 10000.0)(5, 7))
    got = rope(x.clone(), 5, 10000.0)
    expect_shape(got, x.shape)
    if torch.allclose(got, apply_rope(x, *RotaryEmbedding(8, 32, 10000.0)(0, 7)), atol=1e-5):
        raise CheckFailed("the positions start at 0: the tokens sit at positions start, start + 1, ...")
    if torch.allclose(got, interleaved_rope(x, 5, 10000.0), atol=1e-5):
        raise CheckFailed("you paired neighbouring channels (0, 1), (2, 3): this course (and Llama's checkpoints) "
                          "pair channel j with j + D/2")
    norms_kept = torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
    expect(norms_kept, "a rotation keeps every vector's length: check the signs of rotate_half")
    expect_close(got, expected, "rotated x")
    expect_close(rope(x.clone(), 0, 1e6), apply_rope(x, *RotaryEmbedding(8, 32, 1e6)(0, 7)), "rotated x with theta=1e6")


def interleaved_rope(x, start, theta):
    """The paper's pairing, (0, 1), (2, 3), ...: right in itself, wrong for Llama-layout weights."""
    T, D = x.size(-2), x.size(-1)
    cos, sin = RotaryEmbedding(D, start + T, theta)(start, T)
    cos, sin = cos[:, :D // 2].repeat_interleave(2, -1), sin[:, :D // 2].repeat_interleave(2, -1)
    turned = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0) per pair
    return x * cos + turned * sin


@check("repeat_kv")
def check_repeat_kv(repeat):
    """kv (B, KV, T, D), n_rep -> (B, KV * n_rep, T, D): query head h reads kv head h // n_rep."""
    kv = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # every position different
    got = repeat(kv, 2)
    expect_shape(got, (2, 6, 4, 5))
    if torch.equal(got, kv.repeat(1, 2, 1, 1)):
        raise CheckFailed("heads come out as 0, 1, 2, 0, 1, 2: query heads 0 and 1 share kv head 0, so repeat "
                          "each head in place (0, 0, 1, 1, 2, 2)")
    expect(torch.equal(got, repeat_kv(kv, 2)), "query head h must read kv head h // n_rep")
    expect(torch.equal(repeat(kv, 1), kv), "n_rep = 1 (multi-head attention) must return the heads unchanged")


@check("sigmoid_topk")
def check_sigmoid_topk(route):
    """logits (N, E), bias (E,), top_k, scaling -> (experts (N, k), weights (N, k)), DeepSeek-V3 style."""
    gen = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(12, 8, generator=gen), 0.3 * torch.randn(8, generator=gen)
    result = route(logits.clone(), bias.clone(), 2, 2.5)
    expect(isinstance(result, tuple) and len(result) == 2, "return a tuple (experts, weights)")
    experts, weights = result
    expect_shape(experts, (12, 2), "experts")
    expect_shape(weights, (12, 2), "weights")
    reference = Router(8, MoEConfig(n_experts=8, top_k=2, scoring="sigmoid", routed_scaling_factor=2.5))
    with torch.no_grad():
        reference.gate.weight.copy_(torch.eye(8))
        reference.selection_bias.copy_(bias)
    r = reference(logits, capacity_factor=10.0)
    order, their_order = experts.long().sort(1), r.expert.sort(1)
    if not torch.equal(order.values, their_order.values):
        unbiased = torch.sigmoid(logits).topk(2, dim=1).indices.sort(1).values
        if torch.equal(order.values, unbiased):
            raise CheckFailed("the bias must shift which experts are chosen: select by sigmoid(logits) + bias")
        if torch.equal(order.values, torch.sigmoid(logits + bias).topk(2, dim=1).indices.sort(1).values):
            raise CheckFailed("the bias is added to the sigmoid scores, not to the logits: select by "
                              "sigmoid(logits) + bias")
        raise CheckFailed("wrong experts: choose the top_k of sigmoid(logits) + bias")
    weights = weights.gather(1, order.indices)
    expected = r.weights.gather(1, their_order.indices)
    biased = torch.sigmoid(logits) + bias
    if torch.allclose(weights, 2.5 * (lambda w: w / w.sum(1, keepdim=True))(biased.gather(1, r.expert.gather(
            1, their_order.indices))), atol=1e-5):
        raise CheckFailed("the weights must come from the unbiased sigmoid scores: the bias only selects")
    if torch.allclose(weights, expected / 2.5, atol=1e-5):
        raise CheckFailed("multiply the normalised weights by the routed scaling factor")
    if torch.allclose(weights, 2.5 * torch.sigmoid(logits).gather(1, r.expert.gather(1, their_order.indices)),
                      atol=1e-5):
        raise CheckFailed("normalise the chosen weights to sum to 1 before scaling")
    expect_close(weights, expected, "weights")


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an ATen operation returns while active: also the intermediates
    inside a composite call such as einsum."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _mla_reference(q_nope, c_kv, w_uk, w_uv, scale):
    keys = torch.einsum("sr,hdr->hsd", c_kv, w_uk)  # (H, S, nope): what the absorbed form never builds
    values = torch.einsum("sr,hvr->hsv", c_kv, w_uv)  # (H, S, v)
    probs = F.softmax(torch.einsum("hd,hsd->hs", q_nope, keys) * scale, dim=-1)
    return torch.einsum("hs,hsv->hv", probs, values)


@check("mla_absorbed")
def check_mla_absorbed(attend):
    """q_nope (H, nope), c_kv (S, r), w_uk (H, nope, r), w_uv (H, v, r), scale -> (H, v) per-head outputs."""
    H, S, nope, v, r = 3, 50, 7, 5, 11  # distinct sizes: a per-head key or value has a 50 and a 7 or a 5
    gen = torch.Generator().manual_seed(0)
    q_nope, c_kv = torch.randn(H, nope, generator=gen), torch.randn(S, r, generator=gen)
    w_uk, w_uv = torch.randn(H, nope, r, generator=gen), torch.randn(H, v, r, generator=gen)
    recorder = _ShapeRecorder()
    with recorder:
        got = attend(q_nope.clone(), c_kv.clone(), w_uk.clone(), w_uv.clone(), nope ** -0.5)
    expect_shape(got, (H, v), "the heads' outputs")
    expected = _mla_reference(q_nope, c_kv, w_uk, w_uv, nope ** -0.5)
    if torch.allclose(got, _mla_reference(q_nope, c_kv, w_uk, w_uv, 1.0), atol=1e-4):
        raise CheckFailed("scale the scores by `scale` before the softmax")
    expect_close(got, expected, "the heads' outputs", atol=1e-4)
    # A key or value per head and cached token, in any layout: S tokens, no latent axis, H * S * min(nope, v) values.
    built = [shape for shape in recorder.shapes
             if S in shape and r not in shape and torch.Size(shape).numel() >= H * S * min(nope, v)]
    if built:
        raise CheckFailed(f"a tensor of shape {built[0]} holds a key or value per head and cached token: "
                          f"absorb W_UK into the query and apply W_UV after the weighted sum of latents")
