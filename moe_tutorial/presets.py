"""Named model + training recipes, so notebooks, tests and the CLI agree on what "char" means
(notebook 01), the MoE variants compared in notebook 04, and OpenAI's GPT-2 shapes with the
Mixture-of-Experts models built on them (notebook 05)."""

from dataclasses import replace

from .config import GPTConfig, MoEConfig
from .sweep import AUX_FREE, moe_config
from .train import TrainConfig

MODERN_STEPS = 1150  # chosen to fit nanoGPT's CPU recipe's wall time: benchmarks/char_gpt.py times both

# The modern block of notebook 07 (Llama / Qwen3 style): RMSNorm, rotary positions, SwiGLU, QK-norm.
MODERN_BLOCK = dict(norm="rmsnorm", position="rope", activation="swiglu", qk_norm="head")

PRESETS = {
    # The course's default character-level recipe: nanoGPT's CPU model and batch shape with a
    # 3x higher learning rate (a short run can afford it) and 10% fewer steps, so it finishes
    # within the reference's wall time. benchmarks/char_gpt.py measures both in one run.
    "char": (
        dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
        dict(batch_size=12, max_iters=1800, learning_rate=3e-3, min_lr=3e-4, warmup_iters=100,
             eval_interval=250, eval_iters=20),
    ),
    # nanoGPT's README recipe for a CPU (train_shakespeare_char with the CPU overrides):
    # 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iters, lr 1e-3, no dropout.
    "nanogpt-cpu": (
        dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
        dict(batch_size=12, max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
             eval_interval=250, eval_iters=20),
    ),
    # Notebook 07's recipe: the same size and batch in the modern block, trained with Muon for the
    # blocks' matrices; its step count fits nanoGPT's CPU recipe's wall time (benchmarks/char_gpt.py).
    # With an MoE --variant each expert's matrices get Muon too: with AdamW experts the MoE is no better
    # than this dense model, with Muon experts better (benchmarks/modern_moe.py, notebook 07).
    "char-modern": (
        dict(block_size=64, n_layer=4, n_head=4, n_embd=128, **MODERN_BLOCK),
        dict(batch_size=12, max_iters=MODERN_STEPS, learning_rate=3e-3, min_lr=3e-4, warmup_iters=100,
             eval_interval=250, eval_iters=20, optimizer="muon", muon_experts=True),
    ),
    # Seconds, not minutes: for tests and for trying things out.
    "char-tiny": (
        dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
        dict(batch_size=8, max_iters=50, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5,
             eval_interval=25, eval_iters=4),
    ),
    # GPT-2 124M and its MoE (notebook 05) with nanoGPT's train_gpt2 recipe: ~0.5M tokens per step
    # (12 x 1024 x 40 micro-batches), lr 6e-4 with 2000 warmup steps, beta2 0.95, bf16. A GPU's job.
    "gpt2": ({}, GPT2_RECIPE := dict(
        batch_size=12, grad_accum_steps=40, max_iters=600_000, learning_rate=6e-4, min_lr=6e-5,
        warmup_iters=2000, beta2=0.95, eval_interval=1000, eval_iters=200, dtype="bfloat16")),
    "gpt2-moe-16x": ({}, GPT2_RECIPE),
    # GPT-2's shape and BPE vocabulary at a size 2 CPU cores train in minutes: 4 layers of 128 (the
    # 50257 x 128 embedding, tied with the output layer, is most of its parameters), block 128.
    "gpt2-mini": (
        GPT2_MINI := dict(block_size=128, n_layer=4, n_head=4, n_embd=128, bias=True, gelu_approximate="tanh"),
        GPT2_MINI_RECIPE := dict(batch_size=8, max_iters=600, learning_rate=3e-3, min_lr=3e-4, warmup_iters=50,
                                 eval_interval=200, eval_iters=10),
    ),
    # The same with Switch top-1 MoE layers (8 experts of the dense MLP's width) in every block.
    "gpt2-mini-moe": (dict(**GPT2_MINI, moe=MoEConfig(n_experts=8, top_k=1)), GPT2_MINI_RECIPE),
}
# Presets trained on GPT-2's BPE tokens (tiktoken's r50k_base); the others on characters.
BPE_PRESETS = ("gpt2", "gpt2-moe-16x", "gpt2-mini", "gpt2-mini-moe")


# The MoE variants of the "char" model (the CLI's --variant, notebook 03, notebook 06, benchmarks/
# expert_parallel_stats.py): variants of benchmarks/moe_scaling.py's experts sweep (moe_tutorial.sweep),
# each under a name that says what it is. MoE in every block, compute per token held at the dense
# model's: a token's routed and shared experts add up to the dense MLP's 4C hidden units (C = 128).
# Which variants won is in the sweep's results, benchmarks/results/moe_scaling.json (its table is
# printed by `python benchmarks/moe_scaling.py --report`, and shown in notebook 04).
SWEEP_VARIANT_OF = {
    "dense": "dense",
    # Switch Transformer's routing: one of 8 full-width experts, the sweep's top-1 pick.
    "Switch top-1": "top-1 E=8",
    # 32 experts of width C, 3 routed + 1 shared (DeepSeekMoE's fine-grained experts), balanced by
    # DeepSeek-V3's selection bias instead of a balancing loss: the sweep's best variant.
    "fine-grained + shared": "E=32 k=3 (C) + shared" + AUX_FREE,
    "top-2": "E=16 k=2 (2C)",  # 16 experts of width 2C
    "aux-loss-free top-1": "top-1 E=8" + AUX_FREE,
}
MOE_VARIANTS = {name: moe_config(sweep_name) for name, sweep_name in SWEEP_VARIANT_OF.items()}


def preset(name: str, vocab_size: int, variant: str | None = None, **train_overrides):
    """(GPTConfig, TrainConfig) for a named preset, its MoE layers from MOE_VARIANTS[variant] if
    given ("dense": none); keyword arguments override the training recipe."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if variant is not None and variant not in MOE_VARIANTS:
        raise ValueError(f"Unknown MoE variant {variant!r}; choose one of {sorted(MOE_VARIANTS)}")
    model_kwargs, train_kwargs = PRESETS[name]
    is_gpt2 = name in GPT2_SHAPES or name in GPT2_MOE_SHAPES  # the GPT-2 sizes, defined below
    base = gpt2_config(name) if is_gpt2 else GPTConfig(vocab_size=vocab_size, **model_kwargs)
    moe = MOE_VARIANTS[variant] if variant is not None else base.moe  # a variant replaces the preset's layers
    if variant is not None and moe is not None and moe.expert_hidden and base.activation == "swiglu":
        moe = replace(moe, expert_hidden=swiglu_width(moe.expert_hidden, base))
    config = replace(base, vocab_size=vocab_size, moe=replace(moe) if moe else None)  # a copy of our own
    return config, TrainConfig(**{**train_kwargs, **train_overrides})


def swiglu_width(gelu_width: int, config: GPTConfig) -> int:
    """A variant's expert width (given for GELU's two matrices) in a SwiGLU block, whose three matrices
    hold the same parameters at 2/3 of the width: scaled as the dense MLP's 4C is to SwiGLU's
    (GPTConfig.default_hidden), so a token's active experts still add up to the dense MLP (32 experts
    of C = 128 become 32 of 84, and 4 x 84 = 336)."""
    return round(gelu_width * config.default_hidden / (4 * config.n_embd))


# OpenAI's GPT-2 family (Radford et al. 2019): BPE vocabulary of 50257, context 1024, biases,
# LayerNorm, tanh-approximated GELU, tied embeddings. Parameter counts 124M / 355M / 774M / 1.5B.
GPT2_BASE = dict(vocab_size=50257, block_size=1024, bias=True, gelu_approximate="tanh")
GPT2_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
# MoE models on those shapes: every other block's MLP becomes E experts of the same width.
# Total parameters ~0.55B / ~1.1B / ~2.4B while each token uses ~0.12B / ~0.46B / ~1.0B
# (moe_tutorial.costs.model_info prints the exact figures).
GPT2_MOE_SHAPES = {
    "gpt2-moe-16x": ("gpt2", dict(n_experts=16, top_k=1, every=2)),
    "gpt2-medium-moe-8x-top2": ("gpt2-medium", dict(n_experts=8, top_k=2, every=2)),
    "gpt2-large-moe-8x-top2": ("gpt2-large", dict(n_experts=8, top_k=2, every=2)),
}


def gpt2_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a GPT-2 size ("gpt2", "gpt2-medium", ...) or of a GPT-2 MoE preset."""
    if name in GPT2_SHAPES:
        return GPTConfig(**{**GPT2_BASE, **GPT2_SHAPES[name], **overrides})
    if name in GPT2_MOE_SHAPES:
        base, moe = GPT2_MOE_SHAPES[name]
        return GPTConfig(**{**GPT2_BASE, **GPT2_SHAPES[base], "moe": MoEConfig(**moe), **overrides})
    raise ValueError(f"Unknown GPT-2 preset {name!r}; choose one of {sorted(GPT2_SHAPES) + sorted(GPT2_MOE_SHAPES)}")
