"""Top-k variants, expert choice, shared experts, aux-loss-free balancing, dispatch strategies."""

import pytest
import torch
import torch.nn.functional as F

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.dispatch import DISPATCH
from moe_tutorial.model import GPT
from moe_tutorial.moe import MoE
from moe_tutorial.router import Router, Routing, balance_metrics, positions_in_expert

BASE = dict(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=16)


def layer(bias=False, **kw):
    return MoE(GPTConfig(**BASE, bias=bias, moe=MoEConfig(**{"n_experts": 4, **kw})))


def test_top2_priority_first_choices_before_second():
    # 4 tokens, 2 experts, capacity 2 per expert (k=2: ceil(0.5 * 2 * 4 / 2) = 2).
    router = Router(2, MoEConfig(n_experts=2, top_k=2))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])  # first choices: 1, 0, 1, 1
    r = router(x, capacity_factor=0.5)
    assert r.capacity == 2
    assert r.expert[:, 0].tolist() == [1, 0, 1, 1]
    # expert 1 gets first choices of tokens 0 and 2; token 3's first choice is over capacity even
    # though token 0's and 1's second choices come earlier in token order.
    assert r.kept[:, 0].tolist() == [True, True, True, False]
    # expert 0: token 1 (first choice) then second choices in token order: token 0 fits, 2 and 3 do not
    assert r.kept[:, 1].tolist() == [True, False, False, False]


def test_topk_gates_sum_to_one_and_equal_mixtral_softmax():
    router = Router(16, MoEConfig(n_experts=8, top_k=2))
    x = torch.randn(32, 16)
    r = router(x, capacity_factor=2.0)
    torch.testing.assert_close(r.weights.sum(dim=-1), torch.ones(32))
    top_logits = r.logits.gather(1, r.expert)
    torch.testing.assert_close(r.weights, F.softmax(top_logits, dim=-1))  # Mixtral's formulation


def test_random_second_expert_only_in_training():
    router = Router(16, MoEConfig(n_experts=4, top_k=2, second_expert="random")).train()
    torch.manual_seed(0)
    r = router(torch.randn(2000, 16), capacity_factor=10.0)
    share = r.kept[:, 1].float().mean().item()
    expected = torch.clamp(2 * r.weights[:, 1], max=1).mean().item()
    assert abs(share - expected) < 0.05 and share < 0.99
    router.eval()
    assert router(torch.randn(200, 16), capacity_factor=10.0).kept.all()


def test_noisy_gating_is_off_in_eval():
    router = Router(16, MoEConfig(n_experts=4, noisy_gating=True))
    x = torch.randn(8, 16)
    router.eval()
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    assert not torch.equal(router.logits(x), router.logits(x))
    router.logits(x).sum().backward()
    assert router.noise.weight.grad.abs().sum() > 0  # the noise scale is learned


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    moe = layer(routing="expert_choice", top_k=1, capacity_factor_eval=1.0).eval()
    out, _, r = moe(torch.randn(2, 12, 16))
    assert r.capacity == 6  # ceil(1.0 * 24 / 4)
    assert r.tokens_processed.tolist() == [6, 6, 6, 6]
    assert r.aux_loss.item() == 0.0 and out.shape == (2, 12, 16)
    assert balance_metrics(r)["load_cv"] == pytest.approx(0.0)


def test_expert_choice_leaks_the_future():
    """Changing the last token can change how an earlier token is routed: not causal."""
    torch.manual_seed(0)
    moe = layer(routing="expert_choice", capacity_factor_eval=0.5).eval()
    x = torch.randn(1, 16, 16)
    before = moe(x).routing.kept[:-1].clone()
    changed = x.clone()
    leaked = False
    for scale in (-20.0, 20.0, -50.0):
        changed[0, -1] = x[0, -1] * scale
        leaked |= not torch.equal(moe(changed).routing.kept[:-1], before)
    assert leaked


def test_shared_experts_see_every_token():
    """The shared expert adds its output to every token, dropped or not: the layer's output minus
    its routed part is the shared expert applied to each token."""
    moe = layer(n_shared_experts=1, capacity_factor_eval=0.5).eval()  # tight: some tokens are dropped
    x = torch.randn(2, 8, 16)
    out, _, routing = moe(x)
    shared, moe.shared = moe.shared, None
    routed, _, _ = moe(x)
    assert routing.dropped.any()
    torch.testing.assert_close(out - routed, shared.expert(0, x), atol=1e-5, rtol=1e-5)


def test_bias_update_balances_a_skewed_router_without_changing_gates():
    torch.manual_seed(0)
    router = Router(16, MoEConfig(n_experts=4, top_k=1, bias_update_rate=0.01))
    with torch.no_grad():
        router.gate.weight.normal_(std=0.1)
        router.gate.weight[0] += 0.1  # a router that prefers expert 0 for most inputs
    stream = [torch.randn(256, 16) + 1.0 for _ in range(300)]
    first = router(stream[0], capacity_factor=10.0)
    assert balance_metrics(first)["max_over_mean"] > 2.0
    for x in stream:
        router(x, capacity_factor=10.0)
        router.update_selection_bias()
    last = router(stream[-1], capacity_factor=10.0)
    assert balance_metrics(last)["max_over_mean"] < 1.3
    # the gates are the unbiased probabilities of the chosen experts
    torch.testing.assert_close(last.weights, F.softmax(router.logits(stream[-1]), -1).gather(1, last.expert))


@pytest.mark.parametrize("kw", [
    dict(top_k=1), dict(top_k=2), dict(top_k=2, capacity_factor_eval=0.5), dict(top_k=1, bias=True),
    dict(routing="expert_choice"), dict(top_k=2, n_shared_experts=1),
], ids=["top1", "top2", "top2-drops", "top1-bias", "expert-choice", "top2-shared"])
def test_dispatch_strategies_agree(kw):
    torch.manual_seed(0)
    moe = layer(**kw).eval()
    if moe.experts.b_fc is not None:
        torch.nn.init.normal_(moe.experts.b_fc)
        torch.nn.init.normal_(moe.experts.b_proj)
    x = torch.randn(2, 12, 16, requires_grad=True)
    outputs, grads = {}, {}
    for name, fn in DISPATCH.items():
        moe.dispatch = fn
        out, _, _ = moe(x)
        outputs[name] = out
        grads[name] = torch.autograd.grad(out.square().sum(), (x, moe.experts.c_fc, moe.router.gate.weight))
    for name in ("einsum", "loop"):
        torch.testing.assert_close(outputs[name], outputs["sort"], atol=1e-6, rtol=1e-5)
        for a, b in zip(grads[name], grads["sort"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_positions_respect_inactive_assignments():
    expert = torch.tensor([[0], [0], [0]])
    active = torch.tensor([[True], [False], [True]])
    assert positions_in_expert(expert, 2, active)[:, 0].tolist()[::2] == [0, 1]


def test_balance_metrics_values():
    # 8 tokens, 4 experts: first choices 0,0,0,0,1,1,2,3 -> load (.5, .25, .125, .125), mean .25;
    # biased std sqrt(((.25)^2 + 0 + 2 * (.125)^2) / 4) = 0.153, CV 0.612; max/mean 2.
    expert = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])[:, None]
    kept = torch.tensor([True] * 7 + [False])[:, None]  # the last token was dropped: 12.5%
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4 + [[0.25] * 4] * 4)
    routing = Routing(logits=probs.log(), probs=probs, expert=expert, weights=probs.gather(1, expert), kept=kept,
                      position=torch.zeros_like(expert), capacity=4, aux_loss=torch.zeros(()), z_loss=torch.zeros(()))
    m = balance_metrics(routing)
    assert m["load_cv"] == pytest.approx((((0.25 ** 2) + 2 * 0.125 ** 2) / 4) ** 0.5 / 0.25)
    assert m["max_over_mean"] == pytest.approx(2.0)
    assert m["dropped_pct"] == pytest.approx(12.5)
    confident = -(0.7 * torch.log(torch.tensor(0.7)) + 0.3 * torch.log(torch.tensor(0.1))).item()
    assert m["router_entropy"] == pytest.approx((confident + torch.log(torch.tensor(4.0)).item()) / 2)


def test_training_with_aux_free_bias_updates_the_bias(tiny_dataset):
    from moe_tutorial.presets import preset
    from moe_tutorial.train import train

    model_cfg, train_cfg = preset("char-tiny", tiny_dataset.tokenizer.vocab_size, progress=False, max_iters=10)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "moe": MoEConfig(n_experts=4, aux_loss_coef=0.0,
                                                                      bias_update_rate=0.01)})
    model = GPT(model_cfg)
    train(model, tiny_dataset, train_cfg)
    assert all(m.router.selection_bias.abs().sum() > 0 for m in model.moe_layers())


def test_dispatch_measurement_runs_every_strategy():
    """benchmarks/moe_dispatch.py measures each strategy through this function."""
    from moe_tutorial.measure import dispatch_point

    for name in DISPATCH:
        point = dispatch_point(name, tokens=128, n_experts=4, repeats=1, threads=1)
        assert point["dispatch"] == name and point["seconds"] > 0 and "extra_mib" in point


def test_peak_memory_measurement_sees_an_allocation():
    """The measurement behind every extra_mib: 256 MiB written after the reset must show up."""
    from moe_tutorial.measure import peak_rss_mib, reset_peak_rss

    baseline = reset_peak_rss()
    block = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
    extra = peak_rss_mib() - baseline
    del block
    assert 200 < extra < 1024, extra


def test_a_measurement_over_several_processes_returns_the_median_memory(monkeypatch):
    from moe_tutorial import measure

    readings = iter([30.0, 10.0, 11.0])  # one process whose one-time allocations landed in the peak
    monkeypatch.setattr(measure, "_run_measurement", lambda cmd, timeout: {"extra_mib": next(readings)})
    assert measure.measure_in_subprocess("attention", runs=3, impl="flash")["extra_mib"] == 11.0
