"""Multi-head latent attention, MLA (DeepSeek-V2, 2024; DeepSeek-V3; notebook 07).

A decoder keeps every past token's keys and values: 2 * n_head * head_dim numbers per token and
layer for multi-head attention. Grouped-query attention shares them between heads; MLA instead
compresses them. Each token is projected down to one small latent c_kv (kv_lora_rank values),
and every head's key and value are linear up-projections of it (kv_b_proj). Only c_kv is cached.

RoPE does not fit that scheme: rotating a key by its position puts a position-dependent matrix
between the query and the key up-projection, so decoding could no longer absorb the up-projection
into the query (below) and would rebuild every cached token's keys at every step. MLA "decouples"
it: each head's query and key get a few extra channels (qk_rope_head_dim) that carry the rotation,
and the key's rotary part is ONE vector per token, shared by all heads (like multi-query attention).
The other channels ("nope", no position) come from the latent. So a token costs kv_lora_rank +
qk_rope_head_dim cached values: 512 + 64 = 576 in DeepSeek-V3, against 2 * 128 * 128 = 32768 for
MHA with its 128 heads of 128 channels.

Two forms compute the same function:
- `forward`, for training: up-project c_kv to per-head k_nope and v, then ordinary attention.
- `forward_absorbed`, for decoding: never build per-head keys or values. The score
  q_nope . (W_UK c) equals (W_UK^T q_nope) . c, so kv_b_proj's key half is absorbed into the
  query, which then lives in latent space; its value half is applied once, after the
  attention-weighted sum of latents. Per step this reads the 576-value cache instead of
  re-expanding it for every past token.

Parameter names follow transformers' DeepseekV3Attention (q_a_proj, q_a_layernorm, q_b_proj or
q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), so weights copy over by name.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import RMSNorm
from .rope import RotaryEmbedding, apply_rope

KV_KINDS = ("mha", "gqa", "mqa", "mla")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class MLAConfig:
    """The sizes of one MLA layer; the defaults are a tiny test model, the comments DeepSeek-V3's."""

    n_embd: int = 64  # V3: 7168
    n_head: int = 4  # V3: 128
    q_lora_rank: int | None = 32  # V3: 1536; None or 0: one full-rank query projection (V2-Lite)
    kv_lora_rank: int = 16  # V3: 512, the cached latent
    qk_nope_head_dim: int = 8  # V3: 128, query/key channels without position, from the latent
    qk_rope_head_dim: int = 4  # V3: 64, rotated channels; the key's part is shared by all heads
    v_head_dim: int = 8  # V3: 128
    rope_theta: float = 10000.0  # V3 also stretches it with YaRN (not implemented here)
    block_size: int = 256  # positions the RoPE tables cover; V3: 4096 before YaRN

    def __post_init__(self):
        for name in ("n_embd", "n_head", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "block_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"MLAConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and not (_is_positive_int(self.q_lora_rank) or self.q_lora_rank == 0):
            raise ValueError(f"MLAConfig.q_lora_rank must be a positive integer, or None / 0 for no query "
                             f"compression, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE turns pairs "
                             f"of channels; use {self.qk_rope_head_dim + 1}")
        if not self.rope_theta > 0:
            raise ValueError(f"MLAConfig.rope_theta must be > 0 (10000.0 is usual), got {self.rope_theta}")


# DeepSeek-V3's attention sizes (its config.json), for tables and cache arithmetic; far too big to build on a CPU.
DEEPSEEK_V3 = MLAConfig(n_embd=7168, n_head=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, block_size=4096)


def kv_cache_values_per_token(kind: str, n_head: int | None = None, head_dim: int | None = None,
                              n_kv_head: int | None = None, kv_lora_rank: int | None = None,
                              qk_rope_head_dim: int | None = None) -> int:
    """Numbers a decoder caches per token and layer: MHA, GQA, MQA keep a key and a value per
    (kv) head; MLA keeps its latent and the one shared rotary key."""
    needs = {"mha": ("n_head", "head_dim"), "gqa": ("n_head", "head_dim", "n_kv_head"), "mqa": ("head_dim",),
             "mla": ("kv_lora_rank", "qk_rope_head_dim")}
    if kind not in needs:
        raise ValueError(f"kind must be one of {KV_KINDS}, got {kind!r}")
    given = dict(n_head=n_head, head_dim=head_dim, n_kv_head=n_kv_head, kv_lora_rank=kv_lora_rank,
                 qk_rope_head_dim=qk_rope_head_dim)
    for name in needs[kind]:
        if not _is_positive_int(given[name]):
            raise ValueError(f"kind={kind!r} needs {name} as a positive integer, got {given[name]!r}")
    if kind == "gqa" and n_head % n_kv_head:
        raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}: each kv head serves a whole group")
    if kind == "mha":
        return 2 * n_head * head_dim
    if kind == "gqa":
        return 2 * n_kv_head * head_dim
    if kind == "mqa":
        return 2 * head_dim
    return kv_lora_rank + qk_rope_head_dim


def apply_interleaved_rope(x, cos, sin):
    """RoPE in DeepSeek's layout, where channels (0, 1), (2, 3), ... are the rotated pairs.

    rope.py pairs channel j with j + D/2 (Llama's layout). Gathering the even channels, then the
    odd ones, turns DeepSeek's pairs into exactly those, so rope.apply_rope does the rotation. The
    result stays in the gathered order; queries and keys are reordered alike, so their dot
    products do not change (transformers' apply_rotary_pos_emb_interleave returns the same order).
    """
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    return apply_rope(x, cos, sin)


class LatentCache:
    """What MLA keeps per token of one layer: the normalised latent and the rotated shared key."""

    def __init__(self):
        self.c_kv = None  # (B, S, kv_lora_rank)
        self.k_rope = None  # (B, S, qk_rope_head_dim)

    @property
    def length(self) -> int:
        """Positions stored so far: the next token's position."""
        return 0 if self.c_kv is None else self.c_kv.size(1)

    def append(self, c_kv, k_rope):
        """Add the new positions (B, T, ...); return everything stored, (B, S, ...) with S = length."""
        if self.c_kv is None:
            self.c_kv, self.k_rope = c_kv, k_rope
        else:  # torch.cat copies the cache each step: simple, and fine at a tutorial's lengths
            self.c_kv, self.k_rope = torch.cat((self.c_kv, c_kv), dim=1), torch.cat((self.k_rope, k_rope), dim=1)
        return self.c_kv, self.k_rope


class MultiHeadLatentAttention(nn.Module):
    """Causal self-attention whose keys and values are up-projections of a small cached latent."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        c = self.config = config
        qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:  # queries go through a bottleneck too: fewer activations in training, not a cache saving
            self.q_a_proj = nn.Linear(c.n_embd, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.n_head * qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.n_embd, c.n_head * qk_head_dim, bias=False)
        # "with_mqa": besides the latent, the shared rotary key, one head for all (multi-query style).
        self.kv_a_proj_with_mqa = nn.Linear(c.n_embd, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.n_head * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.n_head * c.v_head_dim, c.n_embd, bias=False)
        self.rope = RotaryEmbedding(c.qk_rope_head_dim, c.block_size, c.rope_theta)
        self.scale = qk_head_dim ** -0.5  # a head's query is nope and rope channels together

    def queries(self, x, start: int):
        """q_nope (B, H, T, qk_nope_head_dim) and rotated q_rope (B, H, T, qk_rope_head_dim)."""
        c = self.config
        B, T, _ = x.shape
        if start + T > c.block_size:
            raise ValueError(f"positions up to {start + T} exceed block_size={c.block_size}, the RoPE tables' "
                             f"length: raise MLAConfig.block_size or start a new cache")
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, c.n_head, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_interleaved_rope(q_rope, *self.rope(start, T))

    def latents(self, x, start: int):
        """What gets cached: normalised c_kv (B, T, kv_lora_rank) and rotated k_rope (B, T, qk_rope_head_dim)."""
        c = self.config
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_interleaved_rope(k_rope, *self.rope(start, x.size(1)))

    def forward(self, x):
        """Training form: (B, T, n_embd) -> (B, T, n_embd), with per-head keys and values built."""
        c = self.config
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, 0)
        c_kv, k_rope = self.latents(x, 0)
        kv = self.kv_b_proj(c_kv).view(B, T, c.n_head, -1).transpose(1, 2)  # (B, H, T, nope + v)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_rope = k_rope[:, None].expand(B, c.n_head, T, c.qk_rope_head_dim)  # the same rotary key in every head
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, nope + rope)
        k = torch.cat((k_nope, k_rope), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, H, T, v_head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.v_head_dim))

    def forward_absorbed(self, x, cache: LatentCache):
        """Inference form: the new tokens x (B, T, n_embd) after cache.length cached ones; appends
        their latents to the cache and returns (B, T, n_embd). No per-head key or value is built."""
        c = self.config
        B, T, _ = x.shape
        start = cache.length
        q_nope, q_rope = self.queries(x, start)
        c_kv, k_rope = cache.append(*self.latents(x, start))  # (B, S, r), (B, S, rope), S = start + T
        w_uk, w_uv = self.kv_b_proj.weight.view(c.n_head, -1, c.kv_lora_rank).split(
            [c.qk_nope_head_dim, c.v_head_dim], dim=1)  # (H, nope, r), (H, v, r)
        q_latent = q_nope @ w_uk  # (B, H, T, r): q_nope . (W_UK c) = (q_nope W_UK) . c
        scores = (q_latent @ c_kv[:, None].transpose(-2, -1)  # (B, H, T, S)
                  + q_rope @ k_rope[:, None].transpose(-2, -1)) * self.scale
        # Query i sits at position start + i and sees keys 0 .. start + i (bottom-right aligned mask).
        q_pos = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
        future = torch.arange(start + T, device=x.device)[None, :] > q_pos  # (T, S)
        probs = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        y = (probs @ c_kv[:, None]) @ w_uv.transpose(-2, -1)  # (B, H, T, r) -> (B, H, T, v_head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.v_head_dim))
