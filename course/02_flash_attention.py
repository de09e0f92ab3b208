# %% [markdown]
# # 02 · Flash attention, derived and measured
#
# **What you will build.** FlashAttention-2 in plain PyTorch: attention computed one tile at a
# time with an *online softmax*, and a backward pass that recomputes what it needs instead of
# storing it, one tile of it written by you. No `T × T` matrix is ever built.
#
# **What you will measure.** The memory of naive attention growing 4× per doubling of the
# sequence length against a model of it computed from the tensor shapes, the time of naive, flash
# and PyTorch's fused SDPA kernel, and — on paper, since this runs on a CPU — the bytes a GPU moves
# between its large slow memory and its small fast one.
#
# **Objectives**
# 1. See why attention hits a memory wall.
# 2. Derive the online softmax: a running maximum and a running sum, and how to merge two states.
# 3. Write the tiled forward pass, with causal block skipping.
# 4. Count the HBM ↔ SRAM traffic that makes tiling win on a GPU.
# 5. Write one tile of the backward pass, loop over tiles in FlashAttention-2's order, and verify
#    everything against SDPA.
# 6. Know what `F.scaled_dot_product_attention` does for you, its pitfalls, and read a Triton kernel.
#
# Solutions: `solutions/02_flash_attention_solutions.ipynb`.

# %% solutions
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.ticker import FuncFormatter, NullLocator

torch.manual_seed(0)
torch.set_num_threads(2)


def log2_axes(ax, xs, logy=True):
    """Base-2 log axes with plain tick labels (512, not 6×10²): each tick is a doubling."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    if logy:
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())


# %% [markdown]
# ## 1 · The memory wall
# Naive attention computes `S = Q Kᵀ / √D`, `P = softmax(S)`, `O = P V`. For each batch and head,
# `S` and `P` hold `T × T` numbers: double the sequence and they take four times the memory.
# We measure it: each point runs in a fresh Python process and reads the operating system's peak
# resident memory (`moe_tutorial.measure`), for naive attention, our flash attention and
# PyTorch's SDPA (causal, fp32, batch 1, 8 heads of 64 channels).

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.measure import measure_in_subprocess

HEADS, HEAD_DIM = 8, 64
seq_lens = [512, 1024, 2048]
points = {impl: [measure_in_subprocess("attention", impl=impl, seq_len=T, heads=HEADS, head_dim=HEAD_DIM, repeats=3,
                                       runs=3)  # each in 3 fresh processes: the median's memory
                 for T in seq_lens]
          for impl in ("naive", "flash", "sdpa")}
for impl, pts in points.items():
    print(f"{impl:>6}: " + "  ".join(f"T={p['seq_len']}: {p['seconds'] * 1e3:6.1f} ms {p['extra_mib']:6.1f} MiB"
                                      for p in pts))

# %% [markdown]
# What should those numbers be? Both can be predicted from the shapes alone (fp32, 4 bytes a number):
# - **naive**: at the peak, the scores and the probabilities are alive together (softmax reads one
#   and writes the other): two `(H, T, T)` tensors, plus the `(T, T)` boolean causal mask and the
#   `(H, T, D)` output.
# - **flash** (`moe_tutorial.attention.flash_attention_forward`, blocks of `DEFAULT_BLOCK_Q ×
#   DEFAULT_BLOCK_K`): the output, two `(H, bq, bk)` score tiles (the next tile is computed while the
#   previous one is still referenced) and three `(H, bq, D)` blocks (the scaled queries, the
#   accumulator, `P V` of the tile). Nothing grows like `T²`.
#
# The cell checks each naive measurement against its prediction. Flash's measured memory runs above
# its shape model by a few MiB, more at larger `T` (the allocator keeps freed blocks, and the loop
# holds more temporaries than the model counts), so its prediction is printed, not asserted point by
# point. What is asserted for flash is the claim itself:
# from `T = 512` to `2048` its memory grows by less than a tenth of what naive's grows by, and at
# `T = 2048` it needs under a tenth of naive's memory. A flash that stored the `(H, T, T)` scores
# would fail both.

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.attention import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

FP32, MiB = 4, 2**20


def naive_peak_mib(T):
    """Two (H, T, T) fp32 tensors (scores, probabilities), the (T, T) bool mask, the (H, T, D) output."""
    return (2 * HEADS * T * T * FP32 + T * T + HEADS * T * HEAD_DIM * FP32) / MiB


def flash_peak_mib(T):
    """The (H, T, D) output, two (H, bq, bk) score tiles and three (H, bq, D) blocks: linear in T."""
    bq, bk = min(DEFAULT_BLOCK_Q, T), min(DEFAULT_BLOCK_K, T)
    return (HEADS * T * HEAD_DIM * FP32 + 2 * HEADS * bq * bk * FP32 + 3 * HEADS * bq * HEAD_DIM * FP32) / MiB


naive_mib = [p["extra_mib"] for p in points["naive"]]
flash_mib = [p["extra_mib"] for p in points["flash"]]
print(f"{'T':>5} | {'naive MiB':>9} {'predicted':>9} | {'flash MiB':>9} {'predicted':>9}")
for T, n, f in zip(seq_lens, naive_mib, flash_mib):
    print(f"{T:>5} | {n:9.1f} {naive_peak_mib(T):9.1f} | {f:9.1f} {flash_peak_mib(T):9.1f}")
growth = [b / a for a, b in zip(naive_mib, naive_mib[1:])]
print("naive memory growth per doubling of T:", [f"{g:.2f}x" for g in growth])
T_max = seq_lens[-1]
ratio, predicted_ratio = flash_mib[-1] / naive_mib[-1], flash_peak_mib(T_max) / naive_peak_mib(T_max)
print(f"T={T_max}: flash uses {ratio:.3f}x naive's memory; the shapes predict {predicted_ratio:.3f}x")
# The claims. Naive: within the allocator's rounding of its prediction, ~4x per doubling (a third T x T
# copy breaks it). Flash: storing the (H, T, T) scores (128 MiB at T = 2048) would break both bounds.
assert all(3.5 < g < 4.5 for g in growth), "naive attention's memory should grow ~4x per doubling"
assert all(0.9 < n / naive_peak_mib(T) < 1.2 for T, n in zip(seq_lens, naive_mib))
assert flash_mib[-1] - flash_mib[0] < 0.1 * (naive_mib[-1] - naive_mib[0])
assert ratio < 0.1

fig, ax = plt.subplots(figsize=(6, 3.5))
for impl, pts in points.items():
    ax.plot(seq_lens, [max(p["extra_mib"], 0.1) for p in pts], "o-", label=impl)
ax.plot(seq_lens, [naive_peak_mib(T) for T in seq_lens], "k:", label="naive, predicted")
ax.plot(seq_lens, [flash_peak_mib(T) for T in seq_lens], "k--", label="flash, predicted")
log2_axes(ax, seq_lens)
ax.set(xlabel="sequence length T", ylabel="peak extra memory (MiB)", title="causal attention forward")
ax.legend()
plt.show()

# %% [markdown]
# ## 2 · Softmax, then online softmax
# A numerically safe softmax subtracts the row maximum before exponentiating (exp of a large
# score would overflow), then normalises:
#
# $$\mathrm{softmax}(x)_i = \frac{e^{x_i - m}}{\ell}, \qquad m = \max_j x_j, \qquad \ell = \sum_j e^{x_j - m}.$$
#
# That needs the whole row before anything can be normalised. The **online softmax** processes the
# row in chunks. Milakov & Gimelshein (2018) keep the running maximum and normaliser `(m, ℓ)`; Rabe
# & Staats (2021) also carry the output along, as a state `(m, ℓ, acc)`, where
# `acc = Σ e^{x_j − m} v_j` is the not-yet-normalised output. (FlashAttention renormalised its output
# at every step; keeping `acc` unnormalised until the end is one of FlashAttention-2's changes.)
# When a new chunk raises the maximum from `m` to `m'`, everything summed so far was exponentiated
# against the old maximum and is simply rescaled by `e^{m − m'}`. At the end, the output is
# `acc / ℓ`, normalised once.

# %%
x = torch.tensor([1.0, 3.0, 0.5, 7.0, 2.0, 6.5])
values = torch.arange(6.0)[:, None]  # (6, 1): attention output = weighted average of these

m, l, acc = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(1)
for chunk in (slice(0, 2), slice(2, 4), slice(4, 6)):
    new_m = torch.maximum(m, x[chunk].max())
    p = torch.exp(x[chunk] - new_m)
    l = l * torch.exp(m - new_m) + p.sum()
    acc = acc * torch.exp(m - new_m) + p @ values[chunk]
    m = new_m
    print(f"after keys {chunk.start}..{chunk.stop - 1}: m={m.item():.1f}  l={l.item():.4f}  acc={acc.item():.4f}")
print(f"online: {(acc / l).item():.6f}   direct: {(F.softmax(x, dim=0) @ values).item():.6f}")
assert torch.allclose(acc / l, F.softmax(x, dim=0) @ values, rtol=1e-6, atol=0)

# %% [markdown] solutions
# ### ✍️ Exercise 1 — merge two online-softmax states
# Two states `a = (m_a, ℓ_a, acc_a)` and `b = (m_b, ℓ_b, acc_b)` summarise two disjoint sets of
# keys, for a batch of rows: `m` and `ℓ` have shape `(N,)`, `acc` has shape `(N, D)`. Return the
# state of all keys together. (This merge is also how split-K / "flash-decoding" kernels combine
# partial results computed in parallel.) A state can be empty: a chunk whose keys a row cannot see
# leaves the starting state `(−∞, 0, 0)`. Merging two empty states must give an empty state, not NaN.

# %% solutions
def merge_softmax_states(a, b):
    """(m, l, acc) of keys A and of keys B -> (m, l, acc) of A and B together."""
    m_a, l_a, acc_a = a
    m_b, l_b, acc_b = b
    # BEGIN SOLUTION
    m = torch.maximum(m_a, m_b)
    m_safe = torch.where(torch.isinf(m), 0.0, m)  # both empty: exp(-inf - (-inf)) would be NaN
    scale_a, scale_b = torch.exp(m_a - m_safe), torch.exp(m_b - m_safe)
    return m, l_a * scale_a + l_b * scale_b, acc_a * scale_a[:, None] + acc_b * scale_b[:, None]
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch02 import check_merge_softmax_states

passed = check_merge_softmax_states(merge_softmax_states)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Each state's `ℓ` and `acc` are sums of `e^{x − m}` against its *own* maximum.
# Multiplying by `e^{m_a − m}` re-expresses A's sums against the common maximum `m = max(m_a, m_b)`
# (and B's likewise); sums against the same maximum simply add. Taking the larger maximum keeps every
# exponent `≤ 0`, so nothing overflows. When both states are empty, `m = −∞` and `m_a − m` is
# `−∞ − (−∞)`, which is NaN; subtracting 0 instead gives `e^{−∞} = 0`, and the empty state survives
# (the same guard as the fully masked row in section 3).
#
# **Wrong answers the check catches:** adding `ℓ_a + ℓ_b` and `acc_a + acc_b` without rescaling (named
# as such: it is only right when both maxima are equal, and the check makes row 0's maximum sit in B);
# merging with the *minimum* of the two maxima (the merged `m` must equal the row maximum over all
# keys); any `acc / ℓ` that is not `softmax(x) @ values` over all ten keys; and NaN where a row
# has no visible key in either chunk, or where one chunk is empty.

# %% [markdown]
# ## 3 · The tiled forward pass
# FlashAttention-2 puts the online softmax into two loops. The **outer loop** walks over blocks
# of queries; for each, the **inner loop** walks over blocks of keys and values, updating the
# state of every query row in the block. Only one `block_q × block_k` tile of scores exists at a
# time. When the query block is done, its output is normalised once, and its **logsumexp**
# `m + log ℓ` is kept for the backward pass. (The first FlashAttention had the loops the other way
# round. FlashAttention-2 made query blocks outer: its Algorithm 1, §3.1, is this loop order, and
# §3.2 gives the reason: query blocks then run in parallel without sharing anything.)

# %% [markdown] solutions
# ### ✍️ Exercise 2 — the inner loop
# For one block of queries `q_blk` `(bq, D)` and all keys and values `(T, D)`, loop over key
# blocks of `block_k` rows (the last may be shorter) with the online softmax (non-causal; scale
# the scores by `1/√D`). Return the output `(bq, D)` and the logsumexp `(bq,)`. Make it one pass:
# each key block's scores are computed once, and no tensor ever holds scores against all keys.

# %% solutions
def attend_one_query_block(q_blk, k, v, block_k):
    """Online-softmax attention of one query block over all keys, one key block at a time."""
    # BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q_blk.size(-1))
    m = torch.full((q_blk.size(0),), float("-inf"), dtype=q_blk.dtype)
    l = torch.zeros(q_blk.size(0), dtype=q_blk.dtype)
    acc = torch.zeros_like(q_blk)
    for start in range(0, k.size(0), block_k):
        scores = q_blk @ k[start:start + block_k].T * scale  # (bq, bk)
        new_m = torch.maximum(m, scores.amax(dim=-1))
        p = torch.exp(scores - new_m[:, None])
        correction = torch.exp(m - new_m)
        l = l * correction + p.sum(dim=-1)
        acc = acc * correction[:, None] + p @ v[start:start + block_k]
        m = new_m
    return acc / l[:, None], m + torch.log(l)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch02 import check_attend_one_query_block

passed = check_attend_one_query_block(attend_one_query_block)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Each key block is one chunk of the online softmax of section 2, done for `bq`
# rows at once: the state `(m, ℓ, acc)` is rescaled by `e^{m − m'}` whenever a block raises a row's
# maximum, so after the last block `acc / ℓ` is exactly `softmax(q kᵀ/√D) v`, and `m + log ℓ` is
# `log Σ_j e^{s_j}`, the logsumexp. The ragged last block needs nothing special: slicing past the end
# just returns fewer rows.
#
# **Wrong answers the check catches:** a softmax *per key block* with the blocks' outputs averaged (no
# running max and sum: right only when there is one block, and the check also uses blocks of 8, 5 and
# 1 keys); scores not scaled by `1/√D` (the output and the logsumexp differ from the reference's);
# a logsumexp that is not `torch.logsumexp` of the scaled scores; a plain softmax over all keys
# that ignores `block_k`, for the whole block or one query row at a time (right numbers, no tiling:
# the check watches for any score tensor against all 23 keys at once); two passes over the key
# blocks, the first for the maximum, the second for the sums (right numbers, but every score is
# computed twice: the check counts the matmuls that produce each score, 2-D or batched); and a call
# to SDPA or to the package's `flash_attention_forward`, `flash_attention`, `naive_attention` or
# `attention` (on `q[None, None]`, say), which do the loop for you.

# %% [markdown]
# ### Causal attention: skip the future
# With a causal mask, query *i* sees keys *0..i*. A key block that starts after the query block's
# last query is entirely masked: skip it. A block that straddles the diagonal needs the mask; the
# ones fully below it do not. With `n` blocks per side, `n(n+1)/2` of the `n²` tiles are visited:
# the fraction tends to one half as `n` grows. Here is the map of tiles for `T = 1024` and blocks of 128:

# %%
from moe_tutorial.attention import key_blocks

T, block = 1024, 128
n = T // block
tiles = torch.zeros(n, n)  # 0 skipped, 1 visited with the mask, 2 visited without
for i, q_start in enumerate(range(0, T, block)):
    for k_start, k_end, needs_mask in key_blocks(q_start, q_start + block, T, block, causal=True):
        tiles[i, k_start // block] = 1 if needs_mask else 2
fig, ax = plt.subplots(figsize=(3.5, 3.5))
ax.imshow(tiles, cmap="Blues", vmin=0, vmax=2)
ax.set(xlabel="key block", ylabel="query block",
       title=f"{int((tiles > 0).sum())} of {n * n} tiles visited\n(dark: full, light: masked, white: skipped)")
plt.show()
visited = int((tiles > 0).sum())
print(f"visited {visited} tiles ({visited / n**2:.0%}), masked {int((tiles == 1).sum())}, "
      f"skipped {int((tiles == 0).sum())}")
assert visited == n * (n + 1) // 2 and int((tiles == 1).sum()) == n  # only the diagonal tiles need the mask

# %% [markdown] solutions
# ### ✍️ Exercise 3 — which key blocks does a causal query block visit?
# Return a list of `(k_start, k_end, needs_mask)` for the queries `q_start .. q_end-1`, keys
# `0 .. T-1` in blocks of `block_k` (the last block may be shorter). `needs_mask` is True when the
# block holds at least one key after the block's *first* query.

# %% solutions
def key_blocks_to_visit(q_start, q_end, T, block_k):
    """[(k_start, k_end, needs_mask)] for causal attention of queries q_start..q_end-1."""
    # BEGIN SOLUTION
    blocks = []
    for k_start in range(0, T, block_k):
        if k_start > q_end - 1:  # every key in this block is after every query: skip the rest
            break
        k_end = min(k_start + block_k, T)
        blocks.append((k_start, k_end, k_end - 1 > q_start))
    return blocks
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch02 import check_key_blocks_to_visit

passed = check_key_blocks_to_visit(key_blocks_to_visit)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Query `i` sees key `j` when `j ≤ i`. A block is worth visiting when its first key
# is visible to the block's *last* query (`k_start ≤ q_end − 1`); since blocks come in increasing
# order, the first one that fails ends the loop. Inside a visited block, some key is hidden from some
# query exactly when its last key comes after the block's *first* query (`k_end − 1 > q_start`).
#
# **Wrong answers the check catches:** visiting every key block (the check names the blocks that are
# entirely in the future, or past `T`); the right blocks with `needs_mask` always False (the diagonal
# blocks would attend to the future); and any off-by-one at a block edge, over seven cases including
# ragged last blocks (`T = 10`, `18`, `20`) and a query block wider than the key blocks.

# %% [markdown]
# ### The whole forward pass, from scratch
# Both loops together, for tensors of shape `(B, H, T, D)`. This is our from-scratch version;
# `moe_tutorial.attention.flash_attention_forward` is the same algorithm with in-place updates
# (fewer temporary tensors). We check the two against each other and against SDPA.

# %%
from moe_tutorial.attention import causal_tile_mask, flash_attention_forward


def scratch_flash_forward(q, k, v, block_q=64, block_k=64):
    """Causal FlashAttention-2 forward: returns the output and the logsumexp."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out, lse = torch.empty_like(q), torch.empty(B, H, T, dtype=q.dtype)
    for q_start in range(0, T, block_q):  # outer loop: query blocks
        q_end = min(q_start + block_q, T)
        q_blk = q[:, :, q_start:q_end] * scale
        m = torch.full((B, H, q_end - q_start, 1), float("-inf"), dtype=q.dtype)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(q_blk)
        for k_start, k_end, needs_mask in key_blocks(q_start, q_end, T, block_k, causal=True):  # inner
            scores = q_blk @ k[:, :, k_start:k_end].transpose(-2, -1)  # (B, H, bq, bk)
            if needs_mask:
                scores = scores.masked_fill(causal_tile_mask(q_start, q_end, k_start, k_end, q.device), float("-inf"))
            new_m = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
            p = torch.exp(scores - new_m)
            correction = torch.exp(m - new_m)
            l = l * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[:, :, k_start:k_end]
            m = new_m
        out[:, :, q_start:q_end] = acc / l
        lse[:, :, q_start:q_end] = (m + torch.log(l)).squeeze(-1)
    return out, lse


q, k, v = (torch.randn(2, 4, 300, 32, dtype=torch.float64) for _ in range(3))  # 300: not a multiple of 64
out_scratch, lse_scratch = scratch_flash_forward(q, k, v)
out_package, lse_package = flash_attention_forward(q, k, v, causal=True, block_q=64, block_k=64)
out_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
print(f"scratch vs package: {(out_scratch - out_package).abs().max():.1e}   "
      f"scratch vs SDPA: {(out_scratch - out_sdpa).abs().max():.1e}")
# fp64: the same sums in another order agree to ~1e-15; a wrong mask or scale is off by ~1e-1
assert torch.allclose(out_scratch, out_package, atol=1e-12) and torch.allclose(lse_scratch, lse_package, atol=1e-12)
assert torch.allclose(out_scratch, out_sdpa, atol=1e-12)

# %% [markdown]
# ### What a real kernel must also get right
# - **A row with no visible key.** With a padding mask, a query row can have every key masked. Its
#   running maximum stays `−∞`, and `exp(−∞ − (−∞))` is NaN. Causal attention as written here never
#   meets it (key 0 is in every row's first block), but a kernel must. Two guards: use 0 as the
#   maximum of such a row, so its weights are 0; then its `ℓ` is 0 too, so divide by 1 instead, and
#   its output is 0:

# %%
masked_row = torch.full((1, 4), float("-inf"))  # every key of this row is masked
row_values = torch.randn(4, 3)
row_max = masked_row.amax(dim=-1, keepdim=True)  # -inf
p = torch.exp(masked_row - row_max)  # nan
naive = (p @ row_values) / p.sum(dim=-1, keepdim=True)
p = torch.exp(masked_row - torch.where(torch.isinf(row_max), 0.0, row_max))  # zeros
l = p.sum(dim=-1, keepdim=True)  # 0
guarded = (p @ row_values) / torch.where(l == 0, 1.0, l)
print("naive output:", naive.tolist(), "  guarded output:", guarded.tolist())
assert torch.isnan(naive).all() and torch.equal(guarded, torch.zeros(1, 3))

# %% [markdown]
# - **The same row in the backward.** The backward (section 5) recomputes `P = exp(S − L)` from the
#   saved logsumexp `L`. For a row with no visible key, `L = −∞`, and `exp(−∞ − (−∞))` is NaN again.
#   The same guard applies: use 0 for such a row's `L`, so its `P` is 0, and so is its gradient.
# - **Precision.** In bf16 or fp16, tensor cores take inputs rounded to bf16/fp16 (`Q`, `K`, `V`,
#   and `P` before the `P V` matmul) but accumulate each matmul in fp32. `m`, `ℓ` and `acc` are kept
#   in fp32 as well: the rescaling by `e^{m − m'}` and long sums would lose digits otherwise.
# - **Load balance.** Under a causal mask, the last query block visits every key block and the first
#   only one. A GPU runs query blocks in parallel, so a scheduler should start the long ones first,
#   or they finish last and hold up the step.
# - **Alignment when there are fewer queries than keys.** Decoding with a KV cache asks one new query
#   to see all cached keys: the causal diagonal sits at the *bottom right*. `is_causal=True` in SDPA
#   aligns it top left; PyTorch's `torch.nn.attention.bias.causal_lower_right` builds the
#   bottom-right mask.

# %% [markdown]
# ## 4 · Why tiling wins on a GPU: HBM and SRAM traffic
# On a CPU, section 1 showed the **footprint**: flash attention never holds a `T × T` matrix. On a GPU
# the bigger win is **traffic**. A GPU has two memories: HBM, its DRAM, and on each streaming
# multiprocessor (SM) an on-chip SRAM. On an A100 (FlashAttention paper, §2.1): 40–80 GB of HBM at
# 1.5–2.0 TB/s, against 192 KB of SRAM per SM, about 19 TB/s over all 108 SMs together.
#
# - **Standard attention** (the paper's Algorithm 0) runs as separate kernels, and each one goes
#   through HBM: compute `S = Q Kᵀ` and write it, read `S` and write `P = softmax(S)`, read `P` and
#   `V` and write `O`. The `T × T` matrix crosses four times: `Θ(T d + T²)` accesses.
# - **Flash attention** is one kernel. The paper's Algorithm 1 sizes its blocks from the SRAM: with
#   room for `M` numbers, `B_c = ⌈M / 4d⌉` key rows and `B_r = min(B_c, d)` query rows, so that
#   `K_j`, `V_j`, `Q_i`, `O_i` and the `B_r × B_c` score tile fit on chip up to a constant factor.
#   Counted exactly, at `d = 128` `Q_i` and `O_i` push the total past `M`, so the code below lowers
#   `B_c` until everything fits. Algorithm 1 loads each key block
#   once and, for each, streams every query block through: it reads `Q` and reads and writes `O` once
#   per key block, `T / B_c` times. That is `≈ 3 T² d / B_c` accesses; with `B_c ≈ M / 4d`,
#   `12 T² d² / M`, Theorem 2's `Θ(T² d² / M)`. Against standard attention's `4 T²`, flash saves a
#   factor of about **`4 B_c / 3d ≈ M / 3d²`**: large while `d²` is small against the SRAM, small
#   for wide heads.
#
# The picture, for one step of the forward (`moe_tutorial.diagrams.flash_tiling_diagram`), shows
# FlashAttention-2's order of section 3, not Algorithm 1's: `Q_i` is loaded once and kept, `K_j`
# and `V_j` stream through. Algorithm 1 swaps the roles: `K_j`, `V_j` stay, and the query blocks,
# with their outputs, stream.

# %%
from moe_tutorial.diagrams import flash_tiling_diagram

flash_tiling_diagram(n_blocks=4, query_block=2, key_block=1)
plt.show()

# %% [markdown]
# The count, in code, for one head of the forward pass in fp16, non-causal, with the paper's A100
# figures. The SRAM budget includes the score tile. It is the whole 192 KB of an SM, as in the
# paper's count; in practice one A100 thread block can use at most about 164 KB of it as shared
# memory (the rest serves as L1 cache). The code counts both loop orders: Algorithm 1's, and
# FlashAttention-2's of section 3 (*FA2*). Each gets blocks sized for the block it keeps on chip.
# The first table gives the bytes, the second the roofline.
#
# Bytes are not the whole story: the time is the larger of bytes ÷ bandwidth and FLOPs ÷ peak. Both
# matmuls, `Q Kᵀ` and `P V`, cost `2 T² d` FLOPs each. A kernel whose **arithmetic intensity** (FLOPs
# per byte moved) is above the machine's ratio of peak FLOP/s to bandwidth is compute-bound, below it
# memory-bound: the roofline.

# %%
SRAM_BYTES = 192 * 1024  # on-chip SRAM per SM of an A100 (FlashAttention paper, §2.1)
HBM_BYTES_PER_S = 1.5e12  # the A100's HBM bandwidth, the low end of the paper's 1.5-2.0 TB/s
PEAK_FLOPS = 312e12  # the A100's dense fp16 tensor-core peak
FP16 = 2


def flash_blocks(d, sram_bytes=SRAM_BYTES, nbytes=FP16):
    """(B_r, B_c): FlashAttention's Algorithm 1 block sizes for an SRAM of sram_bytes, B_c lowered
    until the score tile fits beside the blocks."""
    M = sram_bytes // nbytes  # numbers the SRAM holds
    block_c = math.ceil(M / (4 * d))
    block_r = min(block_c, d)
    while 2 * block_c * d + 2 * block_r * d + block_r * block_c > M:  # K_j, V_j, Q_i, O_i, the score tile
        block_c -= 1
    return block_r, block_c


def hbm_traffic(T, d, sram_bytes=SRAM_BYTES, nbytes=FP16):
    """(standard, flash): bytes one head's attention forward moves between HBM and SRAM.

    standard: Algorithm 0 of the FlashAttention paper, one kernel per step, the T x T matrix in HBM.
    flash: Algorithm 1, key blocks outer: K and V read once; Q read, O read and written per key block.
    """
    standard = nbytes * (4 * T * d  # read Q, K, V; write O
                         + 4 * T * T)  # write S, read S, write P, read P
    _, block_c = flash_blocks(d, sram_bytes, nbytes)
    flash = nbytes * (2 * T * d  # read K and V once
                      + math.ceil(T / block_c) * 3 * T * d)  # per key block: read Q, read and write O
    return standard, flash


def fa2_blocks(d, sram_bytes=SRAM_BYTES, nbytes=FP16):
    """(B_r, B_c) sized for FlashAttention-2's order, where the query block stays on chip: B_r ≈ M / 4d query
    rows, B_c = min(B_r, d) key rows. The SRAM holds the same five things (Q_i, O_i, K_j, V_j, the score
    tile), so the budget is Algorithm 1's with the roles of B_r and B_c swapped."""
    block_c, block_r = flash_blocks(d, sram_bytes, nbytes)
    return block_r, block_c


def fa2_order_traffic(T, d, sram_bytes=SRAM_BYTES, nbytes=FP16, block_r=None):
    """Bytes of the same forward in FlashAttention-2's order, query blocks outer, with blocks sized for that
    order (or block_r query rows): Q read and O written once; K and V read once per query block."""
    block_r = block_r or fa2_blocks(d, sram_bytes, nbytes)[0]
    return nbytes * (2 * T * d  # read Q, write O
                     + math.ceil(T / block_r) * 2 * T * d)  # per query block: read K and V


# %%
ridge = PEAK_FLOPS / HBM_BYTES_PER_S  # FLOP per byte where memory time equals compute time
print(f"SRAM M = {SRAM_BYTES // 1024} KiB, HBM {HBM_BYTES_PER_S / 1e12:.1f} TB/s, peak {PEAK_FLOPS / 1e12:.0f} "
      f"TFLOP/s; fp16, one head, forward")
for d in (64, 128):
    print(f"d = {d:>3}: Algorithm 1's blocks B_r = {flash_blocks(d)[0]}, B_c = {flash_blocks(d)[1]}; "
          f"FlashAttention-2's order B_r = {fa2_blocks(d)[0]}, B_c = {fa2_blocks(d)[1]}")
print(f"\n{'d':>4} {'T':>6} | {'standard MB':>11} {'Alg. 1 MB':>9} {'FA2 MB':>7} | {'standard / Alg. 1':>17} "
      f"{'4B_c/3d':>7} | {'FA2 / Alg. 1':>12}")
traffic = {}  # (d, T) -> bytes moved by (standard, Algorithm 1, FlashAttention-2's order)
for d in (64, 128):
    block_c = flash_blocks(d)[1]
    for T in (1024, 4096, 16384):
        traffic[d, T] = (*hbm_traffic(T, d), fa2_order_traffic(T, d))
        standard, flash, fa2 = traffic[d, T]
        print(f"{d:>4} {T:>6} | {standard / 1e6:11.1f} {flash / 1e6:9.1f} {fa2 / 1e6:7.1f} | "
              f"{standard / flash:17.1f} {4 * block_c / (3 * d):7.1f} | {fa2 / flash:12.2f}")

print(f"\nroofline: ridge {ridge:.0f} FLOP/byte; time = the larger of bytes / bandwidth and FLOPs / peak")
print(f"{'d':>4} {'T':>6} | {'FLOP/byte: standard':>19} {'Alg. 1':>6} {'FA2':>5} | "
      f"{'µs: bytes Alg. 1':>16} {'bytes FA2':>9} {'FLOPs':>6}")
intensity = {}  # (d, T) -> FLOP per byte of (standard, Algorithm 1, FlashAttention-2's order)
for (d, T), moved in traffic.items():
    flops = 4 * T * T * d  # Q K^T and P V, 2 T^2 d each
    intensity[d, T] = tuple(flops / moved_bytes for moved_bytes in moved)
    print(f"{d:>4} {T:>6} | {intensity[d, T][0]:19.0f} {intensity[d, T][1]:6.0f} {intensity[d, T][2]:5.0f} | "
          f"{moved[1] / HBM_BYTES_PER_S * 1e6:16.0f} {moved[2] / HBM_BYTES_PER_S * 1e6:9.0f} "
          f"{flops / PEAK_FLOPS * 1e6:6.0f}")
real_blocks = 4 * 16384**2 * 128 / fa2_order_traffic(16384, 128, block_r=128)
print(f"FlashAttention-2's order with 128-row query blocks, d = 128, T = 16384: {real_blocks:.0f} FLOP/byte")
# Theorem 2 on this count: flash moves fewer bytes, ~4x more per doubling of T (T^2), ~2x fewer per
# doubling of the SRAM (1/M), and at large T the saving standard / flash approaches 4 B_c / 3d.
assert all(standard > flash for standard, flash, _ in traffic.values())
assert 3.5 < hbm_traffic(8192, 64)[1] / hbm_traffic(4096, 64)[1] <= 4.0
assert 0.5 <= hbm_traffic(4096, 64, 2 * SRAM_BYTES)[1] / hbm_traffic(4096, 64)[1] < 0.6
for d in (64, 128):
    assert abs(traffic[d, 16384][0] / traffic[d, 16384][1] / (4 * flash_blocks(d)[1] / (3 * d)) - 1) < 0.05
assert all(std < ridge for std, _, _ in intensity.values())  # standard attention: always memory-bound
assert intensity[64, 16384][1] > ridge > intensity[128, 16384][1]  # Algorithm 1: compute-bound at d = 64 only
# FlashAttention-2's order, each order sized for its own resident block: a bit fewer bytes than Algorithm 1
# at every size (2 T^2 d / B_r against 3 T^2 d / B_c, with B_r here = B_c there: ~2/3 at long T), about B_r
# FLOP per byte, and the same verdict as Algorithm 1 at T = 16384: compute-bound at d = 64, not at d = 128
assert all(fa2 < flash for _, flash, fa2 in traffic.values())
assert all(abs(traffic[d, 16384][2] / traffic[d, 16384][1] - 2 / 3) < 0.02 for d in (64, 128))
assert all(0.95 < intensity[d, 16384][2] / fa2_blocks(d)[0] <= 1 for d in (64, 128))
assert intensity[64, 16384][2] > ridge > intensity[128, 16384][2]
assert real_blocks < ridge  # 128-row blocks: memory-bound on this count, which leaves out the L2 cache

# %% [markdown]
# Read the roofline table. Standard attention is memory-bound at every size: the `T × T` matrix's
# round trips cost more time than its FLOPs. With the A100's SRAM, flash attention at `d = 64` and
# long sequences moves few enough bytes that the matmuls set its time: it becomes **compute-bound**,
# which is the point of FlashAttention. At `d = 128` the blocks are shorter and the saving smaller,
# and on this count it stays memory-bound.
#
# The two loop orders. Algorithm 1 keeps a key block on chip, so `O` is read and written `T / B_c`
# times. FlashAttention-2's order (section 3, and the picture above) keeps `Q_i` and its accumulator
# on chip and streams `K_j` and `V_j` past them. Sized for that, the query block gets the
# `≈ M / 4d` rows and the key block `min(B_r, d)`: the same budget with the roles swapped. `Q` is
# read once and `O` written once, but `K` and `V` are read `T / B_r` times: `≈ 2 T² d / B_r`, that
# is `≈ 8 T² d² / M` accesses, against Algorithm 1's `≈ 12 T² d² / M`. So when each order is sized
# for its own resident block, the two move similar traffic, `Θ(T² d² / M)`. FlashAttention-2's
# order moves less, because `O` never goes back and forth: it re-reads two blocks (`K_j`, `V_j`)
# where Algorithm 1 moves three (`Q_i` read, `O_i` read and written). At long `T` that is about two
# thirds of Algorithm 1's bytes (column *FA2 / Alg. 1*). In fp16 it is about `B_r` FLOPs per byte.
# On this count, at long sequences, both orders are compute-bound at `d = 64` and memory-bound at
# `d = 128`.
#
# Real kernels do not use these blocks. FlashAttention-2 uses blocks of 64–128 rows (§3.3): the
# accumulator lives in registers, and larger blocks spill registers or run out of shared memory.
# With 128-row query blocks at `d = 128`, the count gives about 128 FLOPs per byte, below the
# ridge (the last printed line). Yet measured FlashAttention-2 reaches higher TFLOP/s at `d = 128`
# than at `d = 64` (FlashAttention-2, §4.1), which this HBM-only count does not explain. What it does
# leave out is the GPU's L2 cache (40 MB on an A100): the query blocks of one head run at the same
# time on different SMs and read the same `K_j` and `V_j`, so many of those repeated reads come from
# L2, not HBM, and the intensity HBM sees is higher than this count's, at both head sizes.
#
# Two more caveats. FlashAttention-2 also trims the non-matmul FLOPs (the rescaling by
# `e^{m − m'}`), which matters because a tensor core does matmuls about 16× faster than anything
# else. And our PyTorch loops are **not** fused: each operation of the inner loop writes its tile
# back to main memory. Section 6 times them on this CPU. The fused kernels are SDPA's (also timed
# in section 6) and the Triton kernel of section 9.

# %% [markdown]
# ## 5 · The backward pass, by recomputation
# Naive backward needs `P` (T × T) saved from the forward pass. Besides its inputs `Q`, `K`, `V`,
# flash attention saves only `O` and the logsumexp `L` (one number per row) and, block by block,
# **recomputes** `P_ij = exp(S_ij − L_i)` — exactly the forward's softmax, without storing it. With
# `dO` the gradient of the output and `S_ij = Q_i K_jᵀ / √D`:
#
# - `dV_j += P_ijᵀ dO_i`
# - `dP_ij = dO_i V_jᵀ`
# - `dS_ij = P_ij ∘ (dP_ij − δ_i)`, where `δ_i = rowsum(dO_i ∘ O_i)` (the softmax Jacobian folded
#   into one number per row: `Σ_j P_ij dP_ij = Σ_j P_ij (dO_i · v_j) = dO_i · O_i`, summed over
#   *all* keys, so it is computed once from `O` before the loops)
# - `dQ_i += dS_ij K_j / √D`,  `dK_j += dS_ijᵀ Q_i / √D`
#
# Recomputing costs one more `Q Kᵀ` per tile; on a GPU that is cheaper than writing and reading a
# `T × T` matrix through HBM (section 4), and memory stays linear in `T`. Count the matmuls: the
# forward does two of `2 T² d` FLOPs (`Q Kᵀ`, `P V`), the backward five (`S` again, `dP`, `dV`,
# `dQ`, `dK`). So the backward costs about 2.5× the forward.

# %% [markdown] solutions
# ### ✍️ Exercise 4 — one tile of the backward pass
# For one query block and one key block — `q_i`, `do_i` `(bq, D)`, `k_j`, `v_j` `(bk, D)`, the saved
# logsumexp `lse_i` `(bq,)` and `delta_i = rowsum(do_i ∘ o_i)` `(bq,)` — return this tile's
# contributions `(dq_i, dk_j, dv_j)` with shapes `(bq, D)`, `(bk, D)`, `(bk, D)`. Recompute `P` from
# `lse_i`. `future` is None or a `(bq, bk)` boolean mask, True where the key comes after the query:
# those scores are `−∞`. The check sums your tiles over every key block and compares with autograd.

# %% solutions
def flash_backward_tile(q_i, k_j, v_j, do_i, lse_i, delta_i, future=None):
    """One (query block i, key block j) tile of the backward: its contributions (dq_i, dk_j, dv_j)."""
    # BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q_i.size(-1))
    scores = q_i @ k_j.T * scale  # (bq, bk): the forward's scores
    if future is not None:
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.exp(scores - lse_i[:, None])  # the forward's softmax, recomputed from the saved L_i
    dv_j = probs.T @ do_i  # (bk, D)
    dprobs = do_i @ v_j.T  # (bq, bk)
    dscores = probs * (dprobs - delta_i[:, None])  # softmax backward; δ_i covers all keys, not the tile
    return dscores @ k_j * scale, dscores.T @ q_i * scale, dv_j
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch02 import check_flash_backward_tile

passed = check_flash_backward_tile(flash_backward_tile)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** It is the chain rule of `O_i = P_i V` restricted to the columns of key block `j`.
# `exp(S_ij − L_i)` is the forward's softmax exactly, normalised over *all* keys, because `L_i` is the
# log of the whole row's denominator. `dV_j` collects `P_ijᵀ dO_i`; the softmax Jacobian turns `dP`
# into `P ∘ (dP − δ_i)`, and `δ_i = Σ_j P_ij dP_ij` runs over the whole row, which is why it comes in
# precomputed from `O`. Every piece is linear in the tile, so the tiles' contributions add up to the
# full gradients.
#
# **Wrong answers the check catches:** `dS = P ∘ dP` (forgetting to subtract `δ_i`; named as such);
# `P = exp(S)` without subtracting `L_i` (unnormalised: row `i` is `e^{L_i}` times too large); `P` as a softmax
# over the tile alone (named as such: it renormalises each key block to sum to 1); `dQ` and `dK` without
# the `1/√D` of the scores (named as such); `dV = P dO` instead of `Pᵀ dO` (a transpose: it fails on
# the check's `5 × 6` tiles); and a causal tile that ignores `future` (named as such: the future keys
# get weight).

# %% [markdown]
# ### The whole backward pass, in FlashAttention-2's order
# FlashAttention-2's backward (Algorithm 2 of the paper) puts **key/value blocks in the outer loop**
# and query blocks in the inner one — the opposite of its forward. On a GPU each key block `j` is one
# thread block: it keeps `K_j, V_j` and its accumulators `dK_j, dV_j` in SRAM for the whole inner loop
# and writes them to HBM once. `dQ_i` gets a contribution from every key block, so it stays in HBM and
# each thread block adds into it; the paper (§3.2) uses atomic adds for exactly this, the only
# gradient shared between thread blocks. `δ` is computed once, before the loops.
#
# Here it is for `(B, H, T, D)` tensors, causal, with the tile of exercise 4 inlined (so it runs even
# before you solve the exercise). It skips the query blocks that end before the key block starts.

# %%
from moe_tutorial.attention import flash_attention_backward


def scratch_flash_backward(q, k, v, out, lse, grad_out, block_q=64, block_k=64):
    """Causal FlashAttention-2 backward, in the loop order of Algorithm 2: key/value blocks outer."""
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)
    delta = (grad_out * out).sum(dim=-1)  # δ_i = rowsum(dO_i * O_i), (B, H, T): once, before the loops
    dq = torch.zeros_like(q)  # in HBM: every key block adds into it (atomic adds on a GPU)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for k_start in range(0, T, block_k):  # outer loop: key/value blocks, one GPU thread block each
        k_end = min(k_start + block_k, T)
        k_j, v_j = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
        dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)  # on chip for the whole inner loop
        first_q = k_start // block_q * block_q  # earlier query blocks end before k_start: they see none of it
        for q_start in range(first_q, T, block_q):  # inner loop: query blocks
            q_end = min(q_start + block_q, T)
            q_i, do_i = q[:, :, q_start:q_end], grad_out[:, :, q_start:q_end]
            scores = q_i @ k_j.transpose(-2, -1) * scale  # (B, H, bq, bk)
            if k_end - 1 > q_start:  # the tile straddles the diagonal
                scores = scores.masked_fill(causal_tile_mask(q_start, q_end, k_start, k_end, q.device), float("-inf"))
            probs = torch.exp(scores - lse[:, :, q_start:q_end, None])  # recomputed, not stored
            dv_j += probs.transpose(-2, -1) @ do_i
            dscores = probs * (do_i @ v_j.transpose(-2, -1) - delta[:, :, q_start:q_end, None])
            dq[:, :, q_start:q_end] += dscores @ k_j * scale  # read-modify-write of dQ_i in HBM
            dk_j += dscores.transpose(-2, -1) @ q_i * scale
        dk[:, :, k_start:k_end], dv[:, :, k_start:k_end] = dk_j, dv_j  # written once
    return dq, dk, dv


q, k, v = (torch.randn(2, 3, 200, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
grad_out = torch.randn(2, 3, 200, 16, dtype=torch.float64)
with torch.no_grad():
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=64, block_k=48)
    kv_outer = scratch_flash_backward(q, k, v, out, lse, grad_out, block_q=64, block_k=48)
    q_outer = flash_attention_backward(q, k, v, out, lse, grad_out, causal=True, block_q=64, block_k=48)
sdpa_grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)
for name, grads in (("key/value-outer (scratch)", kv_outer), ("query-outer (package)", q_outer)):
    errors = [(a - b).abs().max().item() for a, b in zip(grads, sdpa_grads)]
    print(f"{name:>26} vs SDPA: max |error| dq {errors[0]:.1e}, dk {errors[1]:.1e}, dv {errors[2]:.1e}")
    assert max(errors) < 1e-12  # fp64 rounding; a missing δ_i or scale is off by ~1e-1
print(f"{'the two orders':>26} differ by {max((a - b).abs().max().item() for a, b in zip(kv_outer, q_outer)):.1e}")

# %% [markdown]
# **The package's order.** `moe_tutorial.attention.flash_attention_backward` — the backward of the
# package's `FlashAttention` autograd function, which `Kernels(attention="flash")` uses — does the same
# tile arithmetic in the *other* order: query blocks outer, key blocks inner, like its forward, so one
# `key_blocks` helper does the causal skipping for both. That is not FlashAttention-2's Algorithm 2, but
# every gradient entry still receives the same tile contributions in the same order, so the two agree
# bit for bit (printed above): only the order in which tiles are *visited* changes. In PyTorch on a CPU
# the order costs nothing: every `+=` on a slice reads and writes main memory either way (there is no
# SRAM to keep an accumulator in), and tiles run one after another, so no two of them race for a
# gradient. On a GPU, query-outer would let each thread block keep its `dQ_i`, but every thread block
# would add into every `dK_j` *and* `dV_j`: two gradients under atomic adds instead of one. Hence
# FlashAttention-2's choice.
#
# Last, the package's autograd function end to end: its gradients against SDPA's in fp64, causal and
# not, and `torch.autograd.gradcheck` against finite differences.

# %%
from moe_tutorial.attention import flash_attention

for causal in (True, False):
    mine = torch.autograd.grad(flash_attention(q, k, v, causal, 64, 48), (q, k, v), grad_out)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), grad_out)
    errors = [(a - b).abs().max().item() for a, b in zip(mine, ref)]
    print(f"causal={causal}: max |error| dq {errors[0]:.1e}, dk {errors[1]:.1e}, dv {errors[2]:.1e}")
    assert max(errors) < 1e-12
small = [torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
assert torch.autograd.gradcheck(lambda *a: flash_attention(*a, True, 4, 3), small)
print("gradcheck passed")

# %% [markdown]
# ## 6 · Time, and the block size
# The times measured in section 1 (left; 2 threads, median of 3 runs). Right: our flash forward at the
# longest `T` with square blocks of different sizes, timed in this process. Small blocks mean many
# tiles, and each tile is a handful of PyTorch calls with a fixed overhead; large blocks mean fewer,
# larger tiles (more memory per tile) and more masked work on the diagonal. On a GPU the ceiling on
# the block size is the SRAM (section 4). `benchmarks/attention.py` runs the full sweep, `T` from 256
# to 8192, forward and backward.

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.measure import median_seconds

block_sizes = [64, 128, 256, 512]
qs, ks, vs = (torch.randn(1, HEADS, T_max, HEAD_DIM) for _ in range(3))
sweep = {}
with torch.no_grad():
    for b in block_sizes:
        n_tiles = sum(1 for q_start in range(0, T_max, b) for _ in key_blocks(q_start, min(q_start + b, T_max),
                                                                              T_max, b, causal=True))
        seconds = median_seconds(lambda b=b: flash_attention_forward(qs, ks, vs, True, b, b), repeats=3)
        sweep[b] = (n_tiles, seconds)
        print(f"block {b:>3}: {n_tiles:>4} tiles of {HEADS * b * b * FP32 / MiB:5.2f} MiB, {seconds * 1e3:6.1f} ms")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for impl, pts in points.items():
    axes[0].plot(seq_lens, [p["seconds"] * 1e3 for p in pts], "o-", label=impl)
log2_axes(axes[0], seq_lens)
axes[0].set(xlabel="sequence length T", ylabel="ms (median of 3)", title="time, causal forward")
axes[0].legend()
axes[1].plot(block_sizes, [sweep[b][1] * 1e3 for b in block_sizes], "o-", color="tab:orange")
log2_axes(axes[1], block_sizes, logy=False)
axes[1].set(xlabel="block size (bq = bk)", ylabel="ms", title=f"our flash forward, T={T_max}", ylim=(0, None))
plt.show()
at = {impl: pts[-1] for impl, pts in points.items()}
print(f"T={T_max}, time relative to flash's:")
for impl in ("naive", "flash", "sdpa"):
    print(f"  {impl:>6}: {at[impl]['seconds'] / at['flash']['seconds']:5.2f}x")
print("package default block:", DEFAULT_BLOCK_Q)

# %% [markdown]
# SDPA is one fused C++ kernel. Our flash runs each step of a tile as its own PyTorch operation:
# `amax`, subtract, `exp`, `masked_fill`, `sum`, the rescaling of `ℓ` and `acc`. Each is an
# elementwise pass that reads a tile from memory and writes a new one; SDPA's kernel does the same
# steps on data already in registers and cache. Those extra passes, more than the Python loop's
# per-tile overhead, are why our flash trails SDPA on time: even the largest blocks, with only a few
# tiles, leave the gap. On memory, flash and SDPA both grow linearly in `T` (section 1).
#
# Against naive, our flash wins at the longer lengths of section 1; at the shortest, naive can be as
# fast or faster (the left plot shows which in this run). Where flash wins, the work it skips
# explains it. Under the causal mask it skips the future tiles, about half the work, while naive
# computes every score, allocates two `T × T` tensors and makes several elementwise passes over
# them. Whether the CPU's cache helps too (small tiles that stay in cache, `T × T` tensors that do
# not), this notebook does not test: the sweep changes the tile size, but also the number of calls
# and the masked work on the diagonal.
#
# CPU timings of the same setting vary between runs on a loaded machine. Flash at the longest `T`
# with the package's default block is timed twice, in section 1 and in the sweep, and the two need
# not agree. So the notebook prints times and asserts none. The README keeps the last full benchmark.
#
# ## 7 · In practice: `F.scaled_dot_product_attention`
# - **Backends.** On CUDA, SDPA picks FlashAttention-2, memory-efficient attention (xFormers'
#   kernel) or cuDNN, and falls back to the "math" path (naive attention in C++) when none
#   applies. On CPU it has its own fused flash-style kernel, which is what we measured.
# - **Pitfalls.** An explicit `attn_mask` or dropout can push SDPA to a slower path on some
#   backends: prefer `is_causal=True` to a hand-made mask. And `is_causal=True` is **top-left
#   aligned**: with fewer queries than keys (decoding with a KV cache), query 0 sees only key 0,
#   not the whole prefix. For the last query of a sequence you want *bottom-right* alignment:

# %%
q_last = torch.randn(1, 1, 1, 8)  # one new query
k_all, v_all = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)  # five cached keys
top_left = F.scaled_dot_product_attention(q_last, k_all, v_all, is_causal=True)
sees_all = F.scaled_dot_product_attention(q_last, k_all, v_all)  # what the last query should get
print("is_causal=True with 1 query, 5 keys: equals attending to key 0 only?",
      torch.allclose(top_left, v_all[:, :, :1]))
assert torch.allclose(top_left, v_all[:, :, :1]) and not torch.allclose(top_left, sees_all)

# %% [markdown]
# ## 8 · The GPT of notebook 01 with flash attention
# `GPT(config, Kernels(attention=...))` chooses the attention implementation. It is not part of
# the config: the architecture, and so the function computed, is the same. First the function: one
# model, one batch, its logits and gradients with SDPA, then with our flash attention
# (`model.use_kernels` swaps the kernel and keeps the weights).

# %%
from moe_tutorial.data import get_batch, shakespeare_dataset
from moe_tutorial.model import GPT, Kernels
from moe_tutorial.presets import preset
from moe_tutorial.train import train

dataset = shakespeare_dataset(progress=False)
model_cfg, train_cfg = preset("char-tiny", dataset.tokenizer.vocab_size, max_iters=200, eval_interval=100,
                              progress=False)
torch.manual_seed(0)
model = GPT(model_cfg)
x, y = get_batch(dataset.val, 8, model_cfg.block_size, generator=torch.Generator().manual_seed(0))
results = {}
for impl in ("sdpa", "flash"):
    model.use_kernels(Kernels(attention=impl))
    model.zero_grad()
    logits, loss = model(x, y)[:2]
    loss.backward()
    results[impl] = logits.detach(), [p.grad.clone() for p in model.parameters()]
logit_gap = (results["sdpa"][0] - results["flash"][0]).abs().max().item()
grad_gap = max((a - b).abs().max().item() for a, b in zip(results["sdpa"][1], results["flash"][1]))
print(f"same weights, same batch: max |logit gap| {logit_gap:.1e}, max |gradient gap| {grad_gap:.1e}")
assert logit_gap < 1e-5 and grad_gap < 1e-5  # fp32 rounding; a wrong scale or mask is off by ~1e-1

# %% [markdown]
# Then training: the same small model twice from the same seed, once per kernel. The two runs start
# identical, but the kernels round differently, and training amplifies tiny differences: the per-step
# losses drift apart mid-run by far more than float rounding, then land close again. This is one pair
# of runs, so the cell only claims what it shows.

# %%
losses = {}
for impl in ("sdpa", "flash"):
    torch.manual_seed(0)
    losses[impl] = train(GPT(model_cfg, Kernels(attention=impl)), dataset, train_cfg)
step_gaps = [abs(a - b) for a, b in zip(losses["sdpa"].loss, losses["flash"].loss)]
val_gaps = [abs(a - b) for a, b in zip(losses["sdpa"].val_loss, losses["flash"].val_loss)]
print(f"{'':<30}{'sdpa':>10}{'flash':>10}{'|gap|':>10}")
print(f"{'train loss, last step':<30}{losses['sdpa'].loss[-1]:>10.5f}{losses['flash'].loss[-1]:>10.5f}"
      f"{step_gaps[-1]:>10.1e}")
for step, a, b, gap in zip(losses["sdpa"].eval_step, losses["sdpa"].val_loss, losses["flash"].val_loss, val_gaps):
    print(f"{f'val loss, step {step}':<30}{a:>10.5f}{b:>10.5f}{gap:>10.1e}")
print(f"\n{'largest train-loss |gap|':<30}{'at step':>10}{'|gap|':>10}")
print(f"{'in the first 10 steps':<30}{step_gaps.index(max(step_gaps[:10])):>10}{max(step_gaps[:10]):>10.1e}")
print(f"{'over the whole run':<30}{step_gaps.index(max(step_gaps)):>10}{max(step_gaps):>10.1e}")
assert max(step_gaps[:10]) < 1e-4  # before rounding has compounded, the two runs are the same run
assert max(val_gaps) < 2e-2  # and they stay close (a broken kernel is caught by the logits check above)

# %% [markdown]
# ## 9 · On a GPU: a Triton kernel
# On a GPU the same algorithm is written as one kernel. Here is `moe_tutorial/triton_attention.py`'s
# forward kernel, the part between `@triton.jit` and the Python wrapper that launches it:

# %%
import inspect
import textwrap

import moe_tutorial.triton_attention as triton_attention

source = inspect.getsource(triton_attention)  # the file's text: readable even without Triton or a GPU
kernel = source[source.index("    @triton.jit"):source.index("def triton_flash_attention")]
print(textwrap.dedent(kernel).strip())

# %% [markdown]
# How it maps to the tiles of sections 3–4:
# - **One program instance = one thread block = one query block** `Q_i` of one (batch, head): the
#   launch grid is `(number of query blocks, B·H)`, and `tl.program_id(0)` is `i`. The outer loop of
#   `scratch_flash_forward` is not a loop here: the GPU runs those programs in parallel.
# - `q = tl.load(...)` reads `Q_i` from HBM **once**; `row_max`, `row_sum`, `acc` are the online
#   softmax state, created on chip and never written to HBM.
# - `for k_start in range(0, k_stop, BLOCK_K)` is the inner loop: each iteration loads `K_j` and
#   `V_j`, computes the score tile with `tl.dot` (tensor cores), masks, and rescales by `correction`
#   exactly as in exercise 2. Under `CAUSAL`, `k_stop` ends the loop at the diagonal: the skipped
#   future blocks of exercise 3.
# - The two `tl.store`s write `O_i = acc / row_sum` and the logsumexp `L_i` **once**. That is
#   FlashAttention-2's order (the picture of section 4, and its *FA2* column), not Algorithm 1's,
#   where `O` goes back and forth through HBM once per key block. Here `K` and `V` are the ones read
#   again, by every query block.
# - The kernel masks every tile with `tl.where`, also the tiles fully below the diagonal.
#   FlashAttention-2 splits those out: only the diagonal tiles pay for the mask (exercise 3's
#   `needs_mask`). That is a speed difference, not a difference in the numbers.
# - With fp32 inputs, `tl.dot` runs in TF32 on Ampere and later GPUs (Triton's default): the inputs
#   are rounded to about 3 decimal digits before the multiply. The GPU check below uses bf16. The
#   interpreter of the next cell computes `tl.dot` in full fp32, on the CPU.
#
# Where Triton is installed (it is optional), the kernel also runs on a CPU through Triton's
# interpreter (`TRITON_INTERPRET=1`, in a subprocess since the variable is read when Triton compiles);
# where CUDA is present, the next cell checks it against SDPA on the GPU and times both.

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("triton") is None:
    print("skipped: Triton is not installed (pip install triton)")
else:
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from moe_tutorial.triton_attention import triton_flash_attention
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))  # T=100 in blocks of 16: a ragged last block of 4
        out = triton_flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
        print((out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    interpreted_error = float(done.stdout.split()[-1])
    print(f"Triton interpreter, B=1 H=2 T=100 D=16 fp32 causal: max |Triton - SDPA| = {interpreted_error:.1e}")
    assert interpreted_error < 1e-5  # fp32 rounding; a wrong mask or rescale is off by ~1e-1

# %%
from moe_tutorial.triton_attention import triton_available

available, reason = triton_available()
if not available:
    print(f"skipped: {reason}")
else:
    from moe_tutorial.triton_attention import triton_flash_attention

    q, k, v = (torch.randn(4, 16, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(triton_flash_attention(q, k, v, causal=True), ref, atol=2e-2, rtol=2e-2)

    def timed(fn):
        return median_seconds(lambda: (fn(), torch.cuda.synchronize()), repeats=20, warmup=3)

    t_triton = timed(lambda: triton_flash_attention(q, k, v, causal=True))
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"B=4 H=16 T=4096 D=64 bf16 causal: Triton {t_triton * 1e3:.2f} ms, SDPA {t_sdpa * 1e3:.2f} ms")

# %% [markdown]
# ## Summary
# - Naive attention's memory grows 4× per doubling of `T` — the `T × T` matrix — and its measured
#   peak matches what the tensor shapes predict. Flash's grows only with `T`, not `T²`: above its
#   shape model by a few MiB that grow with `T`, and under a tenth of naive's (section 1).
# - The online softmax keeps `(m, ℓ, acc)` per row and rescales by `e^{m − m'}` when the maximum
#   grows; two states merge the same way (exercise 1).
# - FlashAttention-2's forward: query blocks outer, key blocks inner (exercise 2), skip future blocks
#   under a causal mask (exercise 3), normalise once, save the logsumexp.
# - On a GPU, tiling cuts HBM traffic from `Θ(T d + T²)` to `Θ(T² d² / M)` (section 4), in either
#   loop order when each is sized for the block it keeps on chip; FlashAttention-2's order moves
#   about two thirds as much as Algorithm 1's. Our unfused PyTorch loops win the footprint; on this
#   CPU they also beat naive in time at the longer lengths, by skipping the future tiles and the
#   `T × T` passes, but trail SDPA's fused kernel (section 6).
# - Backward: recompute `P` from the logsumexp, one tile at a time (exercise 4). FlashAttention-2 loops
#   key/value blocks outer so `dK_j, dV_j` stay on chip and only `dQ` needs atomic adds; the package's
#   CPU version loops query blocks outer. Both match SDPA's gradients to fp64 rounding.
# - SDPA's fused kernel is still the fastest on CPU, and it stays the model's default
#   (`Kernels(attention="sdpa")`).
#
# **Where the finalized code lives:** `moe_tutorial/attention.py` (naive, flash, the `attention()`
# entry point), `moe_tutorial/triton_attention.py` (GPU kernel), `moe_tutorial/measure.py`,
# `moe_tutorial/diagrams.py` (`flash_tiling_diagram`), `benchmarks/attention.py`. Next:
# **03 · Mixture of Experts** — replacing the MLP by many.

# %% [markdown]
# ## Further reading
# Papers (arXiv), each with what to read it for:
# - Vaswani et al. 2017, *Attention Is All You Need*, [arXiv:1706.03762](https://arxiv.org/abs/1706.03762),
#   §3.2: scaled dot-product attention, the `softmax(Q Kᵀ / √d) V` every section here computes.
# - Milakov & Gimelshein 2018, *Online normalizer calculation for softmax*,
#   [arXiv:1805.02867](https://arxiv.org/abs/1805.02867): the running maximum and sum of section 2, in one pass.
# - Rabe & Staats 2021, *Self-attention Does Not Need O(n²) Memory*,
#   [arXiv:2112.05682](https://arxiv.org/abs/2112.05682): chunked attention with the same rescaling, and how
#   to differentiate it without storing the attention matrix — the memory argument of section 1.
# - Dao et al. 2022, *FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness*,
#   [arXiv:2205.14135](https://arxiv.org/abs/2205.14135): §2.1 (the GPU memory hierarchy), §3.1–3.2 and
#   Theorem 2 (the HBM-access count of section 4), Algorithm 4 and Appendix B (the backward by recomputation).
# - Dao 2023, *FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*,
#   [arXiv:2307.08691](https://arxiv.org/abs/2307.08691): Algorithm 1 (query blocks outer, the logsumexp),
#   Algorithm 2 (the backward with key/value blocks outer) and §3.2 (parallelism, atomic adds on `dQ`).
# - Shah et al. 2024, *FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision*,
#   [arXiv:2407.08608](https://arxiv.org/abs/2407.08608): what changes on Hopper GPUs — overlapping data
#   movement with tensor-core matmuls, and FP8.
#
# Code to read:
# - Triton's [fused-attention tutorial](https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html):
#   a FlashAttention-2 forward *and* backward in Triton, the grown-up version of section 9's kernel.
# - [Dao-AILab/flash-attention](https://github.com/Dao-AILab/flash-attention): the reference kernels;
#   `flash_attn/flash_attn_triton.py` is the readable one: its `_bwd_kernel_one_col_block` is section 5's
#   key/value-outer backward for one key block. With `SEQUENCE_PARALLEL=True` each program takes one key
#   block and adds into `dQ` with atomic adds; otherwise one program per (batch, head) loops over all key
#   blocks and adds into `dQ` with plain loads and stores.
