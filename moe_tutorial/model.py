"""A GPT language model, readable top to bottom (after nanoGPT's model.py); notebook 01 builds it.

Parameter names follow OpenAI's GPT-2 checkpoint (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj, ln_f), so pretrained weights map onto it name for name
(`moe_tutorial.pretrained`). `generate()` decodes with a KV cache (`moe_tutorial.kv_cache`).
The feed-forward slot of each block is built by `feed_forward()`: later notebooks put a
Mixture-of-Experts layer there through the config alone (GPTConfig.moe), without touching
attention. `Kernels` chooses how attention and MoE dispatch are computed (notebooks 02, 04).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import ATTENTION_IMPLS, attention, cached_attention
from .config import GPTConfig
from .dispatch import DISPATCH
from .experts import Experts
from .kv_cache import KVCache
from .moe import MoE, dropless
from .sampling import sample_next_token


@dataclass
class Kernels:
    """How the model computes, not what: swapping kernels changes speed and memory, never the
    outputs (tests check each against the others), so they are not part of GPTConfig."""

    attention: str = "sdpa"  # "sdpa" | "flash" | "naive": moe_tutorial.attention (notebook 02)
    dispatch: str = "sort"  # "sort" | "einsum" | "loop": moe_tutorial.dispatch (notebook 04)

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"Kernels.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"Kernels.dispatch must be one of {tuple(DISPATCH)}, got {self.dispatch!r}")


def residual_std(n_layer):
    """GPT-2's init for projections into the residual stream: each residual branch adds variance,
    so they are shrunk by 1/sqrt(number of residual additions)."""
    return 0.02 / math.sqrt(2 * n_layer)


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None  # cross-entropy against the targets, if given
    aux_loss: torch.Tensor  # MoE layers' load-balancing + z-losses, weighted; 0 for a dense model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0, impl: str = "sdpa"):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        self.n_head = config.n_head
        self.impl = impl  # a Kernels.attention name
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout

    def forward(self, x, cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = attention(q, k, v, causal=True, impl=self.impl, dropout_p=dropout)  # (B, nh, T, hs)
        else:  # decoding: attend over every cached position too
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
            y = cached_attention(q, k, v, past)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The dense feed-forward network: expand (4x by default), GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximate)))


def feed_forward(config: GPTConfig, layer_idx: int, kernels: Kernels) -> nn.Module:
    """The module in block `layer_idx`'s feed-forward slot: a dense MLP or a Mixture of Experts."""
    return MoE(config, kernels.dispatch) if config.is_moe_layer(layer_idx) else MLP(config)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x)).

    Returns the new residual stream and the block's auxiliary loss (an MoE layer's balancing
    losses; zero for a dense MLP), so the loss travels with the forward pass, also through
    activation checkpointing."""

    def __init__(self, config: GPTConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx, kernels.attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = feed_forward(config, layer_idx, kernels)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        if isinstance(self.mlp, MoE):
            y, aux_loss = self.mlp(self.ln_2(x))
        else:
            y, aux_loss = self.mlp(self.ln_2(x)), x.new_zeros((), dtype=torch.float32)
        return x + y, aux_loss


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernels: Kernels | None = None):
        super().__init__()
        self.config = config
        kernels = kernels or Kernels()
        _check_kernels(config, kernels)
        self.kernels = kernels
        self.gradient_checkpointing = False  # recompute block activations in backward
        self.data_parallel = False  # set by distributed.ddp(): ranks share per-step statistics
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i, kernels) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the input embedding and the output projection share one matrix.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                # GPT-2: each residual branch adds variance, so shrink the projections
                # into the stream by 1/sqrt(number of residual additions).
                std = residual_std(self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, Experts):
            module.reset_parameters(std=0.02, proj_std=residual_std(self.config.n_layer))

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def use_kernels(self, kernels: Kernels) -> "GPT":
        """Compute with other kernels from now on (same weights, same outputs)."""
        _check_kernels(self.config, kernels)
        self.kernels = kernels
        for block in self.transformer.h:
            block.attn.impl = kernels.attention
            if isinstance(block.mlp, MoE):
                block.mlp.dispatch = DISPATCH[kernels.dispatch]
        return self

    @torch.no_grad()
    def after_optimizer_step(self):
        """Per-step updates that are not gradient steps: aux-loss-free balancing's expert biases,
        from the load of every micro-batch since the last call. The training loop calls this
        right after optimizer.step(). In data-parallel training each rank routed its own tokens:
        the counts are summed over ranks (one all-reduce) so that every rank moves the same bias."""
        routers = [layer.router for layer in self.moe_layers() if layer.router.config.bias_update_rate > 0]
        if routers and self.data_parallel:
            loads = torch.stack([r.load_since_update for r in routers])  # (layers, E)
            dist.all_reduce(loads)
            for router, load in zip(routers, loads):
                router.load_since_update.copy_(load)
        for router in routers:
            router.update_selection_bias()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as in GPT-2's papers."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache | None = None) -> GPTOutput:
        """idx (B, T) token ids -> GPTOutput(logits (B, T, vocab), loss if targets are given, aux_loss).

        `loss` is the task loss alone (what evaluation reports); training minimises
        loss + aux_loss, as transformers' MoE models return `aux_loss` beside `loss`.
        With a KVCache the tokens continue the cached ones: positions start at cache.length.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"Sequence of length {start + T} is longer than block_size={self.config.block_size}; "
                f"crop the context to the last {self.config.block_size} tokens."
            )
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x, block_aux = checkpoint(block, x, use_reentrant=False)
            else:
                x, block_aux = block(x, cache)
            aux_loss = aux_loss + block_aux
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return GPTOutput(logits, loss, aux_loss)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True):
        """Append `max_new_tokens` sampled tokens to `idx` (B, T) and return (B, T + new).

        With `use_cache` the prompt is run once (prefill) and each new token costs one
        position's work. Once the sequence outgrows block_size the context window slides, every
        position embedding shifts, and cached keys are stale: from there on each step reruns the
        last block_size tokens, exactly as without a cache. MoE layers never drop tokens here.
        """
        self._check_prompt(idx, max_new_tokens)
        cache = None
        with dropless(self):
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= self.config.block_size:
                    if cache is None:  # prefill: the whole prompt at once
                        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
                        logits = self(idx, cache=cache).logits
                    else:  # decode: only the newest token
                        logits = self(idx[:, -1:], cache=cache).logits
                else:
                    logits = self(idx[:, -self.config.block_size:]).logits  # at most block_size tokens
                next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat([idx, next_token], dim=1)
        return idx

    def _check_prompt(self, idx, max_new_tokens):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"generate() wants token ids of shape (batch, time), got {shape}; "
                             f"for one prompt use ids[None] or torch.tensor([ids])")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"generate() wants integer token ids, got dtype {idx.dtype}")
        if idx.size(1) == 0:
            raise ValueError("generate() needs a prompt of at least one token, e.g. the encoding of a newline")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"Token ids must be in [0, {self.config.vocab_size}), got ids from {idx.min().item()} "
                             f"to {idx.max().item()}: was the prompt encoded with this model's tokenizer?")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def _check_kernels(config: GPTConfig, kernels: Kernels):
    if kernels.attention == "flash" and config.dropout > 0:
        raise ValueError(f"Kernels(attention='flash') does not implement attention dropout, and this config has "
                         f"dropout={config.dropout}: use attention='sdpa' or dropout=0.0")
