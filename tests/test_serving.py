"""moe_tutorial.serving: counts of published MoEs against their published numbers and, exactly,
against tiny models built with transformers' own classes; the serving arithmetic's limits."""

from decimal import Decimal

import pytest

from moe_tutorial.serving import (
    PUBLISHED,
    PublishedMoE,
    expected_experts_read,
    from_hf_config,
    kv_cache_bytes_per_token,
    parameter_counts,
    weight_bytes_per_token,
)

# (total, active) in billions, as published; a count must agree to one unit of the last digit shown,
# since the figures are rounded (or truncated: Qwen's 3.3 for 3.35).
REPORTED = {
    "Mixtral-8x7B": ("46.7", "12.9"),  # Mistral AI's Mixtral announcement (the paper rounds to 47B / 13B)
    "OLMoE-1B-7B": ("6.9", "1.3"),  # the OLMoE paper (arXiv 2409.02060)
    "Qwen3-30B-A3B": ("30.5", "3.3"),  # the Qwen3-30B-A3B model card
    "DeepSeek-V3": ("671", "37"),  # the DeepSeek-V3 report (arXiv 2412.19437), MTP module excluded
}


@pytest.mark.parametrize("name", REPORTED)
def test_counts_agree_with_the_published_numbers(name):
    for count, reported in zip(parameter_counts(PUBLISHED[name]), REPORTED[name]):
        unit = Decimal(10) ** Decimal(reported).as_tuple().exponent
        assert abs(Decimal(count) / 10**9 - Decimal(reported)) < unit, (name, count, reported)


def test_deepseek_v3_active_count_matches_its_weights_readme():
    # README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: 36.6B activated, the output head included and
    # the input embedding (a lookup) not.
    m = PUBLISHED["DeepSeek-V3"]
    active = parameter_counts(m)[1] - m.vocab_size * m.hidden_size
    assert active == pytest.approx(36.6e9, rel=0.005)


# --- exact counts against transformers ---------------------------------------------------------

def hf_count(config) -> int:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once; buffers not at all


def tiny_configs():
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_experts_per_tok=2)
    return {
        "mixtral": transformers.MixtralConfig(**small, num_key_value_heads=2, intermediate_size=24,
                                              num_local_experts=4),
        "olmoe tied": transformers.OlmoeConfig(**small, num_key_value_heads=2, intermediate_size=24, num_experts=4,
                                               tie_word_embeddings=True, eos_token_id=1),  # the default is 50279
        "qwen3_moe": transformers.Qwen3MoeConfig(**small, num_key_value_heads=2, head_dim=12, intermediate_size=40,
                                                 moe_intermediate_size=16, num_experts=6, mlp_only_layers=[1]),
        "deepseek_v3": transformers.DeepseekV3Config(**small, num_key_value_heads=4, intermediate_size=40,
                                                     moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                                                     n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=20,
                                                     kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                                     v_head_dim=5),
        "deepseek_v3 no q latent": transformers.DeepseekV3Config(**small, num_key_value_heads=4, intermediate_size=40,
                                                                 moe_intermediate_size=16, n_routed_experts=8,
                                                                 n_shared_experts=1, n_group=2, topk_group=1,
                                                                 first_k_dense_replace=2, q_lora_rank=None,
                                                                 kv_lora_rank=12, qk_nope_head_dim=6,
                                                                 qk_rope_head_dim=4, v_head_dim=5),
    }


@pytest.mark.parametrize("name", ["mixtral", "olmoe tied", "qwen3_moe", "deepseek_v3", "deepseek_v3 no q latent"])
def test_total_count_equals_transformers_parameters_exactly(name):
    config = tiny_configs()[name]
    m = from_hf_config(config.to_dict())
    assert parameter_counts(m)[0] == hf_count(config)


def test_the_tiny_models_have_what_they_should():
    """The exact matches above cover dense layers, shared experts, tying and both q paths of MLA."""
    described = {name: from_hf_config(config.to_dict()) for name, config in tiny_configs().items()}
    assert described["qwen3_moe"].n_dense_layers == 1 and described["qwen3_moe"].head_dim == 12
    assert described["olmoe tied"].tie_embeddings and described["olmoe tied"].qk_norm == "projection"
    assert described["deepseek_v3"].n_shared_experts == 2 and described["deepseek_v3"].q_lora_rank == 20
    assert described["deepseek_v3 no q latent"].q_lora_rank == 0


# --- serving -----------------------------------------------------------------------------------

def test_kv_cache_per_token():
    assert kv_cache_bytes_per_token(PUBLISHED["Mixtral-8x7B"]) == 32 * 2 * 8 * 128 * 2  # layers, k and v, heads
    assert kv_cache_bytes_per_token(PUBLISHED["DeepSeek-V3"]) == 61 * (512 + 64) * 2  # latent + rotary key
    assert kv_cache_bytes_per_token(PUBLISHED["Qwen3-30B-A3B"], bytes_per_value=1) == 48 * 2 * 4 * 128


def test_expected_experts_read_limits():
    assert expected_experts_read(8, 2, 1) == pytest.approx(2)  # one token: its k experts
    assert expected_experts_read(8, 8, 5) == pytest.approx(8)  # every token picks all
    reads = [expected_experts_read(64, 8, b) for b in (1, 2, 8, 64, 512)]
    assert reads == sorted(reads) and reads[-1] <= 64
    assert expected_experts_read(64, 8, 512) == pytest.approx(64, rel=1e-9)


@pytest.mark.parametrize("name", PUBLISHED)
def test_weight_bytes_per_token_from_batch_one_to_a_huge_batch(name):
    m = PUBLISHED[name]
    total, active = parameter_counts(m)
    unread_rows = 0 if m.tie_embeddings else (m.vocab_size - 1) * m.hidden_size  # a token reads one row
    assert weight_bytes_per_token(m, 1) == pytest.approx(2 * (active - unread_rows), rel=1e-12)
    assert weight_bytes_per_token(m, 1, bytes_per_value=1) == pytest.approx(active - unread_rows, rel=1e-12)
    per_token = [weight_bytes_per_token(m, b) for b in (1, 8, 64, 512, 4096)]
    assert per_token == sorted(per_token, reverse=True)  # batching shares every weight read
    step = [b * weight_bytes_per_token(m, b) for b in (1, 8, 64, 512, 4096)]
    assert step == sorted(step) and step[-1] <= 2 * total  # a step reads more, never more than everything
    huge = 10**6  # every expert and every embedding row read at each step
    assert weight_bytes_per_token(m, huge) == pytest.approx(2 * total / huge, rel=1e-9)


def test_bad_inputs_fail_clearly():
    m = PUBLISHED["OLMoE-1B-7B"]
    for call, match in [(lambda: weight_bytes_per_token(m, 0), "batch=0"),
                        (lambda: kv_cache_bytes_per_token(m, bytes_per_value=0), "bytes_per_value=0"),
                        (lambda: expected_experts_read(8, 9, 1), "top_k=9 > n_experts=8"),
                        (lambda: expected_experts_read(8, 2, -1), "batch=-1"),
                        (lambda: from_hf_config({"model_type": "llama", "num_hidden_layers": 2}), "llama"),
                        (lambda: PublishedMoE(100, 32, 2, 4, n_experts=4, top_k=5, expert_hidden=8, n_kv_heads=4,
                                              head_dim=8), "top_k=5"),
                        (lambda: PublishedMoE(100, 32, 2, 4, n_experts=4, top_k=2, expert_hidden=8), "attention"),
                        (lambda: PublishedMoE(100, 32, 2, 4, n_experts=4, top_k=2, expert_hidden=8, n_kv_heads=4,
                                              head_dim=8, n_dense_layers=2), "n_dense_layers=2")]:
        with pytest.raises(ValueError, match=match):
            call()
