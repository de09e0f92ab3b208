import math

import pytest
import torch
import torch.nn.functional as F

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.experts import Experts, grouped_matmul, per_expert_matmul
from moe_tutorial.model import GPT, MLP
from moe_tutorial.moe import MoE
from moe_tutorial.router import capacity, load_balancing_loss, positions_in_expert, z_loss

BASE = dict(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=16)


def moe_layer(**kw):
    return MoE(GPTConfig(**BASE, moe=MoEConfig(**{"n_experts": 4, **kw})))


def test_aux_loss_hand_computed():
    # 4 tokens, 2 experts. Top choices: 0, 0, 0, 1 -> f = (3/4, 1/4); P = column means (0.6, 0.4).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    # 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1. (Soft f = P would give 2 * (0.36 + 0.16) = 1.04.)
    assert load_balancing_loss(probs, probs.argmax(dim=1)).item() == pytest.approx(1.1)


def test_aux_loss_uniform_is_one_and_collapse_is_n_experts():
    E, N = 8, 64
    uniform = torch.full((N, E), 1.0 / E)
    assert load_balancing_loss(uniform, torch.arange(N) % E).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed, torch.zeros(N, dtype=torch.long)).item() == pytest.approx(E)


@pytest.mark.parametrize("split, expected", [(False, 4.0), (True, 2.0)])
def test_aux_loss_through_the_layer(split, expected):
    """A router that sends every token to expert 2 (f = P = e_2: loss E = 4), or half the tokens
    to expert 1 and half to expert 2 (f = P = (0, .5, .5, 0): loss 4 * 0.5 = 2), times alpha."""
    layer = moe_layer(aux_loss_coef=0.01, capacity_factor_train=4.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0], layer.router.gate.weight[1, 0] = 20.0, -20.0
    x = torch.randn(2, 8, 16)
    x[..., 0] = 1.0
    if split:
        x[1, :, 0] = -1.0  # the second sequence prefers expert 1
    _, aux, routing = layer(x)
    assert routing.aux_loss.item() == pytest.approx(0.01 * expected, rel=1e-4)
    assert aux.item() == pytest.approx((routing.aux_loss + routing.z_loss).item())


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.exp(-1)) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)


def test_capacity_formula():
    assert capacity(768, 8, 1.25) == 120
    assert capacity(10, 3, 1.0) == 4  # ceil
    assert capacity(10, 4, 1.0, top_k=2) == 5


def test_positions_give_first_choices_priority():
    expert = torch.tensor([[0, 1], [1, 0], [0, 1]])  # (N=3, k=2)
    # first choices in token order: e0 <- t0 (0), e1 <- t1 (0), e0 <- t2 (1);
    # then second choices: e1 <- t0 (1), e0 <- t1 (2), e1 <- t2 (2)
    assert positions_in_expert(expert, 2).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_capacity_respected_and_late_tokens_dropped():
    layer = moe_layer(n_experts=4, capacity_factor_train=1.0).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 10.0  # every token with x[..., 0] > 0 prefers expert 2
    x = torch.randn(1, 16, 16)
    x[0, :, 0] = 1.0  # all 16 tokens choose expert 2
    out, _, r = layer(x)
    assert r.capacity == 4  # ceil(1.0 * 16 / 4)
    assert (r.expert[:, 0] == 2).all()
    assert r.tokens_processed.tolist() == [0, 0, 4, 0]
    assert r.first_choice_share.tolist() == [0.0, 0.0, 1.0, 0.0]  # demand, before capacity
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 12  # the first four arrive first
    assert torch.equal(out[0, 4:], torch.zeros(12, 16))  # dropped tokens: exactly zero
    assert out[0, :4].abs().sum() > 0


def test_one_expert_with_ample_capacity_equals_dense_mlp():
    config = GPTConfig(**BASE, moe=MoEConfig(n_experts=1, capacity_factor_eval=1.0))
    layer, dense = MoE(config).eval(), MLP(config).eval()
    with torch.no_grad():
        dense.c_fc.weight.copy_(layer.experts.c_fc[0].t())
        dense.c_proj.weight.copy_(layer.experts.c_proj[0].t())
    x = torch.randn(3, 10, 16)
    # with one expert the softmax gate is exactly 1.0
    torch.testing.assert_close(layer(x).out, dense(x).out, atol=1e-6, rtol=1e-5)
    assert dense(x).aux_loss.item() == 0.0 and dense(x).routing is None  # the same triple as an MoE layer


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_a_token_by_token_reference(top_k):
    layer = moe_layer(n_experts=4, top_k=top_k, capacity_factor_eval=0.6).eval()
    x = torch.randn(2, 8, 16)
    out, _, r = layer(x)
    flat = x.reshape(-1, 16)
    expected = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for j in range(top_k):
            if r.kept[t, j]:
                expected[t] += r.weights[t, j] * layer.experts.expert(r.expert[t, j], flat[t])
    assert not r.kept.all()  # the tight capacity really dropped something
    torch.testing.assert_close(out.reshape(-1, 16), expected, atol=1e-5, rtol=1e-4)


def test_router_gets_gradient_through_the_gates():
    layer = moe_layer().train()
    out, _, _ = layer(torch.randn(2, 8, 16))
    out.square().sum().backward()  # the task loss alone, no auxiliary loss
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.experts.c_fc.grad.abs().sum() > 0


def test_router_logits_are_fp32_under_bf16_autocast():
    layer = moe_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, routing = layer(torch.randn(2, 8, 16))
    assert routing.logits.dtype == torch.float32
    assert routing.probs.dtype == torch.float32
    assert out.shape == (2, 8, 16)


def test_jitter_only_in_training():
    layer = moe_layer(jitter=0.5)
    x = torch.randn(1, 8, 16)
    layer.eval()
    a = layer.router.logits(x[0])
    assert torch.equal(a, layer.router.logits(x[0]))
    layer.train()
    assert not torch.equal(a, layer.router.logits(x[0]))


def test_grouped_matmul_matches_per_expert_loop():
    x = torch.randn(10, 8)
    w = torch.randn(3, 8, 5)
    counts = torch.tensor([3, 0, 7])  # an empty expert too
    torch.testing.assert_close(grouped_matmul(x, w, counts), per_expert_matmul(x, w, counts))


def test_grouped_matmul_backward_matches_loop():
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    grouped_matmul(x, w, counts).sum().backward()  # a broadcast gradient: must not crash
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    per_expert_matmul(x, w, counts).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_experts_with_bias():
    experts = Experts(3, 8, 12, bias=True)
    torch.nn.init.normal_(experts.b_fc)
    torch.nn.init.normal_(experts.b_proj)
    x, counts = torch.randn(6, 8), torch.tensor([2, 1, 3])
    rows = torch.repeat_interleave(torch.arange(3), counts)
    expected = torch.stack([experts.expert(e, x[i]) for i, e in enumerate(rows.tolist())])
    torch.testing.assert_close(experts(x, counts), expected, atol=1e-5, rtol=1e-5)


def test_moe_every_places_layers():
    model = GPT(GPTConfig(**{**BASE, "n_layer": 4}, moe=MoEConfig(n_experts=4, every=2)))
    assert [type(b.mlp).__name__ for b in model.transformer.h] == ["MLP", "MoE", "MLP", "MoE"]
    assert len(model.moe_layers()) == 2
    idx = torch.randint(0, 16, (1, 8))
    assert GPT(GPTConfig(**BASE))(idx).aux_loss.item() == 0.0  # dense: no auxiliary loss
    assert model(idx).aux_loss.item() > 0


def test_moe_gpt_trains_and_stays_balanced(tiny_dataset):
    from moe_tutorial.presets import preset
    from moe_tutorial.train import train

    model_cfg, train_cfg = preset("char-tiny", tiny_dataset.tokenizer.vocab_size, progress=False,
                                  max_iters=60)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "moe": MoEConfig(n_experts=4)})
    torch.manual_seed(0)
    model = GPT(model_cfg)
    history = train(model, tiny_dataset, train_cfg)
    assert history.val_loss[-1] < history.val_loss[0]
    assert history.loss[-1] < 0.6 * history.loss[0]
    x = tiny_dataset.train[:4 * 32].view(4, 32)  # four sequences of block_size tokens
    routings = model(x, return_routing=True).routing
    aux_per_layer = [r.aux_loss.item() / model_cfg.moe.aux_loss_coef for r in routings]
    assert all(1.0 <= a < 1.5 for a in aux_per_layer), aux_per_layer  # near alpha: near uniform
    assert len(history.expert_load) == 60 and len(history.expert_load[0]) == 2
    assert sum(history.expert_load[-1][0]) == pytest.approx(1.0, abs=1e-6)  # demand, before capacity
    assert 0.0 <= history.dropped[-1][0] < 0.5


def test_routing_and_aux_loss_are_right_under_activation_checkpointing():
    """Checkpointing reruns each block's forward during backward: the aux loss must still reach
    the router, and the routing records left behind must be those of the step (jitter and noise
    draw the same random numbers in the rerun)."""
    config = GPTConfig(**BASE, moe=MoEConfig(n_experts=4, top_k=2, jitter=0.3, noisy_gating=True))
    idx = torch.randint(0, 16, (2, 16))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        out = model(idx, idx, return_routing=True)
        (out.loss + out.aux_loss).backward()
        routing = out.routing[0]
        results.append((out.aux_loss.item(), routing.expert.clone(), routing.kept.clone(),
                        model.moe_layers()[0].router.gate.weight.grad.clone()))
    (aux_a, expert_a, kept_a, grad_a), (aux_b, expert_b, kept_b, grad_b) = results
    assert aux_a == pytest.approx(aux_b, rel=1e-6) and aux_a > 0
    assert torch.equal(expert_a, expert_b) and torch.equal(kept_a, kept_b)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-5)


def test_load_cv_is_the_population_cv_and_history_uses_it():
    import math

    from moe_tutorial.history import History
    from moe_tutorial.router import load_cv

    assert load_cv(torch.full((8,), 0.125)).item() == 0.0
    assert math.isclose(load_cv(torch.tensor([1.0, 0.0, 0.0, 0.0])).item(), math.sqrt(3), rel_tol=1e-6)  # sqrt(E - 1)
    h = History(expert_load=[[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]] * 3, dropped=[[0.5, 0.0]] * 3)
    summary = h.routing_summary()
    assert math.isclose(summary["load_cv"], math.sqrt(3) / 2, rel_tol=1e-6)  # mean over the two layers
    assert summary["max_share"] == 0.625 and summary["dropped_pct"] == 25.0
    assert History().routing_summary() == {}
