"""Evaluation: mean loss over fixed batches, under the training dtype (notebook 01).

Evaluating on the *same* batches every time makes losses comparable across steps, runs and
models; `fixed_batches` draws them from a generator of their own.
"""

from contextlib import contextmanager

import torch

from .data import get_batch


@contextmanager
def evaluating(model):
    """`model` in eval mode for the block (no dropout, eval capacity), then back in the mode it was
    in, even if the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def fixed_batches(tokens, n, batch_size, block_size, seed):
    """The same `n` batches every time: evaluations are comparable across steps and runs."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(tokens, batch_size, block_size, generator) for _ in range(n)]


@torch.no_grad()
def estimate_loss(model, batches, cfg) -> float:
    """Mean task loss of `model` over `batches`, in eval mode, on cfg.device under cfg's autocast
    (a TrainConfig: the precision training uses)."""
    losses = []
    with evaluating(model), cfg.autocast():
        for x, y in batches:
            losses.append(model(x.to(cfg.device), y.to(cfg.device)).loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def max_logit_difference(a, b, idx: torch.Tensor) -> float:
    """Largest |logit difference| of two models on the same tokens (eval mode)."""
    a.eval(), b.eval()
    return (a(idx).logits - b(idx).logits).abs().max().item()
