"""Normalisation layers: GPT-2's LayerNorm or the RMSNorm of Llama, Mixtral, Qwen3, OLMoE and
DeepSeek-V3 (notebook 07).

RMSNorm drops LayerNorm's mean subtraction and bias: x / sqrt(mean(x^2) + eps) * weight. It is
cheaper (one reduction instead of two) and works as well in practice (Zhang & Sennrich 2019).
The statistics are computed in fp32 and the result cast back to the input's dtype *before* the
weight multiplies it, exactly as Hugging Face's LlamaRMSNorm does, so bf16 models reproduce
their checkpoints' outputs.
"""

import torch
import torch.nn as nn

from .config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., dim) -> (..., dim)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's normalisation over `dim` channels (n_embd by default)."""
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
