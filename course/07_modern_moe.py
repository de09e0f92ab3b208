# %% [markdown]
# # 07 · A modern MoE: from the GPT-2 block to a DeepSeek-V3 / Qwen3-style MoE
#
# **What you will build.** The main ways today's MoEs (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) differ
# from the GPT-2 block of notebooks 01–05, each an option of the same `GPTConfig` / `MoEConfig`:
# RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA), QK-norm, SwiGLU; and in
# the router: sigmoid scores with a selection bias, a routed scaling factor, DeepSeek-V3's
# sequence-wise balance loss, group-limited routing, dense first blocks and a warm-up. RMSNorm, RoPE,
# grouped-query attention, SwiGLU and the DeepSeek-V3 router are built from scratch and asserted equal
# to the package; the rest is shown with the package's code.
#
# **What you will measure.** What RoPE's dot product depends on; the KV cache of multi-head,
# grouped-query and multi-query attention at GPT-2-small's shape; attention logits with and without
# QK-norm; GPT-2's block against the modern one on Shakespeare (3 seeds); how group-limited routing
# caps the number of devices a token is sent to, and what it costs a trained model; the modern MoE
# against the modern dense model with Muon on the experts, at equal steps and equal time.
#
# **Objectives**
# 1. Build RMSNorm, RoPE, GQA, QK-norm and SwiGLU, and say what each buys.
# 2. Route like DeepSeek-V3: sigmoid affinities, bias for selection only, normalised and scaled weights.
# 3. Limit each token to a few expert groups, and connect that to notebook 06's all-to-all.
# 4. Read the comparison of the two blocks at equal parameters, and of AdamW and Muon, with seeds.
# 5. Give each expert's matrix its own Muon update, and see whether the modern MoE then beats dense.
#
# The package's model loads Llama, Mixtral, Qwen3-MoE and OLMoE checkpoints with these options
# (`moe_tutorial.hf_models`; notebook 08 opens a real one). Solutions: `solutions/07_modern_moe_solutions.ipynb`.

# %% solutions
import dataclasses
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · RMSNorm
# LayerNorm subtracts the mean, divides by the standard deviation, then scales and shifts.
# RMSNorm (Zhang & Sennrich 2019) keeps only the scaling: `x / sqrt(mean(x²) + eps) · weight`.
# One reduction instead of two, no bias, and in the paper's experiments comparable quality: every
# modern model in this notebook uses it. Llama's implementation computes the statistics in fp32 and
# casts back to the input's dtype *before* multiplying by the weight — the order matters for matching a
# bf16 checkpoint bit for bit, so ours does the same.

# %%
from moe_tutorial.norms import RMSNorm


def rms_norm(x, weight, eps=1e-6):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


x = torch.randn(4, 16, 64) * 3 + 1.5  # mean 1.5: LayerNorm would remove it, RMSNorm keeps it
norm = RMSNorm(64)
with torch.no_grad():
    norm.weight.normal_()
assert torch.equal(rms_norm(x, norm.weight), norm(x))
print(f"mean of RMSNorm(x) with unit weight: {rms_norm(x, torch.ones(64)).mean():.3f} "
      f"(LayerNorm: {F.layer_norm(x, (64,)).mean():.3f})")

# %% [markdown]
# ## 2 · Rotary position embeddings
# GPT-2 adds a learned vector per position to the input. RoPE (Su et al. 2021) adds nothing: it
# **rotates** each query and key by an angle proportional to its position. Split a head's D channels
# into D/2 pairs; pair j turns by `pos · θ_j` with `θ_j = base^(−2j/D)` — fast for j = 0 (one turn
# every 2π positions), slow for the last pairs (base = 10,000 here; Mixtral and Qwen3 use 10⁶ for
# long contexts).
#
# Why it works: rotations preserve dot products up to their *difference*. If q at position m is
# turned by mθ and k at position n by nθ, then `⟨R(mθ)q, R(nθ)k⟩ = ⟨q, R((n−m)θ)k⟩`: the attention
# score sees the distance n − m, never m or n. Relative position falls out of the dot product and
# there are no position parameters to learn. (It does not make a model work past the lengths it was
# trained on: Qwen3 and DeepSeek-V3 stretch RoPE's frequencies with YaRN for that; the package
# implements the default rotation only and refuses checkpoints that ask for scaling.)
#
# Layout: Hugging Face-format checkpoints pair channel j with channel j + D/2 (`rotate_half`), not
# neighbours (2j, 2j+1) as in the paper and in Meta's original Llama code — the same rotation on
# permuted channels: converting weights between the layouts permutes the rows of the query and key
# projections, and weights used with the other layout give wrong outputs.

# %% [markdown] solutions
# ### ✍️ Exercise 1 — apply RoPE
# Rotate `x` (B, H, T, D) whose tokens sit at positions `start, start+1, …`, with base `theta`: in the
# Hugging Face layout, channel pair (j, j + D/2) of the token at position p turns by the angle
# `p · theta^(−2j/D)`.

# %% solutions
def rope(x, start, theta):
    """x (B, H, T, D) -> x with channel pair (j, j + D/2) of position p turned by p * theta^(-2j/D)."""
    # BEGIN SOLUTION
    T, D = x.size(-2), x.size(-1)
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = torch.outer(torch.arange(start, start + T, dtype=torch.float32), freqs)  # (T, D/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (T, D): pair j at j and j + D/2
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch07 import check_rope

passed = check_rope(rope)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `cat(−x2, x1)` is `rotate_half`: with the angle of pair j written at both j and
# j + D/2 (`repeat(1, 2)`), `x·cos + rotate_half(x)·sin` maps (x_j, x_{j+D/2}) to
# (x_j cos − x_{j+D/2} sin, x_{j+D/2} cos + x_j sin), a 2-D rotation of each pair by its own angle.
# The positions run from `start`, so tokens after a KV cache are turned by their true positions.
#
# **Wrong answers the check catches:** positions counted from 0 instead of `start`; neighbouring
# channels paired, (0, 1), (2, 3), … (the paper's layout: right in itself, wrong for these weights);
# `rotate_half` without its minus sign (not a rotation: vector lengths change); a rotation the wrong
# way, `x·cos − rotate_half(x)·sin` (lengths kept, values wrong); `theta` ignored, e.g. 10,000
# hard-coded (a second case uses `theta = 1e6`).

# %% [markdown]
# The package's version (`moe_tutorial.rope`) computes the cos/sin tables once for every position
# up to `block_size` and slices them per forward pass; the KV cache passes `start` = the number of
# cached tokens. Check the relative-position claim on random vectors:

# %%
from moe_tutorial.rope import RotaryEmbedding, apply_rope

rotary = RotaryEmbedding(head_dim=64, max_positions=512)
q, k = torch.randn(64), torch.randn(64)


def score(m, n):  # q at position m, k at position n
    return (apply_rope(q, *rotary(m, 1))[0] @ apply_rope(k, *rotary(n, 1))[0]).item()


same_distance = [score(m, m - 7) for m in (7, 50, 300, 500)]
print("scores at distance 7 from positions 7, 50, 300, 500:", [f"{s:.4f}" for s in same_distance])
assert max(same_distance) - min(same_distance) < 1e-3
distances = torch.arange(0, 200)
fig, ax = plt.subplots(figsize=(7, 2.8))
for m, style in ((200, "-"), (300, "--"), (500, ":")):  # the query at three positions: one curve
    ax.plot(distances, [score(m, m - int(d)) for d in distances], style, label=f"query at position {m}")
ax.set(xlabel="distance m − n", ylabel="q·k after RoPE", title="One (q, k) pair: the score depends on distance only")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 3 · Grouped-query attention and the KV cache
# During generation every layer keeps the keys and values of every past token (notebook 05). With
# `n_head` heads of size D that is `2 · n_layer · n_head · D · T` numbers per sequence, growing with
# context length × batch size — at long contexts and large batches it outgrows the weights.
# **Grouped-query attention** (Ainslie et al. 2023) keeps all query heads but only `n_kv_head`
# key/value heads; query head h reads kv head `h // (n_head / n_kv_head)`. `n_kv_head = 1` is
# **multi-query attention** (Shazeer 2019), `n_kv_head = n_head` is ordinary multi-head attention.
# Mixtral uses 8 kv heads for 32 query heads, Qwen3-30B-A3B 4 for 32.

# %% [markdown] solutions
# ### ✍️ Exercise 2 — share key/value heads
# Expand `kv` (B, KV, T, D) to (B, KV · n_rep, T, D) so that query head h finds its kv head at index h:
# query head h reads kv head `h // n_rep`, so each kv head is repeated `n_rep` times in place.

# %% solutions
def repeat_kv_heads(kv, n_rep):
    """(B, KV, T, D) -> (B, KV * n_rep, T, D), each kv head repeated for its n_rep query heads."""
    # BEGIN SOLUTION
    B, KV, T, D = kv.shape
    return kv[:, :, None].expand(B, KV, n_rep, T, D).reshape(B, KV * n_rep, T, D)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch07 import check_repeat_kv

passed = check_repeat_kv(repeat_kv_heads)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `kv[:, :, None]` adds an axis right after the kv heads; `expand` repeats along it
# without copying memory, and `reshape` flattens (KV, n_rep) in row-major order, so the copies of kv
# head g land at indices g·n_rep … g·n_rep + n_rep − 1: exactly the query heads h with h // n_rep = g.
#
# **Wrong answers the check catches:** `kv.repeat(1, n_rep, 1, 1)`, which tiles the heads as
# 0, 1, 2, 0, 1, 2; returning `kv` unchanged (wrong shape); repeating along the time axis and then
# reshaping (right shape, keys and values moved to the wrong heads and positions); an answer that only
# works for n_rep = 2 (n_rep = 1 must return the heads unchanged).

# %% [markdown]
# The cache at GPT-2-small's shape (12 layers, 12 heads of 64, a 1,024-token context, bf16), computed
# from the formula and measured on the package's `KVCache` tensors:

# %%
from moe_tutorial.config import GPTConfig
from moe_tutorial.kv_cache import KVCache

gpt2_small = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
print(f"{'attention':<22}{'kv heads':>9}{'formula MiB':>13}{'measured MiB':>14}{'vs MHA':>8}")
cache_mib = {}
for name, n_kv in (("multi-head (GPT-2)", 12), ("grouped-query, 4", 4), ("grouped-query, 2", 2), ("multi-query", 1)):
    config = GPTConfig(**gpt2_small, n_kv_head=n_kv)
    formula = 2 * config.n_layer * n_kv * config.head_dim * config.block_size * 2  # bytes, bf16, one sequence
    cache = KVCache(config, batch_size=1, dtype=torch.bfloat16)
    measured = (cache.k.numel() + cache.v.numel()) * cache.k.element_size()
    assert measured == formula
    cache_mib[n_kv] = measured / 2**20
    ratio = cache_mib[12] / cache_mib[n_kv]
    print(f"{name:<22}{n_kv:>9}{formula / 2**20:>13.1f}{measured / 2**20:>14.1f}{ratio:>7.0f}×")

# %% [markdown]
# The package's attention (`model.CausalSelfAttention`) stores only the kv heads in the cache and
# repeats them just before the scores. Build one from scratch with RoPE and GQA and assert it
# computes the package's output from the same weights:

# %%
from moe_tutorial.attention import repeat_kv
from moe_tutorial.model import CausalSelfAttention

config = GPTConfig(n_embd=64, n_head=8, n_kv_head=2, norm="rmsnorm", position="rope", block_size=32)
attn = CausalSelfAttention(config)
x = torch.randn(2, 32, 64)
cos, sin = RotaryEmbedding(config.head_dim, 32)(0, 32)


def gqa_attention(x, c_attn, c_proj, n_head, n_kv_head):
    B, T, C = x.shape
    hs = C // n_head
    q, k, v = c_attn(x).split([C, n_kv_head * hs, n_kv_head * hs], dim=2)
    q = apply_rope(q.view(B, T, n_head, hs).transpose(1, 2), cos, sin)  # (B, nh, T, hs)
    k = apply_rope(k.view(B, T, n_kv_head, hs).transpose(1, 2), cos, sin)  # (B, n_kv, T, hs)
    v = v.view(B, T, n_kv_head, hs).transpose(1, 2)
    rep = n_head // n_kv_head
    y = F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), is_causal=True)
    return c_proj(y.transpose(1, 2).reshape(B, T, C))


with torch.no_grad():
    ours = gqa_attention(x, attn.c_attn, attn.c_proj, 8, 2)
    assert torch.allclose(ours, attn(x, rope=(cos, sin)), atol=1e-6)
print(f"c_attn: {attn.c_attn.weight.shape[0]} outputs (64 for q, 16 each for k and v) instead of {3 * 64}")

# %% [markdown]
# ### Multi-head latent attention
# DeepSeek-V2 and V3 shrink the cache another way: **MLA** (DeepSeek-AI 2024). Each token is projected
# down to one latent `c_kv` (512 values in V3), and every head's key and value are up-projections of
# it, so only the latent is cached. Decoding multiplies the key up-projection into the query once,
# instead of into every cached latent (below). A rotation by position would sit between the two and
# stop that: every cached token's keys would have to be rebuilt at every step. So MLA adds a few
# *decoupled* rotary channels, one rotated key per token (64 values in V3) shared by all heads, beside
# each head's position-free channels. When
# decoding, the key up-projection is absorbed into the query and the value up-projection is applied
# after the attention-weighted sum of latents: per-head keys and values are never built.
# `moe_tutorial/mla.py` has both forms, tested equal to transformers' `DeepseekV3Attention` on the
# same weights. The absorbed form, one token at a time, against the training form:

# %%
from moe_tutorial.mla import DEEPSEEK_V3, LatentCache, MLAConfig, MultiHeadLatentAttention, kv_cache_values_per_token

torch.manual_seed(0)
mla = MultiHeadLatentAttention(MLAConfig()).eval()  # tiny: 4 heads, a 16-value latent, 4 rotary channels
x = torch.randn(1, 10, 64)
cache = LatentCache()
with torch.no_grad():
    whole = mla(x)
    one_by_one = torch.cat([mla.forward_absorbed(x[:, t:t + 1], cache) for t in range(10)], dim=1)
print(f"max |absorbed - training form| {(one_by_one - whole).abs().max():.1e}; "
      f"cached per token: {cache.c_kv.size(-1)} latent + {cache.k_rope.size(-1)} rotary values")
assert torch.allclose(one_by_one, whole, atol=1e-5)

v3 = DEEPSEEK_V3
kinds = {"multi-head (128 heads of 128)": kv_cache_values_per_token("mha", n_head=v3.n_head, head_dim=128),
         "grouped-query, 8 kv heads": kv_cache_values_per_token("gqa", n_head=v3.n_head, head_dim=128, n_kv_head=8),
         "multi-query": kv_cache_values_per_token("mqa", head_dim=128),
         "multi-head latent (V3)": kv_cache_values_per_token("mla", kv_lora_rank=v3.kv_lora_rank,
                                                             qk_rope_head_dim=v3.qk_rope_head_dim)}
print(f"{'cached values per token and layer':<34}{'values':>8}{'vs MHA':>8}")
for name, values in kinds.items():
    print(f"{name:<34}{values:>8,}{kinds['multi-head (128 heads of 128)'] / values:>7.0f}×")
assert kinds["multi-head latent (V3)"] == 576 < kinds["grouped-query, 8 kv heads"]

# %% [markdown]
# MLA caches less than grouped-query attention with 8 kv heads, yet each head's position-free key and
# its value are its own up-projections of the latent (the rotary key is shared by all heads, as in
# multi-query attention). Seen from the cache, absorbed MLA is multi-query attention with a 576-wide
# shared key and a 512-wide shared value. The price is compute: the absorbed query lives in the
# 512-wide latent space, so each score costs more. Decoding is bound by memory, not arithmetic
# (notebook 05), so trading arithmetic for cache bytes pays.

# %% [markdown] solutions
# ### ✍️ Exercise 3 — attend from the latent cache
# One decoding step of MLA for one new token, without its rotary channels. Head h's key for a cached
# token is `W_UK[h] @ c` and its value `W_UV[h] @ c`, where `c` is the token's cached latent. Given the
# new token's position-free queries `q_nope` (H, nope), the cached latents `c_kv` (S, r), the
# up-projections `w_uk` (H, nope, r) and `w_uv` (H, v, r), and the score scale, return every head's
# output (H, v): softmax over the S cached tokens of `scale · q·k`, then the weighted sum of the values.
# Build no per-head key or value: the check watches the shapes of the tensors you create.

# %% solutions
def attend_from_latents(q_nope, c_kv, w_uk, w_uv, scale):
    """(H, nope), (S, r), (H, nope, r), (H, v, r), scale -> (H, v), through the latents only."""
    # BEGIN SOLUTION
    q_latent = torch.einsum("hd,hdr->hr", q_nope, w_uk)  # (H, r): q . (W_UK c) = (q W_UK) . c
    probs = torch.softmax(q_latent @ c_kv.T * scale, dim=-1)  # (H, S)
    mixed = probs @ c_kv  # (H, r): the weighted sum of latents, once per head
    return torch.einsum("hr,hvr->hv", mixed, w_uv)  # W_UV applied once, after the sum
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch07 import check_mla_absorbed

passed = check_mla_absorbed(attend_from_latents)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** A score is `q · (W_UK c) = (W_UKᵀ q) · c`: multiply the query by `W_UK` once, and
# it scores every cached latent directly, an r-wide dot product per token instead of a key. The output
# is `Σ p_s W_UV c_s = W_UV (Σ p_s c_s)`: sum the latents first, then up-project once. Both moves are
# associativity of matrix products; what they save is building S keys and values per head at every
# step. In a real model `W_UV` folds further into the output projection.
#
# **Wrong answers the check catches:** building the keys (or only the values) per head and cached
# token; forgetting the scale; a softmax over the heads instead of the cached tokens; returning the
# weighted latents without the value up-projection.

# %% [markdown]
# ## 4 · QK-norm
# Attention logits are `q·k / √D`. If training inflates the query and key projections, logits grow,
# the softmax saturates to one-hot and gradients vanish — a known cause of loss spikes in large runs
# (Dehghani et al. 2023). **QK-norm** applies an RMSNorm to queries and keys before RoPE, so their
# scale is set by the norms' learned gains, not by the projections. Qwen3 normalises each head's
# vector (over D); OLMoE normalises the whole projection (over n_head · D) before splitting heads.
# Both are `GPTConfig.qk_norm` ("head", "projection").

# %%
def largest_logit(qk_norm, scale):
    torch.manual_seed(0)
    layer = CausalSelfAttention(GPTConfig(n_embd=64, n_head=4, norm="rmsnorm", qk_norm=qk_norm))
    with torch.no_grad():
        layer.c_attn.weight.mul_(scale)  # as if training had inflated the projections
        q, k, _ = layer.c_attn(torch.randn(1, 16, 64)).split(64, dim=2)
        if qk_norm == "projection":
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = q.view(16, 4, 16).transpose(0, 1), k.view(16, 4, 16).transpose(0, 1)  # (nh, T, hs)
        if qk_norm == "head":
            q, k = layer.q_norm(q), layer.k_norm(k)
        return (q @ k.transpose(1, 2) / 4).abs().max().item()


print(f"{'projection scale':>17}{'no QK-norm':>12}{'per head':>10}{'projection':>12}")
rows = {}
for scale in (1, 10, 100):
    rows[scale] = row = [largest_logit(mode, scale) for mode in ("none", "head", "projection")]
    print(f"{scale:>17}{row[0]:>12.1f}{row[1]:>10.2f}{row[2]:>12.2f}")
assert rows[100][0] > 1000 and rows[100][1] <= math.sqrt(16) + 1e-4  # |q·k|/√D ≤ √D for unit-RMS q and k
# with either QK-norm the logits do not move with the projections' scale (up to the norms' eps)
assert all(abs(rows[100][i] - rows[1][i]) < 1e-3 * rows[1][i] for i in (1, 2))

# %% [markdown]
# Per head, each query and key has RMS 1 (length √D) before the gains, so by Cauchy–Schwarz
# `|q·k| / √D ≤ √D · max|γ_q| · max|γ_k|` — 4 here, with the gains at their initial 1 (the assert
# checks that the norm is applied). Over the whole projection (OLMoE) the bound is looser: one head
# may carry all of the vector's energy, up to `√(n_head · D)` long. Either way the projections' scale
# no longer reaches the softmax: the learned gains set the temperature.
#
# ## 5 · SwiGLU
# GPT-2's MLP is `down(gelu(up(x)))`. Llama-family models use a gated unit (Shazeer 2020):
# `down(silu(gate(x)) ⊙ up(x))` — the gate half decides per hidden unit how much of the up half
# passes. Three matrices instead of two, so at the same parameter count the hidden width is 8C/3
# instead of 4C (`GPTConfig.default_hidden` rounds it to a multiple of 16). The package fuses gate
# and up into one `c_fc` of width 2H (`[gate | up]`), the layout of transformers' fused experts.

# %%
from moe_tutorial.costs import model_info
from moe_tutorial.model import MLP

config = GPTConfig(n_embd=384, n_head=6, activation="swiglu")
mlp = MLP(config)
x = torch.randn(2, 10, 384)
gate_w, up_w = mlp.c_fc.weight.split(config.mlp_width)
with torch.no_grad():
    assert torch.allclose(F.silu(x @ gate_w.T) * (x @ up_w.T) @ mlp.c_proj.weight.T, mlp(x).out, atol=1e-5)
gelu_params = model_info(GPTConfig(n_embd=384, n_head=6)).total_params
print(f"hidden width {config.mlp_width} (8C/3 at C = 384); model parameters: SwiGLU "
      f"{model_info(config).total_params:,}, GELU {gelu_params:,}")
assert model_info(config).total_params == gelu_params

# %% [markdown]
# ## 6 · The blocks compared on Shakespeare
# The modern block is `GPTConfig(norm="rmsnorm", position="rope", activation="swiglu", qk_norm="head")`:
# the same attention and MLP slots, same names, same training loop. (With `qk_norm="head"` it is
# Qwen3's block; Llama and Mixtral have no QK-norm, and OLMoE normalises the whole query and key
# projections, not each head. DeepSeek-V3 replaces the attention with multi-head latent attention,
# MLA, which caches one compressed latent per token instead of sharing key/value heads.) Below, GPT-2's block and the
# modern one at (almost) equal parameters (no position table; SwiGLU width 336 ≈ 8C/3), the `char`
# recipe cut to 300 steps so that six runs fit in this notebook, three seeds each. A difference
# under 2 sd of the difference is a tie. (Here and below, that sd combines the two sides' per-run sds,
# sqrt(sd_a² + sd_b²): more cautious than a test on the difference of the means.)
# `benchmarks/modern_block.py` runs the full 1800-step recipe, dense and MoE (table in section 9).

# %%
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import MODERN_BLOCK, preset
from moe_tutorial.train import train

dataset = shakespeare_dataset()
val_batches = fixed_batches(dataset.split("val"), 40, 16, 64, seed=0)
MODERN = MODERN_BLOCK
assert MODERN == dict(norm="rmsnorm", position="rope", activation="swiglu", qk_norm="head")
SEEDS, STEPS = (1337, 1338, 1339), 300


def run(block, seed, moe=None, steps=STEPS):
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, progress=False, seed=seed,
                                  max_iters=steps, eval_interval=steps, eval_iters=1)
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(model_cfg, **block, moe=moe))
    history = train(model, dataset, train_cfg)
    return model, estimate_loss(model, val_batches, train_cfg), history.elapsed


# %%
# NBVAL_IGNORE_OUTPUT
results = {"GPT-2 block": [], "modern block": []}
seconds = {name: 0.0 for name in results}
for seed in SEEDS:
    for name, block in (("GPT-2 block", {}), ("modern block", MODERN)):
        _, val, elapsed = run(block, seed)
        results[name].append(val)
        seconds[name] += elapsed
        print(f"{name:<14} seed {seed}: val {val:.4f} ({elapsed:.0f} s)")

# %%
from statistics import mean, stdev

from moe_tutorial.seeds import verdict  # 'lower' / 'higher' beyond 2 sd (combined per-run sd), else 'tie'

params = {name: model_info(dataclasses.replace(preset("char", 65)[0], **block)).total_params
          for name, block in (("GPT-2 block", {}), ("modern block", MODERN))}
for name, vals in results.items():
    print(f"{name:<14} val {mean(vals):.4f} ± {stdev(vals):.4f} (3 seeds, {STEPS} steps), "
          f"{params[name]:,} parameters, {seconds[name] / 3:.0f} s per run")
block_call = verdict(results["modern block"], results["GPT-2 block"])
print(f"modern − GPT-2: {mean(results['modern block']) - mean(results['GPT-2 block']):+.4f} → "
      + {"tie": "a tie (under 2 sd)", "lower": "the modern block is lower by more than 2 sd",
         "higher": "the modern block is higher by more than 2 sd"}[block_call])
assert all(1.5 < v < 2.6 for vals in results.values() for v in vals)  # both trained: far below ln(65) = 4.17

# %% [markdown]
# At 300 steps the models are far from converged, so it says which block learns faster early, not which ends better —
# that is what section 9's full-recipe benchmark is for.
#
# ### The optimizer: Muon
# Today's models are also trained differently. **Muon** (Jordan et al. 2024; used at scale for
# Moonshot's Kimi K2) keeps SGD-momentum's update for each hidden weight matrix but replaces it by the
# nearest semi-orthogonal matrix (five Newton–Schulz iterations): every direction of the matrix moves
# by the same amount, instead of the few that dominate the gradient. It is `torch.optim.Muon` in
# PyTorch ≥ 2.9, and `TrainConfig(optimizer="muon")` here (`moe_tutorial/optimizers.py`): the blocks'
# 2-D matrices get Muon, embeddings, norms and routers keep AdamW, and with `adjust_lr_fn=
# "match_rms_adamw"` (Liu et al. 2025) both share one learning rate and schedule. An MoE's experts are
# stacked in 3-D tensors, which `torch.optim.Muon` does not take: here they stay on AdamW (section
# 10 gives them Muon), while Moonlight and Kimi K2 orthogonalise each expert's matrix on its own. The
# modern block again, same seeds and steps, Muon instead of AdamW:

# %%
# NBVAL_IGNORE_OUTPUT
results["modern block + Muon"] = []
seconds["modern block + Muon"] = 0.0
for seed in SEEDS:
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, progress=False, seed=seed, max_iters=STEPS,
                                  eval_interval=STEPS, eval_iters=1, optimizer="muon")
    torch.manual_seed(seed)
    muon_model = GPT(dataclasses.replace(model_cfg, **MODERN))
    history = train(muon_model, dataset, train_cfg)
    results["modern block + Muon"].append(estimate_loss(muon_model, val_batches, train_cfg))
    seconds["modern block + Muon"] += history.elapsed
    print(f"modern + Muon  seed {seed}: val {results['modern block + Muon'][-1]:.4f} ({history.elapsed:.0f} s)")

# %%
muon_vals = results["modern block + Muon"]
muon_call = verdict(muon_vals, results["modern block"])
print(f"modern block + Muon: val {mean(muon_vals):.4f} ± {stdev(muon_vals):.4f}, "
      f"{seconds['modern block + Muon'] / 3:.0f} s per run")
print(f"Muon − AdamW: {mean(muon_vals) - mean(results['modern block']):+.4f} → "
      + {"tie": "a tie (under 2 sd)", "lower": "Muon is lower by more than 2 sd",
         "higher": "Muon is higher by more than 2 sd"}[muon_call])
assert all(1.4 < v < 2.6 for v in muon_vals)

# %% [markdown]
# Whether the two changes add up on the whole `char` recipe is measured outside this notebook:
# `python benchmarks/char_gpt.py --seeds 3` trains nanoGPT's CPU recipe, the course's `char` preset and
# `char-modern` (modern block + Muon, as many steps as fit the reference's wall time) in one run, and
# compares their validation losses and wall times; the README lists its table.
#
# ## 7 · DeepSeek-V3's router
# Three changes to the softmax top-k router of notebooks 03–04 (DeepSeek-V3 report, §2.1.2; V3 has
# 256 routed experts of which 8 are active, plus 1 shared expert):
# 1. **Sigmoid affinities.** `s_i = sigmoid(u·e_i)` per expert, each computed on its own. (The report
#    gives no reason; a common reading is that with 256 experts a softmax over all of them makes every
#    score tiny, while sigmoid scores keep their scale.)
# 2. **Bias for selection only** (aux-loss-free balancing, notebook 04): choose the top-k of
#    `s_i + b_i`, but weight each chosen expert by its unbiased `s_i`. The bias moves toward balance
#    after every step; the gradient never sees it.
# 3. **Normalise, then scale**: the chosen weights are divided by their sum (so, among the chosen,
#    they do compete) and multiplied by a routed scaling factor — 2.5 in V3's `config.json`
#    (`routed_scaling_factor`, `route_scale` in its inference code), not a number the report discusses.
#
# Not every modern MoE routes this way. Qwen3-MoE keeps a softmax over its 128 experts, takes the top
# 8 and renormalises them (`norm_topk_prob` in its config), Mixtral's rule at a finer grain, with a
# small balancing loss. Nor do they agree on the router z-loss: OLMoE trains with ST-MoE's z-loss
# (coefficient 1e-3, beside a balancing loss), while DeepSeek-V3 and Qwen3 use none.

# %% [markdown] solutions
# ### ✍️ Exercise 4 — sigmoid top-k with a bias
# From logits (N, E) and a bias (E,), return the chosen experts (N, k) and their weights (N, k):
# choose the `top_k` experts of `sigmoid(logits) + bias`; weight each by its unbiased sigmoid score,
# divided by the sum over the chosen experts and multiplied by `scaling`.

# %% solutions
def sigmoid_topk(logits, bias, top_k, scaling):
    """-> (experts (N, k), weights (N, k)): chosen by sigmoid + bias, weighted by sigmoid, normalised, scaled."""
    # BEGIN SOLUTION
    scores = torch.sigmoid(logits)
    experts = torch.topk(scores + bias, top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    return experts, scaling * weights / weights.sum(dim=-1, keepdim=True)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch07 import check_sigmoid_topk

passed = check_sigmoid_topk(sigmoid_topk)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** The bias enters only `topk`'s input, so it changes *which* experts are chosen and
# nothing else; the weights are gathered from the unbiased scores, so the gradient never sees the
# bias. Dividing by their sum makes the chosen weights sum to 1, and `scaling` then sets their total.
# (The check sorts the k experts, so any order of the chosen experts is accepted.)
#
# **Wrong answers the check catches:** choosing by `sigmoid(logits)` without the bias; weights taken
# from the biased scores `sigmoid(logits) + bias`; weights not multiplied by `scaling` (they sum to 1);
# weights not normalised (scaled raw sigmoid scores); softmax instead of sigmoid scores.

# %% [markdown]
# DeepSeek-V3 drops the batch-wide auxiliary loss but keeps a tiny **sequence-wise** one (α = 1e-4),
# so that no single sequence piles onto a few experts: per sequence of T tokens,
# `f_i = E/(k·T) · #{tokens choosing i}`, `P_i = mean_t s_i,t / Σ_j s_j,t`, loss `α Σ_i f_i P_i`
# (its sum is 1 when the choices are balanced — not its minimum: what balances is the gradient
# through `P`). From scratch, against the package:

# %%
from moe_tutorial.router import limit_to_groups, sequence_balance_loss

B, T, E, k = 4, 32, 16, 2
affinity = torch.rand(B * T, E)
experts = (affinity + 0.1 * torch.randn(E)).topk(k, dim=1).indices
one_hot = F.one_hot(experts, E).sum(1).view(B, T, E).float()  # (B, T, E): 1 where token t chose expert i
f = E / (k * T) * one_hot.sum(1)  # (B, E)
P = (affinity / affinity.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
from_scratch = (f * P).sum(1).mean()
assert torch.allclose(from_scratch, sequence_balance_loss(affinity, experts, T))
print(f"sequence-wise balance loss: {from_scratch:.4f} (1 = perfectly balanced)")

# %% [markdown]
# ## 8 · Group-limited routing
# In expert parallelism (notebook 06) the experts are spread over devices, and a token is sent to
# every device that holds one of its experts. In DeepSeek-V3 a group is a *node* of 8 GPUs: with k = 8
# of 256 experts over 8 nodes, a token could need all 8 nodes. V3 scores each group by the sum of its
# two best (biased) expert scores, keeps the `topk_group` best groups (4 of 8 nodes), and picks the k
# experts only inside them: each token crosses the slow inter-node network to at most 4 nodes (inside
# a node it is forwarded over NVLink to whichever GPUs it needs). From scratch:

# %%
def limit_groups(scores, n_group, topk_group):
    N, E = scores.shape
    grouped = scores.view(N, n_group, E // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
    keep = torch.zeros(N, n_group, dtype=torch.bool).scatter(1, group_score.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)


scores = torch.rand(1000, 16)
assert torch.equal(limit_groups(scores, 4, 2), limit_to_groups(scores, 4, 2))

# %% [markdown]
# What it does to a trained router: train a modern MoE with fine-grained experts (32 of width 84,
# top-4: 4 · 84 = 336, the dense SwiGLU MLP's width and compute per token), sigmoid + bias and the
# sequence-wise loss, with no group limit and, unlike V3, no shared expert; then route its
# validation tokens with and without a limit of 2 of 8 groups (think: 8 devices holding 4 experts
# each). One model, one seed: this measures the limit's effect on *this* router, not a training
# comparison.

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.config import MoEConfig

DEEPSEEK = dict(n_experts=32, top_k=4, expert_hidden=84, scoring="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0,
                seq_aux_loss_coef=1e-4, bias_update_rate=1e-3)
moe_model, moe_val, moe_seconds = run(MODERN, SEEDS[0], moe=MoEConfig(**DEEPSEEK))
print(f"modern MoE, 32 experts top-4, sigmoid + bias: val {moe_val:.4f} after {STEPS} steps ({moe_seconds:.0f} s)")
print(f"modern dense block, same steps: {mean(results['modern block']):.4f} ± {stdev(results['modern block']):.4f} "
      "(3 seeds; one MoE seed is not ranked against it)")

# %%
from moe_tutorial.moe import override_routing

N_GROUP = 8  # groups of 32 / 8 = 4 experts


def route_validation(model, n_group, topk_group):
    """Per MoE layer, the groups each validation token sends to (N,) and each group's share of the
    assignments (G,); and the val loss."""
    model.eval()  # train() leaves the model in training mode
    with override_routing(model, groups=(n_group, topk_group)):  # imposed for a while: the router is not changed
        val = estimate_loss(model, val_batches, preset("char", 65)[1])
        routings = model(val_batches[0][0], return_routing=True).routing  # one batch, to look at its assignments
    group_size = 32 // N_GROUP
    groups = [F.one_hot(r.expert // group_size, N_GROUP) for r in routings]  # (N, k, G) each
    fan_out = [g.amax(1).sum(1) for g in groups]  # (N,): groups a token sends to
    load = [g.sum((0, 1)).float() / g.sum() for g in groups]  # (G,): share of assignments per group
    return fan_out, load, val


unlimited, load_free, val_unlimited = route_validation(moe_model, 1, 1)
limited, load_capped, val_limited = route_validation(moe_model, N_GROUP, 2)
print(f"{'MoE layer':<10}{'groups per token (mean, max)':>30}{'with the limit':>18}"
      f"{'busiest group':>15}{'with limit':>12}")
for layer, (free, capped) in enumerate(zip(unlimited, limited)):
    free_mean, capped_mean = free.float().mean(), capped.float().mean()
    print(f"{layer:<10}{free_mean:>24.2f}, {int(free.max())}{capped_mean:>14.2f}, {int(capped.max())}"
          f"{load_free[layer].max():>14.1%}{load_capped[layer].max():>12.1%}")
    assert int(capped.max()) <= 2
print(f"(an even split gives each of the {N_GROUP} groups {1 / N_GROUP:.1%} of the assignments)")
share_over_2 = mean(float((free > 2).float().mean()) for free in unlimited)
print(f"without the limit {100 * share_over_2:.0f}% of tokens send to more than 2 of the 8 groups")
print(f"validation loss: {val_unlimited:.4f} unlimited, {val_limited:.4f} with the limit imposed after training "
      f"({val_limited - val_unlimited:+.4f})")
assert share_over_2 > 0.2 and val_limited > val_unlimited

# %% [markdown]
# Left free, a token's four experts often sit in three or four groups (the share printed above):
# three or four devices' worth of all-to-all traffic for that token. The limit caps that at two.
# Imposed on this router, which never trained with it, it changes the validation loss by the amount
# printed above (one model: not a comparison between training runs). The limit can move even a token
# whose experts already sat in two groups: groups are ranked by the sum of their two best scores, so
# the group of a token's single best expert can lose to one with two good experts. DeepSeek-V3 trains
# with the limit from the start, so its router learns to choose within the groups it keeps; section 9
# compares a model trained with a limit (2 of 4 groups) against one trained without, three seeds each.
#
# The remaining options, all `MoEConfig` fields (tested in `tests/test_modern_block.py`):
# - `first_k_dense`: the first blocks keep a dense MLP (DeepSeek-V3: 3 of 61). DeepSeekMoE gives the
#   reason: the first layer's load balance converges especially slowly.
# - `aux_loss_warmup_steps`: the balancing losses ramp in linearly; `min_capacity` / `max_capacity`
#   bound each expert's slots (a small batch still gets a few slots per expert; a burst cannot claim all).

# %%
moe_cfg = MoEConfig(n_experts=16, top_k=2, first_k_dense=1, aux_loss_warmup_steps=4)
cfg = GPTConfig(n_layer=4, **MODERN, moe=moe_cfg)
print("MoE blocks:", [cfg.is_moe_layer(i) for i in range(4)])
warm = GPT(cfg)
ramp = []
for step in range(6):
    ramp.append(float(warm.moe_layers()[0].router.warmup_ramp()))
    warm.after_optimizer_step()
print("balancing-loss weight over the first steps:", ramp)
assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]

# %% [markdown]
# ## 9 · The full-recipe comparison
# `python benchmarks/modern_block.py` trains each variant on the whole `char` recipe (1800 steps)
# with three seeds and appends every run to `benchmarks/results/modern_block.json`; the GPT-2-block
# rows come from the experts sweep of notebook 04 (`moe_scaling.json`, same recipe and seeds). The
# table below is read from those files; a row with fewer than 3 seeds gets no verdict.

# %%
import sys

import moe_tutorial

REPO = Path(moe_tutorial.__file__).resolve().parent.parent  # the checkout the package is installed from
bench, sweep = REPO / "benchmarks/results/modern_block.json", REPO / "benchmarks/results/moe_scaling.json"
assert bench.exists() and sweep.exists(), "run python benchmarks/modern_block.py from the repository's root"
sys.path.insert(0, str(REPO / "benchmarks"))
import modern_block

rows = modern_block.table(json.loads(bench.read_text())["runs"], json.loads(sweep.read_text())["runs"])
print(f"{'variant':<44}{'n':>2}{'val loss':>18}  {'compared with':<26}{'diff':>8}  verdict")
for name in list(modern_block.FROM_SWEEP) + list(modern_block.VARIANTS):
    if name in rows:
        m, sd, n = rows[name][:3]
        base = modern_block.BASELINE.get(name)
        enough = base in rows and n >= 3 and rows[base][2] >= 3
        call = modern_block.verdict(rows[name], rows[base]) if enough else "-"
        diff = f"{m - rows[base][0]:+.4f}" if base in rows else ""
        print(f"{name:<44}{n:>2}{m:>10.4f} ± {sd:.4f}  {base or '':<26}{diff:>8}  {call}")
moe_vs_dense = {block: modern_block.verdict(rows[f"{block} MoE, softmax top-2"], rows[f"{block} dense"])
                for block in ("GPT-2", "modern")}
for block, call in moe_vs_dense.items():
    diff = rows[f"{block} MoE, softmax top-2"][0] - rows[f"{block} dense"][0]
    print(f"{block} block: MoE, softmax top-2 vs dense {diff:+.4f}: {call}")

# %% [markdown]
# The modern dense and MoE rows beat their GPT-2 counterparts; the router changes (sigmoid and bias,
# the group limit) tie. The question the table's rows do not ask directly is the last two lines: in
# GPT-2's block the MoE beats the dense model, in the modern block the same MoE only ties the modern
# dense model. Did the modern block help the dense model more than the MoE? The difference of the two
# differences, against 2 sd combined over all four groups, says the change itself is within noise.

# %%
gain = {kind: rows[f"modern {kind}"][0] - rows[f"GPT-2 {kind}"][0] for kind in ("dense", "MoE, softmax top-2")}
interaction = gain["dense"] - gain["MoE, softmax top-2"]
four_sd = math.hypot(*(rows[name][1] for name in ("GPT-2 dense", "GPT-2 MoE, softmax top-2", "modern dense",
                                                   "modern MoE, softmax top-2")))
print(f"modern block's gain: dense {gain['dense']:+.4f}, MoE {gain['MoE, softmax top-2']:+.4f}; "
      f"difference {interaction:+.4f}, 2 sd {2 * four_sd:.4f}: "
      + ("tie" if abs(interaction) <= 2 * four_sd else "beyond 2 sd"))

# %%
assert moe_vs_dense == {"GPT-2": "better", "modern": "tie"}
assert abs(interaction) <= 2 * four_sd  # the change from better to tie is itself within noise
for name in ("modern dense", "modern MoE, softmax top-2"):
    assert modern_block.verdict(rows[name], rows[modern_block.BASELINE[name]]) == "better"
for name in ("modern MoE, sigmoid + bias", "modern MoE, sigmoid + bias, 2 of 4 groups"):
    assert modern_block.verdict(rows[name], rows[modern_block.BASELINE[name]]) == "tie"

# %% [markdown]
# ### What each piece of the modern block buys
# The last four rows take the modern dense block and put one piece back as GPT-2 has it: learned
# positions for RoPE, a GELU MLP (4C wide, within 2% of the parameters) for SwiGLU, no QK-norm; and
# LayerNorm for RMSNorm, in the block without QK-norm (QK-norm is itself an RMSNorm), compared with that
# block.
# What a piece buys is the loss without it minus the loss with it, at this budget, 3 seeds each.

# %%
print(f"{'piece':<10}{'put back as':<20}{'loss without it - with it':>27}  verdict")
PIECES = {"modern dense, learned positions for RoPE": ("RoPE", "learned positions"),
          "modern dense, GELU for SwiGLU": ("SwiGLU", "GELU"), "modern dense, no QK-norm": ("QK-norm", "none"),
          "modern dense, no QK-norm, LayerNorm": ("RMSNorm", "LayerNorm")}
assert set(PIECES) == set(modern_block.ABLATIONS)
bought = {}
for name, (piece, old) in PIECES.items():
    without, with_it = rows[name], rows[modern_block.BASELINE[name]]
    bought[piece] = {"better": "hurts", "worse": "helps", "tie": "tie"}[modern_block.verdict(without, with_it)]
    print(f"{piece:<10}{old:<20}{without[0] - with_it[0]:>+27.4f}  {bought[piece]}")

# %% [markdown]
# Rotary positions buy the most, then SwiGLU, then QK-norm, each step of that order beyond the seeds'
# noise; QK-norm itself helps at the edge of it. RMSNorm in place of LayerNorm is a tie: it is chosen
# for being cheaper (no mean to subtract), not for a lower loss. QK-norm's main job is stability in
# large, long runs (section 4); here it also lowers the loss a little.

# %%
assert bought == {"RoPE": "helps", "SwiGLU": "helps", "QK-norm": "helps", "RMSNorm": "tie"}
order = sorted(PIECES, key=lambda name: rows[name][0] - rows[modern_block.BASELINE[name]][0], reverse=True)
assert [PIECES[name][0] for name in order] == ["RoPE", "SwiGLU", "QK-norm", "RMSNorm"]
for costlier, cheaper in zip(order[:2], order[1:3]):  # losing RoPE costs more than SwiGLU, SwiGLU than QK-norm
    assert modern_block.verdict(rows[costlier], rows[cheaper]) == "worse"

# %% [markdown]
# ## 10 · Muon for the experts
# Section 6 gave Muon to the blocks' 2-D matrices and left the experts on AdamW. That is unfair to
# the MoE: the dense model's MLP gets Muon, the experts that replace it do not. An expert is an MLP
# like the dense one, so its matrices are hidden matrices too. Moonlight and Kimi K2 orthogonalise
# each expert's matrix on its own.
#
# The experts are stored stacked, `(E, C, 2H)` and `(E, H, C)`. Newton–Schulz batches over the first
# dimension: the same five iterations, with a batched matmul in place of a matmul. Each expert's
# update is scaled by its own norm, so no expert's gradient sets another's step size.
#
# Why the loop orthogonalises: with X = UΣVᵀ, aX + b(XXᵀ)X + c(XXᵀ)²X = U φ(Σ) Vᵀ, where
# φ(σ) = aσ + bσ³ + cσ⁵. The iteration changes only the singular values and keeps the directions.
# Muon's coefficients are tuned to lift small singular values fast, not to land exactly on 1: the
# result is near UVᵀ, with singular values spread around 1.

# %%
from moe_tutorial.optimizers import NS_COEFFICIENTS, orthogonalize


def newton_schulz(update, steps=5):
    """(E, A, B) -> (E, A, B): each expert's matrix moved towards the nearest semi-orthogonal one, UVᵀ."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x  # work with the smaller Gram matrix
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (E, r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x  # an odd polynomial pushes singular values towards 1
    return x.mT if tall else x


torch.manual_seed(0)
E, A, B = 4, 128, 168  # four experts' c_fc gradients, at the char MoE's shape (C = 128, 2H = 168)
spread = torch.tensor([3.0, 10.0, 100.0, 1000.0])  # largest / smallest singular value of each
values = torch.stack([torch.logspace(0, -math.log10(k), A) for k in spread.tolist()])  # (E, A)
U, V = torch.linalg.qr(torch.randn(E, A, A))[0], torch.linalg.qr(torch.randn(E, B, A))[0]
scale = torch.tensor([1e-3, 1.0, 30.0, 1.0]).view(E, 1, 1)  # gradients of very different sizes
grads = scale * U @ torch.diag_embed(values) @ V.mT  # (E, A, B)
ours, package = newton_schulz(grads).float(), orthogonalize(grads).float()
after = torch.linalg.svdvals(ours)  # (E, A), largest first
agreement = F.cosine_similarity(ours.flatten(1), package.flatten(1))  # (E,): 1 = the same matrix up to scale
print("cosine similarity to the package, per expert:", ", ".join(f"{v:.4f}" for v in agreement.tolist()),
      "(bf16 rounds the package's fused ops differently)")
print(f"{'expert':>6}{'gradient scale':>16}{'sv spread':>11}{'update: smallest sv':>21}{'largest':>9}")
for e in range(E):
    print(f"{e:>6}{scale[e].item():>16g}{spread[e].item():>11.0f}{after[e, -1]:>21.2f}{after[e, 0]:>9.2f}")

# %% [markdown]
# Expert 0's gradient is 30,000 times smaller than expert 2's, yet their updates' singular values
# lie in the same range: the scale divides out. Directions up to a hundred times weaker than the
# strongest end up moving about as far. A direction a thousand times weaker is lifted a long way, but
# five iterations do not finish the job. Each expert's update depends on its own gradient only.

# %%
assert agreement.min() > 0.99
assert torch.allclose(after, torch.linalg.svdvals(package), atol=0.05)
assert after[:3].min() > 0.6 and after.max() < 1.25  # a 100-fold spread becomes 0.6-1.25, whatever the scale
assert torch.equal(orthogonalize(grads[:1] * 2**12), orthogonalize(grads[:1]))  # the scale divides out
assert 0.05 < after[3, -1] < 0.6  # five iterations lift a 1000-fold weaker direction a long way, not all the way
assert torch.equal(orthogonalize(grads[2:3])[0], orthogonalize(grads)[2])  # each expert's update ignores the others

# %% [markdown]
# The update each expert gets is then exactly torch's Muon on that one matrix: momentum, Nesterov,
# decoupled weight decay, and a learning rate scaled to AdamW's update RMS. `TrainConfig(optimizer=
# "muon", muon_experts=True)` (`optimizers.ExpertMuon`) does it; `tests/test_expert_muon.py` checks it
# against `torch.optim.Muon` run on each expert alone. Routers keep AdamW: a router is an output layer
# (one row per expert), which Muon's authors leave on AdamW, like the LM head. One difference from
# Moonlight: `c_fc` holds gate and up side by side and is orthogonalised as one matrix. The dense
# model's is too, so the comparison below stays fair.
#
# Under expert parallelism (notebook 06) each rank holds whole experts, so it orthogonalises its own
# experts' matrices with nothing to exchange. A matrix sharded over ranks would first need a gather.

# %% [markdown]
# `python benchmarks/modern_moe.py` trains the `char-modern` dense model and the course's best MoE
# (32 experts of 84, 3 routed + 1 shared, aux-loss-free) at equal active compute per token: 4 × 84 =
# 336, the dense SwiGLU width. The MoE trains at capacity factor 1.25 and is evaluated dropless, as
# generation runs it. Three seeds each; the experts on AdamW, then on Muon. The race gives each model
# the same seconds of training instead of the same steps, with the learning rate following the elapsed
# fraction of the budget. The tables are read from `benchmarks/results/modern_moe.json`:

# %%
import modern_moe  # benchmarks/, on the path since section 9

moe_runs = json.loads(modern_moe.RESULTS.read_text())["runs"]
print(modern_moe.report(moe_runs))

# %%
from moe_tutorial.presets import MODERN_STEPS
from moe_tutorial.sweep import budget_of, summaries, verdict_of_summaries

fig, ax = plt.subplots(figsize=(7, 4))
markers = {"dense": "o", "fine-grained + shared, AdamW experts": "s", "fine-grained + shared, Muon experts": "D"}
for comparison, budget in sorted({(r["comparison"], budget_of(r)) for r in moe_runs}):
    for name, (m, sd, n) in summaries(moe_runs, comparison, budget).items():
        seconds = modern_moe.mean_of(moe_runs, "seconds", comparison, budget, name)
        steps = modern_moe.mean_of(moe_runs, "steps", comparison, budget, name)
        color = "C0" if name == "dense" else ("C1" if "AdamW" in name else "C2")
        ax.errorbar(seconds, m, yerr=sd, fmt=markers[name], color=color, capsize=3,
                    mfc="white" if comparison == "equal_time" else color)
        ax.annotate(f"{steps:.0f} steps", (seconds, m), textcoords="offset points", xytext=(6, 4), fontsize=8)
for name, marker in markers.items():
    ax.plot([], [], marker, color="C0" if name == "dense" else ("C1" if "AdamW" in name else "C2"), label=name)
ax.plot([], [], "o", mfc="white", color="gray", label="race (equal seconds)")
ax.set_xlabel("seconds of training per run (2 threads)")
ax.set_ylabel("val loss, dropless (mean ± sd, 3 seeds)")
ax.set_title("char-modern, 2 CPU threads: dense vs the fine-grained MoE")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# With AdamW on its experts the MoE does not beat the dense model: a tie, its mean worse. Give each
# expert's matrix Muon's update and the same MoE is better by more than 2 sd of the difference, at the
# same steps and the same active compute per token. In this recipe the experts' optimizer decides it:
# the routing is unchanged, and Muon turns the tie into a win (Muon experts beat AdamW experts by more
# than 2 sd too). Both share the recipe's learning rate, tuned for neither.
#
# Per second it loses. Newton–Schulz grows with the total parameters, not the active ones: the two MoE
# rows differ only in the experts' optimizer, and their step times differ by the cost of the Muon
# update. So a step takes about twice a dense step here (the `x dense` column). The dense model
# trained for twice the steps, in less time than the MoE's run, is better than the MoE. So is the dense
# model in the race, where it takes over twice the MoE's steps. At scale a step carries millions of
# tokens and the same update is a small share of it. The race ran on two CPU threads; on a GPU, bf16
# matmuls make the update cheaper still. What carries over is the reason: Newton–Schulz grows with the
# total parameters and is paid once per step, shared by every token of the step. Neither this ratio
# nor the race's verdict carries over.

# %%
ADAMW, MUON = "fine-grained + shared, AdamW experts", "fine-grained + shared, Muon experts"
at_recipe = summaries(moe_runs, "equal_steps", MODERN_STEPS)
twice = summaries(moe_runs, "equal_steps", 2 * MODERN_STEPS)
race = summaries(moe_runs, "equal_time", 120.0)


def mean_of(field, comparison, budget, name):  # one column of the runs, averaged over seeds
    return modern_moe.mean_of(moe_runs, field, comparison, budget, name)


assert all(n == 3 for rows in (at_recipe, race) for _, _, n in rows.values()) and twice["dense"][2] == 3
assert verdict_of_summaries(at_recipe[ADAMW], at_recipe["dense"]) == "tie"
assert at_recipe[ADAMW][0] > at_recipe["dense"][0]
assert verdict_of_summaries(at_recipe[MUON], at_recipe["dense"]) == "better"
assert verdict_of_summaries(at_recipe[MUON], at_recipe[ADAMW]) == "better"
assert at_recipe[MUON][0] - at_recipe["dense"][0] < -0.04
assert (mean_of("seconds_per_step", "equal_steps", MODERN_STEPS, MUON)
        > mean_of("seconds_per_step", "equal_steps", MODERN_STEPS, ADAMW))  # the Muon update's cost
cost = (mean_of("seconds_per_step", "equal_steps", MODERN_STEPS, MUON)
        / mean_of("seconds_per_step", "equal_steps", MODERN_STEPS, "dense"))
assert 1.6 < cost < 2.6  # the x dense column
assert verdict_of_summaries(twice["dense"], at_recipe[MUON]) == "better"
assert mean_of("seconds", "equal_steps", 2 * MODERN_STEPS, "dense") < mean_of("seconds", "equal_steps",
                                                                              MODERN_STEPS, MUON)
assert verdict_of_summaries(race["dense"], race[MUON]) == "better"
assert mean_of("steps", "equal_time", 120.0, "dense") > 2 * mean_of("steps", "equal_time", 120.0, MUON)

# %% [markdown]
# ## Summary
# - **RMSNorm, RoPE, GQA, QK-norm, SwiGLU** are each a few lines and a `GPTConfig` field
#   (`moe_tutorial/norms.py`, `rope.py`, `attention.repeat_kv`, `model.py`). RoPE makes attention
#   depend on distance only; GQA divides the KV cache by `n_head / n_kv_head` (the table in section 3);
#   QK-norm bounds attention logits whatever the projections do (section 4). Taken out one at a time
#   on the full recipe, RoPE costs the most, then SwiGLU, then QK-norm; RMSNorm ties LayerNorm.
# - **DeepSeek-V3's router** — sigmoid affinities, a selection-only bias, normalised and scaled
#   weights, a sequence-wise loss, group-limited routing — is `MoEConfig(scoring="sigmoid", ...)`
#   (`moe_tutorial/router.py`). Tests check the whole DeepSeek-V3 MoE block, and whole Llama,
#   Mixtral, Qwen3-MoE and OLMoE models, against `transformers` on the same weights.
# - **Multi-head latent attention** caches one latent and one rotary key per token
#   (`moe_tutorial/mla.py`, both forms tested equal to transformers' `DeepseekV3Attention`); decoding
#   attends from the latents without building a key or value per head (exercise 3).
# - **Muon** for the blocks' matrices is `TrainConfig(optimizer="muon")`, and for each expert's
#   matrices `muon_experts=True` (`moe_tutorial/optimizers.py`). With it the fine-grained MoE beats the
#   dense model at equal steps and active compute, and loses at equal seconds on this CPU (section 10).
# - Measured here: the two blocks and the two optimizers at 300 steps, three seeds each, and the group
#   limit's effect on one trained router (printed above); the full recipe in sections 9 and 10.
# - Left out, and worth knowing: DeepSeek-V3's multi-token prediction; RoPE scaling for long
#   contexts (YaRN); dropless training with grouped GEMMs
#   (V3, Mixtral and Qwen3 drop no tokens: capacity limits are this course's Switch-era device); and
#   Qwen3's global-batch load balancing (the balancing loss over the whole batch, not each micro-batch).
#
# ## Further reading
# Papers (arXiv), each with what to read it for:
# - Zhang & Sennrich 2019, *Root Mean Square Layer Normalization*, [arXiv:1910.07467](https://arxiv.org/abs/1910.07467):
#   why LayerNorm's re-centring can go, and the speed RMSNorm saves.
# - Su et al. 2021, *RoFormer*, [arXiv:2104.09864](https://arxiv.org/abs/2104.09864): the rotation and the proof
#   that the score depends on the distance only (section 2).
# - Shazeer 2019, *Fast Transformer Decoding: One Write-Head is All You Need*,
#   [arXiv:1911.02150](https://arxiv.org/abs/1911.02150): why decoding is bound by reading K and V, and
#   multi-query attention.
# - Ainslie et al. 2023, *GQA*, [arXiv:2305.13245](https://arxiv.org/abs/2305.13245): the groups between multi-head
#   and multi-query attention, and uptraining a multi-head checkpoint into them.
# - Dehghani et al. 2023, *Scaling Vision Transformers to 22 Billion Parameters*,
#   [arXiv:2302.05442](https://arxiv.org/abs/2302.05442): attention logits growing until training diverges, and QK-norm.
# - Shazeer 2020, *GLU Variants Improve Transformer*, [arXiv:2002.05202](https://arxiv.org/abs/2002.05202): SwiGLU
#   and the smaller hidden width that keeps the parameter count.
# - Dai et al. 2024, *DeepSeekMoE*, [arXiv:2401.06066](https://arxiv.org/abs/2401.06066): fine-grained and shared
#   experts, and why the first layer stays dense.
# - Wang et al. 2024, *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*,
#   [arXiv:2408.15664](https://arxiv.org/abs/2408.15664): the selection bias and its update rule (notebook 04,
#   section 7).
# - DeepSeek-AI 2024, *DeepSeek-V2*, [arXiv:2405.04434](https://arxiv.org/abs/2405.04434): multi-head latent attention
#   (section 3) and device-limited routing, the predecessor of section 8's group limit.
# - DeepSeek-AI 2024, *DeepSeek-V3 Technical Report*, [arXiv:2412.19437](https://arxiv.org/abs/2412.19437), §2.1:
#   sigmoid affinities, the selection bias, the sequence-wise loss and node-limited routing (sections 7–8).
# - Jiang et al. 2024, *Mixtral of Experts*, [arXiv:2401.04088](https://arxiv.org/abs/2401.04088): a softmax top-2 MoE
#   on Mistral's block (RMSNorm, RoPE, GQA, SwiGLU).
# - Muennighoff et al. 2024, *OLMoE*, [arXiv:2409.02060](https://arxiv.org/abs/2409.02060): an MoE with everything
#   released, and ablations of fine-grained experts, QK-norm and the balancing losses.
# - Qwen Team 2025, *Qwen3 Technical Report*, [arXiv:2505.09388](https://arxiv.org/abs/2505.09388): per-head QK-norm,
#   128 experts with 8 active and no shared expert.
# - Qiu et al. 2025, *Demons in the Detail*, [arXiv:2501.11873](https://arxiv.org/abs/2501.11873): the balancing loss
#   over the global batch instead of each micro-batch (Qwen3's).
# - Peng et al. 2023, *YaRN*, [arXiv:2309.00071](https://arxiv.org/abs/2309.00071): stretching RoPE past the training
#   length (the package refuses such checkpoints).
# - Jordan et al. 2024, *Muon: An optimizer for hidden layers in neural networks*
#   ([blog](https://kellerjordan.github.io/posts/muon/)): the Newton–Schulz iteration and why orthogonalise the update.
# - Liu et al. 2025, *Muon is Scalable for LLM Training*, [arXiv:2502.16982](https://arxiv.org/abs/2502.16982):
#   weight decay and the update scale matched to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), and Moonlight,
#   an MoE trained with Muon on its experts' matrices too (section 10).
# - Kimi Team 2025, *Kimi K2*, [arXiv:2507.20534](https://arxiv.org/abs/2507.20534): Muon (with QK-clip) training a
#   1 T-parameter MoE.
#
# Code the chapter follows:
# - transformers, [`models/llama/modeling_llama.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py):
#   `LlamaRMSNorm` (fp32 statistics, cast before the weight), `rotate_half` and `repeat_kv`, which the package matches.
# - transformers, [`models/deepseek_v3/modeling_deepseek_v3.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/deepseek_v3/modeling_deepseek_v3.py):
#   `DeepseekV3TopkRouter` and `DeepseekV3MoE`, the reference `tests/test_modern_block.py` compares the package with.
# - DeepSeek's [`inference/model.py`](https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/model.py):
#   the `Gate` class, the whole V3 router (sigmoid, bias, groups, `route_scale`) in a few dozen lines.
# - PyTorch's [`torch.optim.Muon`](https://docs.pytorch.org/docs/stable/generated/torch.optim.Muon.html) (used by
#   `moe_tutorial/optimizers.py`) and Keller Jordan's [`muon.py`](https://github.com/KellerJordan/Muon/blob/master/muon.py),
#   the reference implementation.
