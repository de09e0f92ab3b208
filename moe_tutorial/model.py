"""A GPT language model, readable top to bottom (after nanoGPT's model.py); notebook 01 builds it.

Parameter names follow OpenAI's GPT-2 checkpoint (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj, ln_f), so pretrained weights map onto it name for name
(`moe_tutorial.pretrained`). The config's modern options (notebook 07: RMSNorm, RoPE,
grouped-query attention, QK-norm, SwiGLU) keep those names, so one model class covers GPT-2
and the Llama / Mixtral / Qwen3 / OLMoE / DeepSeek-V3 family (`moe_tutorial.hf_models`).
`generate()` decodes with a KV cache (`moe_tutorial.kv_cache`).
The feed-forward slot of each block is built by `feed_forward()`: later notebooks put a
Mixture-of-Experts layer there through the config alone (GPTConfig.moe), without touching
attention. `Kernels` chooses how attention and MoE dispatch are computed (notebooks 02, 04).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import ATTENTION_IMPLS, attention, cached_attention, repeat_kv
from .config import GPTConfig
from .dispatch import DISPATCH
from .experts import Experts, ffn_activation
from .kv_cache import KVCache
from .moe import FeedForwardOutput, MoE, dropless
from .norms import RMSNorm, make_norm
from .rope import RotaryEmbedding, apply_rope
from .router import Routing
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


class GenerationStep(NamedTuple):
    token: torch.Tensor  # (B, 1) the sampled token of each row
    routing: list[Routing] | None  # per MoE layer, the routing of the B tokens read to predict it


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None  # cross-entropy against the targets, if given
    aux_loss: torch.Tensor  # MoE layers' load-balancing + z-losses, weighted; 0 for a dense model
    routing: list[Routing] | None = None  # with return_routing=True: one record per MoE layer, in order


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with the modern options (notebook 07) grouped-query
    heads (n_kv_head), RMSNorm on queries and keys (qk_norm) and rotary positions."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0, impl: str = "sdpa"):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.impl = impl  # a Kernels.attention name
        self.q_width = q_width = self.n_head * self.head_dim
        self.kv_width = kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, q_width + 2 * kv_width, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.qk_norm = config.qk_norm
        if config.qk_norm != "none":
            # Qwen3 normalises each head's vector, OLMoE the whole projection before the split.
            q_dim, k_dim = (self.head_dim, self.head_dim) if config.qk_norm == "head" else (q_width, kv_width)
            self.q_norm, self.k_norm = RMSNorm(q_dim, config.norm_eps), RMSNorm(k_dim, config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.dropout

    def forward(self, x, cache: KVCache | None = None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([self.q_width, self.kv_width, self.kv_width], dim=2)  # (B, T, nh*hs), ...
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin) of these positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n_rep = self.n_head // self.n_kv_head
        if cache is None:
            dropout = self.attn_dropout if self.training else 0.0
            y = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), causal=True, impl=self.impl,
                          dropout_p=dropout)  # (B, nh, T, hs)
        else:  # decoding: attend over every cached position too; the cache holds the n_kv heads only
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
            y = cached_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), past)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.q_width)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The dense feed-forward network: expand (4x by default), GELU, project back; or SwiGLU,
    whose c_fc computes the gate and up projections at once ([gate | up], Llama's w1 and w3)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_width
        fc_width = 2 * hidden if config.activation == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_width, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.activation, self.gelu_approximate = config.activation, config.gelu_approximate

    def forward(self, x) -> FeedForwardOutput:  # (B, T, C) -> (B, T, C), as an MoE layer's output
        h = ffn_activation(self.c_fc(x), self.activation, self.gelu_approximate)  # (B, T, H)
        no_aux_loss = x.new_zeros((), dtype=torch.float32)
        return FeedForwardOutput(self.dropout(self.c_proj(h)), no_aux_loss, None)


def feed_forward(config: GPTConfig, layer_idx: int, kernels: Kernels) -> nn.Module:
    """The module in block `layer_idx`'s feed-forward slot: a dense MLP or a Mixture of Experts."""
    return MoE(config, kernels.dispatch) if config.is_moe_layer(layer_idx) else MLP(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

    Returns the new residual stream, the block's auxiliary loss (an MoE layer's balancing
    losses; zero for a dense MLP) and its routing (None for a dense MLP): they travel with the
    forward pass, also through activation checkpointing."""

    def __init__(self, config: GPTConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.ln_1 = make_norm(config)  # LayerNorm or RMSNorm; GPT-2's names either way
        self.attn = CausalSelfAttention(config, layer_idx, kernels.attention)
        self.ln_2 = make_norm(config)
        self.mlp = feed_forward(config, layer_idx, kernels)

    def forward(self, x, cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache, rope)
        y, aux_loss, routing = self.mlp(self.ln_2(x))
        return x + y, aux_loss, routing


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernels: Kernels | None = None):
        super().__init__()
        self.config = config
        kernels = kernels or Kernels()
        _check_kernels(config, kernels)
        self.kernels = kernels
        self.gradient_checkpointing = False  # recompute block activations in backward
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # GPT-2's position table
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i, kernels) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        # RoPE: fixed cos/sin tables, shared by every layer (notebook 07).
        self.rope = (RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
            if config.position == "rope" else None)
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
        from the load of every micro-batch since the last call, and the balancing losses' warm-up.
        The training loop calls this right after optimizer.step() (under torchrun, after summing
        the routers' load over ranks: distributed.sum_router_loads, so every rank moves the same bias)."""
        for layer in self.moe_layers():
            layer.router.update_selection_bias()  # nothing unless aux-loss-free balancing is on
            if layer.router.config.aux_loss_warmup_steps > 0:
                layer.router.warmup_step += 1  # the balancing losses' ramp (MoEConfig.aux_loss_warmup_steps)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache: KVCache | None = None, return_routing: bool = False) -> GPTOutput:
        """idx (B, T) token ids -> GPTOutput(logits (B, T, vocab), loss if targets are given, aux_loss,
        routing: with return_routing, one Routing per MoE layer).

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
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.rope is None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        rope = self.rope(start, T) if self.rope is not None else None  # cos, sin (T, hs)
        x = self.transformer.drop(x)
        aux_loss, routings = x.new_zeros((), dtype=torch.float32), []
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x, block_aux, routing = checkpoint(block, x, None, rope, use_reentrant=False)
            else:
                x, block_aux, routing = block(x, cache, rope)
            aux_loss = aux_loss + block_aux
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return GPTOutput(logits, loss, aux_loss, routings if return_routing else None)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True):
        """Append `max_new_tokens` sampled tokens to `idx` (B, T) and return (B, T + new).

        With `use_cache` the prompt is run once (prefill) and each new token costs one
        position's work. Once the sequence outgrows block_size the context window slides, every
        position embedding shifts, and cached keys are stale: from there on each step reruns the
        last block_size tokens, exactly as without a cache. MoE layers never drop tokens here.
        """
        steps = self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)
        return torch.cat([idx, *(step.token for step in steps)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
               use_cache=True, return_routing=False):
        """generate(), one token at a time: yields a GenerationStep per new token, as soon as it is
        sampled (for printing text as it is written). With `return_routing`, each step also carries
        every MoE layer's routing of the token that was read to predict it (the last input position
        of each row, B tokens per layer)."""
        self._check_prompt(idx, max_new_tokens)
        cache = None
        with dropless(self):
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= self.config.block_size:
                    if cache is None:  # prefill: the whole prompt at once
                        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
                        out = self(idx, cache=cache, return_routing=return_routing)
                    else:  # decode: only the newest token
                        out = self(idx[:, -1:], cache=cache, return_routing=return_routing)
                else:  # at most block_size tokens
                    out = self(idx[:, -self.config.block_size:], return_routing=return_routing)
                next_token = sample_next_token(out.logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat([idx, next_token], dim=1)
                routing = [r.last_positions(idx.size(0)) for r in out.routing] if return_routing else None
                yield GenerationStep(next_token, routing)

    def _check_prompt(self, idx, max_new_tokens):
        if any(layer.router.expert_choice for layer in self.moe_layers()):
            raise ValueError("this model routes by expert choice, which is not causal: each expert picks its tokens "
                             "from the whole batch, later tokens included, so it cannot generate one token at a "
                             "time; train a token-choice model (MoEConfig(routing='token_choice')) to sample")
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
