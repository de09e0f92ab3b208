"""Evaluation: mean loss over fixed batches, under the training dtype (notebook 01).

Evaluating on the *same* batches every time makes losses comparable across steps, runs and
models; `fixed_batches` draws them from a generator of their own.
"""

import torch

from .data import get_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(device: str, dtype: str):
    """torch.autocast for a device and a DTYPES name ("float32": a context that does nothing)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def fixed_batches(tokens, n, batch_size, block_size, seed):
    """The same `n` batches every time: evaluations are comparable across steps and runs."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(tokens, batch_size, block_size, generator) for _ in range(n)]


@torch.no_grad()
def estimate_loss(model, batches, cfg) -> float:
    """Mean task loss of `model` over `batches`, in eval mode, on cfg.device under cfg.dtype."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(cfg.device, cfg.dtype):
            losses.append(model(x.to(cfg.device), y.to(cfg.device)).loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def max_logit_difference(a, b, idx: torch.Tensor) -> float:
    """Largest |logit difference| of two models on the same tokens (eval mode)."""
    a.eval(), b.eval()
    return (a(idx).logits - b(idx).logits).abs().max().item()
