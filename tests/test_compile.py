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
LR = 1e-2  # AdamW's first step moves each weight by about LR: far above the float noise


def one_step(compiled: bool, dtype: str):
    """One training step from fixed weights on a fixed batch: (loss, parameters before, parameters after,
    loss on the same batch after the step)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    cfg = TrainConfig(batch_size=4, learning_rate=LR, min_lr=0.0, dtype=dtype)
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if compiled else model
    b = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = b[:, :-1], b[:, 1:]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = train_step(net, model, optimizer, [(x, y)], cfg, LR)[0]
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad(), cfg.autocast():
        loss_after = model(x, y).loss.item()  # eager: it reads the updated weights, nothing compiled
    return loss, before, after, loss_after


# agree: the share of each parameter's elements that must land where eager puts them. AdamW's first
# step moves each element by LR * sign(gradient); in bfloat16 a near-zero gradient can round to the
# other sign, so a few elements (about 0.1%) move the other way. In float32 every element agrees.
@pytest.mark.parametrize("dtype, tolerance, agree", [("float32", 1e-4, 1.0), ("bfloat16", 3e-2, 0.99)])
def test_compiled_step_updates_the_weights_like_eager(dtype, tolerance, agree):
    torch._dynamo.reset()
    eager_loss, start, eager, eager_after = one_step(False, dtype)
    loss, compiled_start, compiled, loss_after = one_step(True, dtype)
    assert all(torch.equal(start[name], compiled_start[name]) for name in start)  # the same weights to begin
    assert loss == pytest.approx(eager_loss, abs=tolerance)
    for name in start:
        assert (compiled[name] - start[name]).abs().max() > LR / 2, f"the compiled step left {name} where it was"
        same = ((compiled[name] - eager[name]).abs() <= 1e-4).float().mean().item()
        assert same >= agree, f"{name}: only {same:.1%} of its elements moved as in the eager step"
    assert loss_after == pytest.approx(eager_after, abs=tolerance)
    assert loss_after < loss - 0.1  # the step went downhill on the batch it saw


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
