"""Named model + training recipes, so notebooks, tests and the CLI agree on what "char" means."""

from .model import GPTConfig
from .train import TrainConfig

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
    # Seconds, not minutes: for tests and for trying things out.
    "char-tiny": (
        dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
        dict(batch_size=8, max_iters=50, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5,
             eval_interval=25, eval_iters=4),
    ),
}


# Notebook 04's comparison and benchmarks/moe_vs_dense.py: GPTConfig fields added to the "char"
# model. Compute per token is held at the dense model's: top-1 experts are 4C wide (C = 128),
# top-2 experts 2C, top-2 + shared has three active experts of 172 ~ 4C/3.
MOE_VARIANTS = {
    "dense": {},
    "Switch top-1": dict(n_experts=8, top_k=1, moe_every=2),
    "top-2": dict(n_experts=8, top_k=2, moe_every=2, expert_hidden=256),
    "top-2 + shared": dict(n_experts=8, top_k=2, moe_every=2, n_shared_experts=1, expert_hidden=172),
    "aux-loss-free top-1": dict(n_experts=8, top_k=1, moe_every=2, aux_loss_coef=0.0, bias_update_rate=1e-3),
}


def preset(name: str, vocab_size: int, **train_overrides):
    """(GPTConfig, TrainConfig) for a named preset; keyword arguments override the recipe."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    model_kwargs, train_kwargs = PRESETS[name]
    return GPTConfig(vocab_size=vocab_size, **model_kwargs), TrainConfig(**{**train_kwargs, **train_overrides})
