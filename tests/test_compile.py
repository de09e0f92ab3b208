"""torch.compile of MoE models on CPU, fp32 and bf16: the experts' matmul is one custom operator
(moe_tutorial.experts.expert_matmul) that compiled models call as is; they train like the eager
model and never break the graph inside the experts."""

import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.experts import expert_matmul
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_experts_never_break_the_compiled_graph(dtype):
    """The experts' matmul is one opaque operator to torch.compile, in float32 as in bfloat16.
    (Traced instead, the per-expert fallback split rows by tokens-per-expert counts: a graph break
    and a recompilation for each new routing, slower than eager.) Routing
    itself still breaks the graph where its shapes depend on data (nonzero, bincount)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    b = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        explanation = torch._dynamo.explain(model)(b[:, :-1], b[:, 1:])
    where = [frame.filename for reason in explanation.break_reasons for frame in reason.user_stack]
    assert explanation.graph_break_count > 0 and where  # the check sees graph breaks (routing's)
    assert not [f for f in where if f.endswith("experts.py")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm on CPU; the per-expert fallback
def test_expert_matmul_operator(dtype):
    """Its fake (shape-only) version, autograd formula and eager kernel agree (torch.library.opcheck),
    and its gradients are those of one matmul per expert."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 8, 12, generator=g, dtype=dtype, requires_grad=True)
    counts = torch.tensor([3, 0, 7])  # an expert with no tokens too
    torch.library.opcheck(expert_matmul, (x, weight, counts))
    y = expert_matmul(x, weight, counts)
    grad = torch.randn(y.shape, generator=g, dtype=dtype)
    y.backward(grad)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = torch.cat([rows @ w2[e] for e, rows in enumerate(x2.split(counts.tolist()))])
    reference.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(y, reference, atol=tol)
    assert torch.allclose(x.grad, x2.grad, atol=tol) and torch.allclose(weight.grad, w2.grad, atol=tol)
    assert weight.grad[1].abs().max() == 0  # the expert without tokens gets no gradient
