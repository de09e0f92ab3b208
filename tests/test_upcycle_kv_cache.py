"""Sparse upcycling keeps the dense model's function; KV-cache decoding keeps the tokens."""

import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.evaluate import max_logit_difference
from moe_tutorial.kv_cache import KVCache
from moe_tutorial.model import GPT
from moe_tutorial.moe import RoutingOverride, dropless
from moe_tutorial.upcycle import upcycle


@pytest.fixture
def dense():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=4, n_head=4, n_embd=64, bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)  # biases must be copied too
    return model


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_logits_equal_dense(dense, top_k):
    moe = upcycle(dense, n_experts=8, top_k=top_k, moe_every=2)
    assert len(moe.moe_layers()) == 2 and moe.config.moe.straight_through_gate == (top_k == 1)
    idx = torch.randint(0, 65, (4, 32))
    with dropless(moe):  # a dropped token would skip its MLP: equality holds when none is
        assert max_logit_difference(dense, moe, idx) < 1e-5
        assert not any(r.dropped.any() for r in moe(idx, return_routing=True).routing)
    assert dense.config.moe is None  # the dense model is left as it was


def test_upcycled_experts_differ_with_noise_and_the_router_learns(dense):
    idx = torch.randint(0, 65, (4, 32))
    noisy = upcycle(dense, n_experts=4, top_k=1, noise_std=0.05)
    with dropless(noisy):
        assert max_logit_difference(dense, noisy, idx) > 1e-4
    moe = upcycle(dense, n_experts=4, top_k=1)
    moe.train()
    loss = moe(idx, idx).loss
    loss.backward()  # task loss only: the straight-through gate still passes the router a gradient
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for layer in moe.moe_layers())


def test_upcycle_rejects_bad_input(dense):
    moe = upcycle(dense, n_experts=4)
    with pytest.raises(ValueError, match="dense model"):
        upcycle(moe, n_experts=4)
    with pytest.raises(ValueError, match="expert_hidden"):
        upcycle(dense, n_experts=4, expert_hidden=32)
    with pytest.raises(ValueError, match="top-1 token choice only"):
        MoEConfig(n_experts=4, top_k=2, straight_through_gate=True)


@pytest.mark.parametrize("extra", [{}, dict(moe=MoEConfig(n_experts=4, top_k=2, every=2)),
                                   dict(moe=MoEConfig(n_experts=4, top_k=1))])
def test_kv_cache_generates_the_same_tokens(extra):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32, **extra)).eval()
    prompt = torch.randint(0, 50, (3, 6))
    for kwargs in (dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_p=0.9)):
        with_cache = model.generate(prompt, 30, generator=torch.Generator().manual_seed(1), **kwargs)
        without = model.generate(prompt, 30, generator=torch.Generator().manual_seed(1), use_cache=False, **kwargs)
        assert torch.equal(with_cache, without)  # 36 > block_size 24: the sliding window is covered too
    assert all(layer.override == RoutingOverride() for layer in model.moe_layers())  # capacity restored afterwards


def test_kv_cache_with_activation_checkpointing_left_on():
    """A model left in training mode with checkpointing on still fills and reads its KV cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32)).train()
    model.gradient_checkpointing = True
    idx = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        cache = KVCache(model.config, 1, None, torch.float32)
        model(idx[:, :-1], cache=cache)  # prefill
        decoded = model(idx[:, -1:], cache=cache).logits[:, -1]  # one step that needs the cache
        full = model(idx).logits[:, -1]
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


def test_upcycle_passes_moe_options_through(dense):
    moe = upcycle(dense, n_experts=4, top_k=2, capacity_factor_eval=3.0, routing="expert_choice")
    assert moe.config.moe.routing == "expert_choice" and moe.config.moe.capacity_factor_eval == 3.0
    assert not moe.config.moe.straight_through_gate


def test_cached_forward_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx)[0]
    cache = KVCache(model.config, batch_size=2)
    chunks = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:6], cache=cache)[0], model(idx[:, 6:], cache=cache)[0]]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 16 positions"):
        cache.update(0, torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16))


def test_gpu_benchmark_skips_cleanly_and_its_code_runs_on_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_gpt2_moe.py"
    if not torch.cuda.is_available():
        plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert plain.returncode == 0 and "skipped: no CUDA device" in plain.stdout
    smoke = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr
    assert "tiny dense" in smoke.stdout and "tiny MoE" in smoke.stdout
