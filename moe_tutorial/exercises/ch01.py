"""Checks for notebook 01 (the character-level GPT)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sampling import filter_logits
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call


@check("causal_attention_weights")
def check_causal_attention_weights(causal_attention_weights):
    """scores (B, T, T) -> weights (B, T, T): masked softmax, row t attends to 0..t."""
    torch.manual_seed(0)
    scores = torch.randn(2, 6, 6) * 3
    weights = causal_attention_weights(scores.clone())
    expect_shape(weights, (2, 6, 6), "the weights")
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expect(torch.all(weights[:, future] == 0),
           "weights above the diagonal are not zero: position t can see the future (mask with -inf before the softmax)")
    expect(torch.all(weights >= 0), "some weights are negative: apply a softmax over the last dimension")
    row_sums = weights.sum(-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5):
        raise CheckFailed(f"rows do not sum to 1 (row sums {row_sums[0].tolist()}); softmax over dim=-1")
    reference = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    expect_close(weights, reference, "the weights")


@check("attention_head")
def check_attention_head(attention_head):
    """One causal self-attention head: x (B, T, C) -> (B, T, head_size)."""
    refuse_library_call(attention_head, F.scaled_dot_product_attention,
                        "build the scores, the mask and the softmax yourself")
    torch.manual_seed(0)
    B, T, C, hs = 2, 5, 8, 4
    x = torch.randn(B, T, C)
    key, query, value = (nn.Linear(C, hs, bias=False) for _ in range(3))
    with torch.no_grad():
        out = attention_head(x, key, query, value)
        expect_shape(out, (B, T, hs), "the head's output")
        q, k, v = query(x), key(x), value(x)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        unscaled = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        if torch.allclose(out, unscaled, atol=1e-5) and not torch.allclose(out, expected, atol=1e-5):
            raise CheckFailed("scores are not scaled: multiply q @ k^T by head_size ** -0.5")
        x_future = x.clone()
        x_future[:, -1] += 10.0  # changing the last token must not change earlier outputs
        out_future = attention_head(x_future, key, query, value)
        expect(torch.allclose(out[:, :-1], out_future[:, :-1], atol=1e-5),
               "earlier positions change when a later token changes: the head is not causal")
        expect_close(out, expected, "the head's output")


@check("next_token_probs")
def check_next_token_probs(next_token_probs):
    """logits (B, V), temperature, top_k -> probabilities (B, V) to sample the next token from."""
    refuse_library_call(next_token_probs, filter_logits, "scale by the temperature and keep the top k yourself")
    torch.manual_seed(0)
    logits = torch.randn(3, 10) * 2
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3), (1.0, 1)):
        probs = next_token_probs(logits.clone(), temperature, top_k)
        setting = f"(temperature={temperature}, top_k={top_k})"
        expect_shape(probs, (3, 10), f"probabilities {setting}")
        expect(torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5),
               f"rows do not sum to 1 {setting}: softmax after filtering")
        if top_k is not None:
            kept = (probs > 0).sum(-1)
            expect(torch.all(kept <= top_k),
                   f"{kept.max().item()} tokens have non-zero probability but top_k={top_k}")
        expected = F.softmax(filter_logits(logits / temperature, top_k=top_k), dim=-1)
        expect_close(probs, expected, f"probabilities {setting}")
