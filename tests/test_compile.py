"""torch.compile of MoE models on CPU: fp32 takes the per-expert matmul fallback (grouped_mm's
meta function accepts bfloat16 only), bf16 the grouped matmul; both train like the eager model."""

import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT
from moe_tutorial.train import TrainConfig, make_optimizer, train_step

CONFIG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32,
                   moe=MoEConfig(n_experts=4, top_k=2, capacity_factor_train=2.0))


def two_steps(compiled: bool, dtype: str):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    cfg = TrainConfig(batch_size=4, learning_rate=1e-2, min_lr=0.0, dtype=dtype)
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (4, 17), generator=g) for _ in range(2)]
    return [train_step(net, model, optimizer, [(b[:, :-1], b[:, 1:])], cfg, cfg.learning_rate)[0] for b in batches]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_compiled_moe_trains_like_eager(dtype, tolerance):
    torch._dynamo.reset()
    eager, compiled = two_steps(False, dtype), two_steps(True, dtype)
    assert compiled == pytest.approx(eager, abs=tolerance)
    assert compiled[1] != compiled[0]  # the optimizer step changed the model
