"""Rotary position embeddings, RoPE (Su et al. 2021; notebook 07).

Instead of adding a learned position vector to the input (GPT-2's wpe), RoPE rotates each query
and key: channel pair j of a head is turned by the angle pos * theta_j, with frequencies
theta_j = rope_theta^(-2j/D) from fast (j = 0, one turn per 2 pi positions) to slow. A dot product
of two vectors rotated by angles a and b depends on a - b only, so the attention score between
positions m and n sees their distance m - n, never m or n alone: relative positions fall out of
the dot product, and nothing about them is learned.

Pairing follows Hugging Face's Llama layout (`rotate_half`): channel j pairs with channel
j + D/2, not with j + 1 as in the paper, so checkpoints in that layout load as they are.
cos and sin depend on the position only, so they are computed once for every position up to
block_size (in fp32, cast to the activations' dtype when used) and sliced per forward pass.
"""

import torch
import torch.nn as nn


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(head_dim / 2,) rotation speed of each channel pair, in radians per position."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by position: cos and sin (T, D) hold each position's angles."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables for positions 0 .. max_positions - 1; no learned parameters."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_frequencies(head_dim, theta))
        angles = torch.cat((angles, angles), dim=-1)  # (T, D): pair j's angle at channels j and j + D/2
        # Not saved in checkpoints (persistent=False): they follow from the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int):
        """cos, sin (length, D) for positions start .. start + length - 1."""
        return self.cos[start:start + length], self.sin[start:start + length]
