"""Multi-head latent attention: equal to transformers' DeepseekV3Attention, its absorbed decoding
equal to its training form, and a cache of kv_lora_rank + qk_rope_head_dim values per token."""

import pytest
import torch

from moe_tutorial.mla import DEEPSEEK_V3, LatentCache, MLAConfig, MultiHeadLatentAttention, kv_cache_values_per_token

TINY = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def hf_attention(q_lora_rank, impl, dtype):
    """transformers' DeepseekV3Attention with the tiny sizes, random weights (std 0.3 so RoPE and
    the softmax matter), and a function (x) -> its output on positions 0 .. T - 1."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    # rope_interleave is left at its default, True: DeepSeek's checkpoints rotate channel pairs (0, 1), (2, 3), ...
    config = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                              rope_scaling=None, attention_dropout=0.0, **TINY)
    config._attn_implementation = impl
    attn = DeepseekV3Attention(config, layer_idx=0).to(dtype).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rotary = DeepseekV3RotaryEmbedding(config)

    def run(x):
        B, T, _ = x.shape
        position_embeddings = rotary(x, torch.arange(T).expand(B, T))
        # eager adds the mask to the scores; sdpa, given None, uses is_causal
        mask = torch.full((T, T), float("-inf"), dtype=dtype).triu(1)[None, None] if impl == "eager" else None
        with torch.no_grad():
            return attn(x, position_embeddings, mask)[0]

    return attn, run


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("impl, dtype, tol", [("eager", torch.float32, 1e-5), ("sdpa", torch.float64, 1e-12)])
def test_equals_transformers_deepseek_v3_attention(q_lora_rank, impl, dtype, tol):
    # fp64 against sdpa: transformers' eager softmax runs in fp32 whatever the dtype, which caps
    # agreement at ~1e-7 (the RMSNorms and RoPE tables are fp32 in both, computed alike).
    hf, run = hf_attention(q_lora_rank, impl, dtype)
    mla = MultiHeadLatentAttention(MLAConfig(n_embd=64, n_head=4, q_lora_rank=q_lora_rank, **TINY)).to(dtype)
    mla.load_state_dict(hf.state_dict(), strict=True)  # same names, same shapes: nothing to translate
    x = torch.randn(2, 7, 64, dtype=dtype)
    with torch.no_grad():
        diff = (mla(x) - run(x)).abs().max().item()
    assert diff < tol, diff


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_absorbed_decoding_equals_the_training_form(q_lora_rank):
    mla = MultiHeadLatentAttention(MLAConfig(q_lora_rank=q_lora_rank))
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 64)
    cache, prefilled = LatentCache(), LatentCache()
    with torch.no_grad():
        full = mla(x)
        one_by_one = torch.cat([mla.forward_absorbed(x[:, t:t + 1], cache) for t in range(7)], dim=1)
        # a 3-token prompt at once, then single tokens: the mask must align to the bottom right
        chunked = torch.cat([mla.forward_absorbed(x[:, :3], prefilled)]
                            + [mla.forward_absorbed(x[:, t:t + 1], prefilled) for t in range(3, 7)], dim=1)
    assert (one_by_one - full).abs().max() < 1e-5
    assert (chunked - full).abs().max() < 1e-5
    assert cache.length == 7


def test_the_cache_holds_the_latent_and_the_shared_rope_key_only():
    config = MLAConfig()
    mla = MultiHeadLatentAttention(config)
    cache = LatentCache()
    with torch.no_grad():
        mla.forward_absorbed(torch.randn(2, 5, config.n_embd), cache)
    assert cache.c_kv.shape == (2, 5, config.kv_lora_rank)
    assert cache.k_rope.shape == (2, 5, config.qk_rope_head_dim)  # one rotary key for all heads
    per_token = cache.c_kv.size(-1) + cache.k_rope.size(-1)
    assert per_token == kv_cache_values_per_token("mla", kv_lora_rank=16, qk_rope_head_dim=4) == 20
    assert DEEPSEEK_V3.kv_lora_rank + DEEPSEEK_V3.qk_rope_head_dim == 576


def test_kv_cache_values_per_token_for_deepseek_v3_sizes():
    # DeepSeek-V2's comparison: 128 heads of 128 channels; V3 has the same attention sizes.
    assert kv_cache_values_per_token("mha", n_head=128, head_dim=128) == 32768
    assert kv_cache_values_per_token("gqa", n_head=128, head_dim=128, n_kv_head=8) == 2048
    assert kv_cache_values_per_token("mqa", head_dim=128) == 256
    assert kv_cache_values_per_token("mla", kv_lora_rank=DEEPSEEK_V3.kv_lora_rank,
                                     qk_rope_head_dim=DEEPSEEK_V3.qk_rope_head_dim) == 576  # = GQA with 2.25 groups


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="mla_v3"), "kind must be one of"),
    (dict(kind="gqa", n_head=128, head_dim=128), "needs n_kv_head"),
    (dict(kind="gqa", n_head=128, head_dim=128, n_kv_head=3), "must divide n_head"),
    (dict(kind="mla", kv_lora_rank=512), "needs qk_rope_head_dim"),
    (dict(kind="mha", n_head=0, head_dim=128), "needs n_head"),
])
def test_kv_cache_values_per_token_names_a_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kv_cache_values_per_token(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(qk_rope_head_dim=5), "must be even.*use 6"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
    (dict(q_lora_rank=-1), "None / 0 for no query compression"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
])
def test_config_validation_names_the_problem_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLAConfig(**kwargs)


def test_no_query_compression_uses_one_projection():
    for rank in (None, 0):
        names = {name for name, _ in MultiHeadLatentAttention(MLAConfig(q_lora_rank=rank)).named_parameters()}
        assert "q_proj.weight" in names and "q_a_proj.weight" not in names


def test_positions_past_the_rope_tables_raise():
    mla = MultiHeadLatentAttention(MLAConfig(block_size=4))
    with pytest.raises(ValueError, match="exceed block_size=4"):
        mla(torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match="exceed block_size=4"):
        mla.forward_absorbed(torch.randn(1, 5, 64), LatentCache())
