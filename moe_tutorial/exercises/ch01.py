"""Checks for notebook 01 (the character-level GPT)."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention, naive_attention
from ..sampling import filter_logits
from . import CheckFailed, check, expect, expect_close, expect_shape, refuse_library_call

_SOFTMAXES = (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax, torch.logsumexp)


def _softmax_called(code, namespace, seen):
    """The first name in `code` (its lambdas and inner functions, and the learner's own helper functions it
    calls, too) that is a library softmax: F.softmax, torch.softmax, x.softmax(...), nn.Softmax, log_softmax, or a
    logsumexp (exp(s - logsumexp(s)) is the softmax by another name)."""
    for name in code.co_names:
        bound = namespace.get(name)
        if isinstance(bound, types.FunctionType) and not (bound.__module__ or "").startswith("torch"):
            if bound.__code__ not in seen:  # a helper of the learner's own: look inside it
                seen.add(bound.__code__)
                found = _softmax_called(bound.__code__, bound.__globals__, seen)
                if found:
                    return found
        elif "softmax" in name.lower() or "logsumexp" in name.lower() or any(bound is f for f in _SOFTMAXES):
            return name
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found = _softmax_called(const, namespace, seen)
            if found:
                return found
    return None


@check("causal_attention_weights")
def check_causal_attention_weights(causal_attention_weights):
    """scores (B, T, T) -> weights (B, T, T): the causal masked softmax, written out and numerically stable."""
    why = "exponentiate and normalise each row yourself"
    refuse_library_call(causal_attention_weights, F.softmax, why)
    refuse_library_call(causal_attention_weights, torch.softmax, why)
    refuse_library_call(causal_attention_weights, torch.logsumexp, "exp(s - logsumexp(s)) is a library softmax by "
                        "another name; " + why)
    name = _softmax_called(causal_attention_weights.__code__, causal_attention_weights.__globals__, set())
    expect(name is None, f"write it without calling a softmax or a logsumexp (the answer uses `{name}`): {why}")
    torch.manual_seed(0)
    scores = torch.randn(2, 6, 6) * 3
    weights = causal_attention_weights(scores.clone())
    expect_shape(weights, (2, 6, 6), "the weights")
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expect(torch.all(weights[:, future] == 0),
           "weights above the diagonal are not zero: position t can see the future (mask with -inf before exp)")
    expect(torch.all(weights >= 0), "some weights are negative: exponentiate the scores, then normalise")
    row_sums = weights.sum(-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5):
        raise CheckFailed(f"rows do not sum to 1 (row sums {row_sums[0].tolist()}); divide each row by its sum "
                          f"over the last dimension")
    reference = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    expect_close(weights, reference, "the weights")
    # The same scores, each query's row shifted by its own constant: the softmax does not change, but exp(±1000)
    # overflows to inf (or underflows to 0) in float32, and a maximum over the whole tensor fits no row.
    shift = torch.tensor([1000.0, -1000.0, 500.0, -500.0, 100.0, 0.0])[:, None]  # one per query row
    large = scores + shift
    weights = causal_attention_weights(large.clone())
    expect_shape(weights, (2, 6, 6), "the weights")
    expect(bool(torch.isfinite(weights).all()),
           "NaN or inf for scores near ±1000: exp overflows (or every exp underflows to 0). Subtract each row's "
           "maximum before exponentiating; a softmax does not change when a row is shifted by a constant")
    expect_close(weights, F.softmax(large.masked_fill(future, float("-inf")), dim=-1),
                 "the weights for scores near ±1000")


@check("attention_head")
def check_attention_head(attention_head):
    """One causal self-attention head: x (B, T, C) -> (B, T, head_size)."""
    why = "build the scores, the mask and the softmax yourself"
    for library_fn in (F.scaled_dot_product_attention, naive_attention, attention):  # the package's attention too
        refuse_library_call(attention_head, library_fn, why)
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
