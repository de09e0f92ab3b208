"""A GPT language model, readable top to bottom (after nanoGPT's model.py).

Parameter names follow OpenAI's GPT-2 checkpoint (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj, ln_f), so pretrained weights map onto it name for name
(`moe_tutorial.pretrained`). `generate()` decodes with a KV cache (`moe_tutorial.kv_cache`).
The feed-forward slot of each block is built by `feed_forward()`: later notebooks put a
Mixture-of-Experts layer there through the config alone, without touching attention.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import ATTENTION_IMPLS, attention, cached_attention
from .experts import Experts, residual_std
from .kv_cache import KVCache
from .moe import MoE, dropless
from .sampling import sample_next_token


@dataclass
class GPTConfig:
    block_size: int = 256  # longest context the position embedding covers
    vocab_size: int = 65  # tiny Shakespeare has 65 distinct characters
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # 0 for small, short runs: they underfit rather than overfit
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 checkpoints have them
    attn_impl: str = "sdpa"  # "sdpa" | "flash" | "naive": see moe_tutorial.attention
    gelu_approximate: str = "none"  # "tanh": GPT-2's GELU, needed to reproduce its weights' outputs
    mlp_hidden: int | None = None  # dense MLP width; None: 4 * n_embd (GPT-2's n_inner)
    tie_embeddings: bool = True  # output layer shares the token embedding (GPT-2 does)
    # Mixture of Experts (notebook 03 on). n_experts=None keeps a dense MLP in every block.
    n_experts: int | None = None
    top_k: int = 1  # experts per token: 1 = Switch, 2 = GShard / Mixtral
    moe_every: int = 1  # every moe_every-th block is MoE (2: blocks 1, 3, 5, ...)
    expert_hidden: int | None = None  # None: 4 * n_embd, the dense MLP's width
    capacity_factor_train: float = 1.25  # Switch Transformer's defaults
    capacity_factor_eval: float = 2.0
    aux_loss_coef: float = 1e-2  # load-balancing loss weight (alpha)
    z_loss_coef: float = 1e-3  # router z-loss weight
    router_jitter: float = 0.0  # multiplicative noise on the router input, training only
    router_type: str = "token_choice"  # or "expert_choice" (sees the whole batch: not causal)
    noisy_gating: bool = False  # Shazeer 2017: learned softplus noise on the logits, training only
    second_expert_policy: str = "all"  # "random": GShard's stochastic second expert (top_k >= 2)
    n_shared_experts: int = 0  # DeepSeek: experts every token uses, beside the routed ones
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (gamma); 0 turns it off
    dispatch: str = "sort"  # "sort" | "einsum" | "loop": moe_tutorial.dispatch, same outputs
    straight_through_gate: bool = False  # top-1: gate value 1, gradient of p (upcycled models)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd // n_head channels); pick e.g. "
                f"n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        self._validate_moe()
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            raise ValueError(f"GPTConfig.mlp_hidden must be a positive integer or None (4 * n_embd), "
                             f"got {self.mlp_hidden!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"GPTConfig.attn_impl must be one of {ATTENTION_IMPLS}, got {self.attn_impl!r}"
            )

    def _validate_moe(self):
        if self.n_experts is None:
            return
        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ValueError(f"GPTConfig.n_experts must be an integer >= 1 (or None for dense), "
                             f"got {self.n_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"GPTConfig.top_k={self.top_k!r} must be between 1 and "
                             f"n_experts={self.n_experts}: a token cannot pick more experts than exist")
        if not isinstance(self.moe_every, int) or self.moe_every < 1:
            raise ValueError(f"GPTConfig.moe_every must be a positive integer (1: every block is MoE, "
                             f"2: every other), got {self.moe_every!r}")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTConfig.{name} must be > 0 (1.0 = exactly the average load), "
                                 f"got {getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "router_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"GPTConfig.{name} must be >= 0, got {getattr(self, name)}")
        choices = {"router_type": ("token_choice", "expert_choice"), "second_expert_policy": ("all", "random"),
                   "dispatch": ("sort", "einsum", "loop")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"GPTConfig.n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        if self.bias_update_rate < 0:
            raise ValueError(f"GPTConfig.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.straight_through_gate and (self.top_k != 1 or self.router_type != "token_choice"):
            raise ValueError("GPTConfig.straight_through_gate applies to top-1 token choice only (top-k gates "
                             f"are renormalised already); got top_k={self.top_k}, router_type={self.router_type!r}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"GPTConfig.expert_hidden must be positive, got {self.expert_hidden}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_experts is not None and (layer_idx + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        self.n_head = config.n_head
        self.impl = config.attn_impl
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


def feed_forward(config: GPTConfig, layer_idx: int) -> nn.Module:
    """The module in block `layer_idx`'s feed-forward slot: a dense MLP or a Mixture of Experts."""
    return MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = feed_forward(config, layer_idx)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute block activations in backward
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
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

    def moe_loss(self) -> torch.Tensor:
        """Load-balancing + z-losses of every MoE layer in the last forward pass (0 if dense)."""
        losses = [m.last_routing.aux_loss + m.last_routing.z_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    @torch.no_grad()
    def after_optimizer_step(self):
        """Per-step updates that are not gradient steps: aux-loss-free balancing's expert biases,
        from the load of every micro-batch since the last call. The training loop calls this
        right after optimizer.step()."""
        for layer in self.moe_layers():
            layer.router.update_selection_bias()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default, as in GPT-2's papers."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab) and the loss if targets are given.

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
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

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
                        logits, _ = self(idx, cache=cache)
                    else:  # decode: only the newest token
                        logits, _ = self(idx[:, -1:], cache=cache)
                else:
                    logits, _ = self(idx[:, -self.config.block_size:])  # at most block_size tokens
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
