"""Turning next-token logits into a sampled token: temperature, top-k and top-p (nucleus)
(notebook 01)."""

import torch
import torch.nn.functional as F


def check_sampling_args(temperature, top_k, top_p):
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; use a small value such as 1e-3 "
            f"for (almost) greedy decoding"
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. (B, V) -> (B, V)"""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the most likely token always has 0 before it
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample one token per row from logits (B, V); returns (B, 1) token ids."""
    check_sampling_args(temperature, top_k, top_p)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
