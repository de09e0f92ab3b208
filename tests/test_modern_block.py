"""The modern block and router (notebook 07), each piece against transformers' own implementation
on the same weights, and whole Llama / Mixtral / Qwen3-MoE / OLMoE models logit for logit."""

import dataclasses

import pytest
import torch

from moe_tutorial.attention import repeat_kv
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.costs import model_info
from moe_tutorial.kv_cache import KVCache
from moe_tutorial.model import GPT, MLP
from moe_tutorial.moe import MoE, override_routing
from moe_tutorial.norms import RMSNorm
from moe_tutorial.rope import RotaryEmbedding, apply_rope
from moe_tutorial.router import Router, limit_to_groups, sequence_balance_loss

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402

from moe_tutorial.hf_models import from_transformers, llama_family_config_from_hf  # noqa: E402

MODERN = dict(norm="rmsnorm", position="rope", activation="swiglu", vocab_size=50, block_size=32,
              n_layer=2, n_head=4, n_embd=32)


# --- pieces --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llama(dtype):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(48, eps=1e-6), hf_llama.LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = (3 * torch.randn(4, 7, 48) + 1).to(dtype)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    assert torch.equal(ours(x), theirs(x))  # same operations in the same order: bit for bit
    assert ours(x).dtype == dtype


def test_rmsnorm_is_not_layernorm():
    x = torch.randn(5, 16) + 2.0  # a mean far from 0: RMSNorm keeps it, LayerNorm removes it
    rms = RMSNorm(16)(x)
    assert torch.allclose(rms.pow(2).mean(-1), torch.ones(5), atol=1e-4)
    assert not torch.allclose(rms, torch.nn.functional.layer_norm(x, (16,)), atol=1e-2)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_llama(theta):
    torch.manual_seed(0)
    head_dim, T = 16, 24
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(
        rope_type="default", rope_theta=theta), max_position_embeddings=64)
    hf_rope = hf_llama.LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, T, head_dim), torch.randn(2, 2, T, head_dim)
    positions = torch.arange(5, 5 + T)[None]
    cos, sin = hf_rope(q, positions)
    expected_q, expected_k = hf_llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding(head_dim, 64, theta)
    cos_ours, sin_ours = ours(5, T)
    torch.testing.assert_close(apply_rope(q, cos_ours, sin_ours), expected_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos_ours, sin_ours), expected_k, atol=1e-6, rtol=0)


def test_rope_scores_depend_on_distance_only():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):  # q at position m, k at position n
        return (apply_rope(q, *rope(m, 1))[0] * apply_rope(k, *rope(n, 1))[0]).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), atol=1e-5, rtol=0)  # distance 7 both times
    assert (score(10, 3) - score(10, 9)).abs() > 1e-3  # another distance, another score


def test_repeat_kv_matches_transformers():
    kv = torch.randn(2, 3, 5, 8)
    assert torch.equal(repeat_kv(kv, 4), hf_llama.repeat_kv(kv, 4))
    assert repeat_kv(kv, 1) is kv


def test_swiglu_mlp_matches_llama_mlp():
    torch.manual_seed(0)
    config = GPTConfig(**MODERN, mlp_hidden=40)
    ours = MLP(config)
    theirs = hf_llama.LlamaMLP(transformers.LlamaConfig(hidden_size=32, intermediate_size=40))
    with torch.no_grad():
        gate, up = ours.c_fc.weight.split(40)
        theirs.gate_proj.weight.copy_(gate)
        theirs.up_proj.weight.copy_(up)
        theirs.down_proj.weight.copy_(ours.c_proj.weight)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x).out, theirs(x), atol=1e-6, rtol=0)


def test_swiglu_default_width_keeps_gelu_parameter_count():
    gelu, swiglu = GPTConfig(n_embd=384, n_head=6), GPTConfig(n_embd=384, n_head=6, activation="swiglu")
    assert swiglu.mlp_width == 1024  # 8C/3 = 1024 exactly at C = 384
    assert model_info(gelu).total_params == model_info(swiglu).total_params


# --- whole models: Llama (dense), Qwen3-MoE, OLMoE, Mixtral ----------------------------------------------------------

HF_COMMON = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
HF_MODELS = {
    "llama": lambda: transformers.LlamaConfig(intermediate_size=48, **HF_COMMON),
    "llama-mqa-tied": lambda: transformers.LlamaConfig(intermediate_size=48, tie_word_embeddings=True,
                                                       **{**HF_COMMON, "num_key_value_heads": 1}),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=16, **HF_COMMON),
    "qwen3_moe-normalised-sparse-step": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=2, **HF_COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                              **HF_COMMON),
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                                  **HF_COMMON),
}


def hf_model(name):
    torch.manual_seed(0)
    config = HF_MODELS[name]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms initialise to 1: move them, so a swapped or missing norm shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_whole_model_matches_transformers(name):
    theirs = hf_model(name)
    ours = from_transformers(theirs).eval()
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, theirs(idx).logits, atol=1e-5, rtol=0)
    # Greedy decoding with our KV cache gives transformers' tokens.
    expected = theirs.generate(idx[:1, :4], max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(idx[:1, :4], 12, top_k=1), expected)


def test_loader_refuses_what_it_would_compute_differently():
    hf = HF_MODELS["mixtral"]().to_dict()
    with pytest.raises(ValueError, match="sliding_window=4096"):
        llama_family_config_from_hf({**hf, "sliding_window": 4096})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        llama_family_config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        llama_family_config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="'some_new_option'"):
        llama_family_config_from_hf({**hf, "some_new_option": 1})
    with pytest.raises(ValueError, match="model_type 'gpt_oss'"):
        llama_family_config_from_hf({**hf, "model_type": "gpt_oss"})
    olmoe = HF_MODELS["olmoe"]().to_dict()
    with pytest.raises(ValueError, match="clip_qkv=8.0"):
        llama_family_config_from_hf({**olmoe, "clip_qkv": 8.0})


# --- the DeepSeek-V3 MoE block: sigmoid scores, bias, groups, scaling, shared experts ------------------------------

def deepseek_pair(n_group=4, topk_group=2, top_k=3, norm_topk_prob=True):
    torch.manual_seed(0)
    hf_config = transformers.DeepseekV3Config(
        hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob)
    theirs = hf_deepseek.DeepseekV3MoE(hf_config).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0, 0.2)
        theirs.gate.e_score_correction_bias.normal_(0, 0.05)  # a trained aux-loss-free bias
    config = GPTConfig(**{**MODERN, "moe": MoEConfig(
        n_experts=8, top_k=top_k, expert_hidden=16, n_shared_experts=2, scoring="sigmoid", n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=2.5, normalize_weights=norm_topk_prob,
        capacity_factor_train=8 / top_k, capacity_factor_eval=8 / top_k)})
    ours = MoE(config).eval()
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.gate.weight)
        ours.router.selection_bias.copy_(theirs.gate.e_score_correction_bias)
        ours.experts.c_fc.copy_(theirs.experts.gate_up_proj.transpose(1, 2))
        ours.experts.c_proj.copy_(theirs.experts.down_proj.transpose(1, 2))
        shared = theirs.shared_experts
        ours.shared.c_fc.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]).t()[None])
        ours.shared.c_proj.copy_(shared.down_proj.weight.t()[None])
    return ours, theirs


@pytest.mark.parametrize("groups", [(4, 2), (1, 1), (2, 1)])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_moe_block_matches_transformers(groups, norm_topk_prob):
    ours, theirs = deepseek_pair(*groups, norm_topk_prob=norm_topk_prob)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x), atol=1e-5, rtol=0)
        _, hf_weights, hf_experts = theirs.gate(x)
        routing = ours.router(x.view(-1, 32), ours.capacity_factor)
    # Same experts (as sets: transformers' topk is unsorted) with the same weights.
    ours_sorted, order = routing.expert.sort(dim=1)
    theirs_sorted, their_order = hf_experts.sort(dim=1)
    assert torch.equal(ours_sorted, theirs_sorted)
    torch.testing.assert_close(routing.weights.gather(1, order), hf_weights.gather(1, their_order))


def test_group_limited_routing_uses_only_the_best_groups():
    torch.manual_seed(0)
    scores = torch.rand(500, 16)
    limited = limit_to_groups(scores, n_group=4, topk_group=2)
    allowed_groups = torch.isfinite(limited).view(500, 4, 4).all(dim=2)  # (N, G): whole groups kept or cut
    assert torch.equal(allowed_groups.sum(1), torch.full((500,), 2))
    assert torch.equal(torch.isfinite(limited).view(500, 4, 4).any(dim=2), allowed_groups)
    # The kept groups are those with the largest sum of their two best scores.
    group_score = scores.view(500, 4, 4).topk(2, dim=-1).values.sum(-1)
    kept_min = group_score.masked_fill(~allowed_groups, float("inf")).min(1).values
    cut_max = group_score.masked_fill(allowed_groups, float("-inf")).max(1).values
    assert (kept_min >= cut_max).all()
    router = Router(8, MoEConfig(n_experts=16, top_k=4, n_group=4, topk_group=2, scoring="sigmoid"))
    routing = router(torch.randn(300, 8), 10.0)
    groups_used = (routing.expert // 4).sort(1).values
    assert ((groups_used[:, 1:] != groups_used[:, :-1]).sum(1) + 1).max() <= 2  # at most 2 groups a token


def test_groups_imposed_at_inference_route_as_if_trained_with_them_and_leave_the_router_alone():
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=8, n_head=2, vocab_size=11, moe=MoEConfig(n_experts=16, top_k=4, scoring="sigmoid"))
    layer = MoE(cfg).eval()
    limited = MoE(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_group=4, topk_group=2))).eval()
    limited.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 8)
    with torch.no_grad(), override_routing(layer, groups=(4, 2)):
        imposed = layer(x).routing
    assert torch.equal(imposed.expert, limited(x).routing.expert)
    assert layer.router.config.n_group == 1 and layer.override.groups is None  # nothing left behind
    assert not torch.equal(layer(x).routing.expert, imposed.expert)  # and the limit did change something
    with pytest.raises(ValueError, match="n_group"), override_routing(layer, groups=(3, 2)):
        pass  # 16 experts cannot be split into 3 groups


def test_sequence_balance_loss_follows_the_paper():
    torch.manual_seed(0)
    B, T, E, k = 3, 10, 6, 2
    affinity = torch.rand(B * T, E)
    expert = torch.rand(B * T, E).topk(k, dim=1).indices
    per_sequence = []
    for b in range(B):  # DeepSeek-V3 eq. 17-20, one sequence at a time
        a, ex = affinity[b * T:(b + 1) * T], expert[b * T:(b + 1) * T]
        f = torch.tensor([E / (k * T) * (ex == i).any(1).sum().item() for i in range(E)])
        P = (a / a.sum(1, keepdim=True)).mean(0)
        per_sequence.append((f * P).sum())
    torch.testing.assert_close(sequence_balance_loss(affinity, expert, T), torch.stack(per_sequence).mean())
    # Perfectly balanced sequences give exactly 1.
    uniform = torch.ones(B * T, E)
    balanced = torch.arange(B * T * k).remainder(E).view(B * T, k)
    torch.testing.assert_close(sequence_balance_loss(uniform, balanced, T), torch.tensor(1.0))


def test_sequence_loss_is_added_to_the_aux_loss():
    config = GPTConfig(**{**MODERN, "moe": MoEConfig(n_experts=4, top_k=2, scoring="sigmoid", aux_loss_coef=0.0,
                                                     z_loss_coef=0.0, seq_aux_loss_coef=1e-2)})
    x = torch.randn(2, 8, 32)
    layer = MoE(config)
    _, aux, routing = layer(x)
    assert aux.item() > 0
    torch.testing.assert_close(aux, routing.seq_aux_loss)


def test_aux_loss_warmup_ramps_over_optimizer_steps():
    config = GPTConfig(**{**MODERN, "moe": MoEConfig(n_experts=4, aux_loss_warmup_steps=4)})
    model = GPT(config)
    idx = torch.randint(0, 50, (2, 16))
    full = GPT(dataclasses.replace(config, moe=dataclasses.replace(config.moe, aux_loss_warmup_steps=0)))
    full.load_state_dict(model.state_dict(), strict=False)
    full_aux = full(idx).aux_loss
    ratios = []
    for _ in range(6):
        ratios.append((model(idx).aux_loss / full_aux).item())
        model.after_optimizer_step()
    assert ratios == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], abs=1e-5)
    assert "transformer.h.0.mlp.router.warmup_step" in model.state_dict()  # a resume continues the ramp


def test_capacity_bounds_apply_unless_overridden():
    router = Router(8, MoEConfig(n_experts=4, min_capacity=6, max_capacity=9))
    assert router(torch.randn(8, 8), 1.0).capacity == 6  # ceil(1.0 * 8 / 4) = 2, raised to 6
    assert router(torch.randn(400, 8), 1.0).capacity == 9  # 100, cut to 9
    assert router(torch.randn(400, 8), 1.0, bounded=False).capacity == 100


def test_first_k_dense_blocks():
    config = GPTConfig(**{**MODERN, "n_layer": 4, "moe": MoEConfig(n_experts=4, first_k_dense=1)})
    assert [config.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert [type(b.mlp).__name__ for b in GPT(config).transformer.h] == ["MLP", "MoE", "MoE", "MoE"]


# --- generation with the cache for every combination; what GQA saves ------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(n_kv_head=1), dict(n_kv_head=2, qk_norm="head"), dict(n_kv_head=4, qk_norm="projection"),
    dict(position="learned"), dict(head_size=16, n_kv_head=2),
    dict(moe=MoEConfig(n_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=2, n_shared_experts=1,
                       routed_scaling_factor=2.5, first_k_dense=1)),
])
def test_kv_cache_gives_the_same_tokens_for_every_block(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**MODERN, **options})).eval()
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 40, generator=torch.Generator().manual_seed(3))  # slides past block_size 32
    uncached = model.generate(prompt, 40, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(cached, uncached)


def test_gqa_cache_is_n_head_over_n_kv_head_smaller():
    sizes = {}
    for n_kv in (8, 2, 1):
        cache = KVCache(GPTConfig(n_head=8, n_embd=64, n_kv_head=n_kv), batch_size=1)
        sizes[n_kv] = cache.k.numel() + cache.v.numel()
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]


@pytest.mark.parametrize("options", [
    dict(norm="rmsnorm", position="rope", n_kv_head=2, qk_norm="head", activation="swiglu", head_size=16),
    dict(norm="rmsnorm", qk_norm="projection", activation="swiglu", n_kv_head=1,
         moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=1)),
])
def test_model_info_counts_modern_blocks(options):
    config = GPTConfig(n_layer=3, **options)
    assert model_info(config).total_params == sum(p.numel() for p in GPT(config).parameters())


# --- configs: impossible combinations are refused, naming the fix -------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(n_experts=8, n_group=3), "cannot be split into n_group=3"),
    (dict(n_experts=8, n_group=2, topk_group=3), "topk_group=3 is more than n_group=2"),
    (dict(n_experts=8, top_k=6, n_group=4, topk_group=2), "do not fit in topk_group=2 groups of 2"),
    (dict(n_experts=8, routing="expert_choice", scoring="sigmoid"), "token-choice option"),
    (dict(n_experts=8, scoring="sigmoid", top_k=1), "weight 1"),
    (dict(n_experts=8, scoring="tanh"), "scoring must be one of"),
    (dict(n_experts=8, max_capacity=2, min_capacity=4), "below min_capacity"),
    (dict(n_experts=8, routed_scaling_factor=0.0), "routed_scaling_factor must be > 0"),
])
def test_impossible_router_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(n_head=4, n_kv_head=3), "must divide n_head=4"),
    (dict(qk_norm="head"), "set norm='rmsnorm'"),
    (dict(position="alibi"), "position must be one of"),
    (dict(n_layer=2, moe=MoEConfig(first_k_dense=2)), "leaves no MoE block"),
    (dict(position="rope", n_embd=12, n_head=4), "head_dim=3 must be even"),
])
def test_impossible_block_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)


def test_committed_block_comparison_has_three_seeds_of_every_variant():
    """benchmarks/results/modern_block.json backs notebook 07's table and the ablation's verdicts: every
    variant of benchmarks/modern_block.py, the leave-one-out rows included, has its 3 seeds."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "modern_block.py"
    spec = importlib.util.spec_from_file_location("modern_block_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    runs = json.loads(benchmark.RESULTS.read_text())["runs"]
    for variant in benchmark.VARIANTS:
        assert sorted(r["seed"] for r in runs if r["variant"] == variant) == list(benchmark.SEEDS), variant
    assert set(benchmark.ABLATIONS) <= set(benchmark.VARIANTS)
    assert all(benchmark.BASELINE[name] in benchmark.VARIANTS for name in benchmark.ABLATIONS)
