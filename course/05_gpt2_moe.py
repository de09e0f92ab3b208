# %% [markdown]
# # 05 · Scaling to a GPT-2 MoE
#
# **What you will build.** GPT-2's shapes as presets with a cost calculator; GPT-2's BPE
# tokenizer; a loader for OpenAI's GPT-2 weights; *sparse upcycling*, which turns a trained dense
# model into an MoE that starts out computing exactly the same function; and generation with a
# key/value cache.
#
# **What you will measure.** Parameters, FLOPs and training memory from GPT-2 124M to a 2.4B MoE;
# the logits before and after upcycling; continued dense training vs the upcycled MoE at equal
# steps; decoding speed with and without the cache.
#
# **Objectives**
# 1. Count what a model costs, and see what MoE buys: parameters grow, FLOPs per token do not.
# 2. Map a published checkpoint onto our model (names, transposes, the tokenizer).
# 3. Upcycle a dense model into an MoE without changing its outputs, then fine-tune it.
# 4. Generate with a KV cache and nucleus (top-p) sampling.
#
# Solutions: `solutions/05_gpt2_moe_solutions.ipynb`.

# %% solutions
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_num_threads(2)  # same thread count, same floats: reruns reproduce exactly

# %% [markdown]
# ## 1 · What a model costs
# GPT-2 comes in four sizes, all with a 50,257-token BPE vocabulary, a 1,024-token context,
# biases everywhere and tied input/output embeddings. `moe_tutorial.presets.gpt2_config` builds
# them, and MoE presets on top: every other block's MLP becomes 8 or 16 experts of the same width.
#
# `model_info(config)` counts from the config alone:
# - **total parameters** — what must be stored and trained (memory);
# - **active parameters** — what one token actually runs through (compute): an MoE layer counts
#   its router and `top_k` experts, not all of them;
# - **training FLOPs per token** ≈ 6 × active weights (2 forward, 4 backward) + 12·L·C·T for attention;
# - **training memory** for weights, gradients and AdamW's two moments — 16 bytes per parameter in
#   fp32, 8 in pure bf16 — *before* activations.

# %%
from moe_tutorial.costs import model_info
from moe_tutorial.presets import GPT2_MOE_SHAPES, GPT2_SHAPES, gpt2_config

rows = []
print(f"{'preset':<26}{'total':>9}{'active':>9}{'GFLOP/token':>13}{'train mem fp32':>16}{'bf16':>8}")
for name in list(GPT2_SHAPES) + list(GPT2_MOE_SHAPES):
    info = model_info(gpt2_config(name))
    rows.append((name, info))
    print(f"{name:<26}{info.total_params / 1e6:>8.0f}M{info.active_params / 1e6:>8.0f}M"
          f"{info.train_flops_per_token / 1e9:>13.2f}{info.memory_bytes['float32']['total'] / 2**30:>13.1f} GiB"
          f"{info.memory_bytes['bfloat16']['total'] / 2**30:>6.1f} GiB")
infos = dict(rows)
assert infos["gpt2"].total_params == 124_439_808  # OpenAI's published count
assert infos["gpt2-moe-16x"].total_params > 4 * infos["gpt2"].total_params
assert infos["gpt2-moe-16x"].train_flops_per_token < 1.001 * infos["gpt2"].train_flops_per_token

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
names = [n for n, _ in rows]
x = torch.arange(len(names)).float()
axes[0].bar(x - 0.2, [i.total_params / 1e9 for _, i in rows], 0.4, label="total (memory)")
axes[0].bar(x + 0.2, [i.active_params / 1e9 for _, i in rows], 0.4, label="active per token (compute)")
axes[0].set(ylabel="parameters (billions)", title="What MoE buys: parameters without FLOPs")
axes[1].scatter([i.train_flops_per_token / 1e9 for _, i in rows],
                [i.memory_bytes["float32"]["total"] / 2**30 for _, i in rows],
                c=["tab:blue" if n in GPT2_SHAPES else "tab:orange" for n in names])
for n, i in rows:
    axes[1].annotate(n, (i.train_flops_per_token / 1e9, i.memory_bytes["float32"]["total"] / 2**30), fontsize=7)
axes[1].set(xlabel="training GFLOP per token", ylabel="weights+grads+AdamW, fp32 (GiB)",
            title="dense (blue) vs MoE (orange)")
for ax in axes[:1]:
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.legend()
fig.tight_layout()

# %% [markdown]
# The 16-expert MoE on GPT-2 124M stores 4.4× the parameters (and needs 4.4× the optimizer memory)
# for +0.05% FLOPs per token (the routers). That is the trade: quality per FLOP bought with memory,
# and, on many devices, communication (notebook 06).
#
# ### ✍️ Exercise 1 — count GPT-2's parameters by hand
# Write the parameter count of a GPT-2-style model (biases in every Linear and LayerNorm, tied
# embeddings, learned position embeddings, MLP 4× wide) from `n_layer`, `n_embd`, `vocab_size`
# and `block_size`. Per block: two LayerNorms, the q/k/v projection, the output projection, and the MLP.

# %% solutions
def gpt2_param_count(n_layer, n_embd, vocab_size, block_size):
    """Parameters of a GPT-2-style model (an int)."""
    # BEGIN SOLUTION
    C = n_embd
    layer_norms = 2 * (2 * C)  # weight + bias, twice
    attention = (C * 3 * C + 3 * C) + (C * C + C)
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)
    embeddings = vocab_size * C + block_size * C  # wte is also the output projection
    return n_layer * (layer_norms + attention + mlp) + embeddings + 2 * C  # + final LayerNorm
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch05 import check_gpt2_param_count

passed = check_gpt2_param_count(gpt2_param_count)
assert passed  # solutions-only

# %% [markdown]
# ## 2 · GPT-2's tokenizer
# GPT-2 reads bytes merged into 50,000 learned pieces (byte-level BPE) plus `<|endoftext|>`.
# `GPT2Tokenizer` is `tiktoken`'s `r50k_base`, built from the ranks file in the data cache — fetched
# once, sha256-checked like every download here, so it works offline afterwards.

# %%
from moe_tutorial.data import load_shakespeare
from moe_tutorial.tokenizers import GPT2Tokenizer

bpe = GPT2Tokenizer(progress=False)
line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
ids = bpe.encode(line)
print(ids)
print([bpe.decode([i]) for i in ids])
text = load_shakespeare(progress=False)
n_tokens = len(bpe.encode(text))
print(f"tiny Shakespeare: {len(text):,} characters -> {n_tokens:,} BPE tokens "
      f"({len(text) / n_tokens:.2f} characters per token)")
assert bpe.vocab_size == 50257 and bpe.encode("Hello world") == [15496, 995]
assert bpe.decode(ids) == line

# %% [markdown]
# ## 3 · OpenAI's weights
# `from_pretrained("gpt2")` downloads the Hugging Face `model.safetensors` (548 MB) into the data
# cache, checks it against the sha256 the Hub announces, and maps it onto our `GPT`. The names
# already match (model.py uses GPT-2's); the one trap is that GPT-2 was written with "Conv1D" layers
# storing weights as `(in, out)`, while `nn.Linear` stores `(out, in)`: four matrices per block are
# transposed. GPT-2 also uses the tanh approximation of GELU (`gelu_approximate="tanh"`), without
# which the logits drift by ~1e-3. The tests load checkpoints written by `transformers` and compare
# logits to 1e-5.
#
# Without a network, the call fails with the URL and the cache path. Then we say so and carry on with
# the character model trained in notebook 01 as our "pretrained dense model": the code path is the same.

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.downloads import data_dir
from moe_tutorial.pretrained import from_pretrained

try:
    gpt2_model = from_pretrained("gpt2", timeout=10).eval()
except FileNotFoundError as err:
    gpt2_model = None
    message = str(err).replace(str(data_dir()), "<data folder>")  # no machine paths in the output
    print("GPT-2's weights are not available here (offline?):\n ", message)
if gpt2_model is not None:
    prompt = torch.tensor([bpe.encode("The meaning of a mixture of experts is")])
    out = gpt2_model.generate(prompt, 40, top_p=0.9, generator=torch.Generator().manual_seed(0))
    print(bpe.decode(out[0]))

# %% [markdown]
# Fine-tuning GPT-2 124M, let alone its 8-expert upcycle (320M parameters), takes hours on two CPU
# cores, so the rest of this notebook upcycles notebook 01's character model, which takes minutes.
# On a GPU replace `dense` by `gpt2_model` and the character dataset by a BPE one
# (`Dataset.from_text(text, tokenizer=bpe)`); nothing else changes.

# %%
from moe_tutorial.course import pretrained_char_model
from moe_tutorial.data import Dataset

dataset = Dataset.from_text(text)
dense = pretrained_char_model(dataset).eval()  # saved by notebook 01 (trained here if it is missing)
print(dense.config)
print(f"{dense.num_params():,} parameters")

# %% [markdown]
# ## 4 · Sparse upcycling
# Training an MoE from scratch throws away everything a dense model already knows. *Sparse upcycling*
# (Komatsuzaki et al., 2023) starts from the dense checkpoint instead: each MoE layer's experts are
# **copies of the dense MLP** they replace; attention, norms and embeddings are copied as they are;
# only the router is new (small random weights).
#
# Right after upcycling the MoE computes exactly the dense function, *if no token is dropped*:
# - top-2: the two gates are renormalised to sum to 1 over two identical experts → `1 · MLP(x)`;
# - top-1: Switch multiplies by the router probability `p ≈ 1/E`, which would shrink every MLP output.
#   `upcycle` uses a *straight-through* gate instead — value `p / p.detach() = 1`, gradient of `p` —
#   so the output is unchanged and the router still learns from the task loss.
#
# ### ✍️ Exercise 2 — experts from a dense MLP
# Return the stacked expert weights `c_fc (E, C, 4C)` and `c_proj (E, 4C, C)` (the layout of
# `moe_tutorial.experts.Experts`), every expert a *copy* of the dense MLP (no biases here).
# Mind the layouts: `nn.Linear.weight` is `(out, in)`.

# %% solutions
def upcycle_mlp(mlp, n_experts):
    """Dense MLP (c_fc, c_proj nn.Linear) -> (c_fc (E, C, 4C), c_proj (E, 4C, C)) copies."""
    # BEGIN SOLUTION
    with torch.no_grad():
        c_fc = mlp.c_fc.weight.t().repeat(n_experts, 1, 1)  # repeat copies; expand would share memory
        c_proj = mlp.c_proj.weight.t().repeat(n_experts, 1, 1)
    return c_fc, c_proj
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch05 import check_upcycle_mlp

passed = check_upcycle_mlp(upcycle_mlp)
assert passed  # solutions-only

# %% [markdown]
# The package's `upcycle()` does this for every MoE layer (`moe_tutorial/upcycle.py`). Compare logits
# on validation text. With the default evaluation capacity (factor 2.0) a few tokens may find their
# expert full: a dropped token skips its MLP, and its logits change. `dropless(model)` lifts the
# capacity limit (generation always runs that way): then the MoE is the dense model, to float rounding.

# %%
from moe_tutorial.data import get_batch
from moe_tutorial.evaluate import max_logit_difference
from moe_tutorial.moe import dropless
from moe_tutorial.upcycle import upcycle

x_val, y_val = get_batch(dataset.val, 16, dense.config.block_size, torch.Generator().manual_seed(0))
for top_k in (1, 2):
    moe = upcycle(dense, n_experts=8, top_k=top_k, moe_every=2)
    capped = max_logit_difference(dense, moe, x_val)
    dropped = sum(layer.last_routing.dropped.float().mean().item() for layer in moe.moe_layers()) / 2
    with dropless(moe):
        exact = max_logit_difference(dense, moe, x_val)
    print(f"top-{top_k}: max |logit difference| {exact:.1e} without drops; with capacity factor 2.0: "
          f"{dropped:.1%} of tokens dropped per MoE layer, max difference {capped:.2f}")
    assert exact < 1e-5

# %% [markdown]
# ## 5 · Fine-tuning: continued dense training vs the upcycled MoE
# The upcycling claim: at equal extra training steps, the upcycled MoE beats simply training the
# dense model longer. Same data, same batches (same seed), same schedule, 400 steps each; the MoE is
# top-2 with 8 experts in blocks 2 and 4 (3.3× the parameters; each token runs two copies of the MLP
# there, so those layers cost 2× the FLOPs). The dense model was trained with a decayed learning rate;
# both restart with a short warmup.
#
# Measured on this budget (2 CPU threads): top-2 ends ~0.002 below continued dense training — a small
# gain. Top-1 upcycling ended *above* it (1.778 vs 1.774; 1.785 with 1% noise on the copies): its
# experts must first pull apart, and 400 steps are not enough. The paper's gains come from budgets of
# thousands of steps on models that are not tiny.

# %%
# NBVAL_IGNORE_OUTPUT
import copy

from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.train import TrainConfig, train

finetune = TrainConfig(batch_size=12, max_iters=400, learning_rate=1e-3, min_lr=1e-4, warmup_iters=20,
                       eval_interval=100, eval_iters=20, seed=2024, progress=False)
val_batches = fixed_batches(dataset.val, finetune.eval_iters, finetune.batch_size, dense.config.block_size,
                            finetune.seed + 1)
start_loss = estimate_loss(dense, val_batches, finetune)
runs = {}
for name, model in (("dense, continued", copy.deepcopy(dense)),
                    ("upcycled MoE (8 experts, top-2)", upcycle(dense, n_experts=8, top_k=2, moe_every=2))):
    torch.manual_seed(0)
    history = train(model, dataset, finetune)
    runs[name] = (model, history)
    print(f"{name:<34} val {history.final_val_loss:.4f}  {history.elapsed:5.1f} s  "
          f"{model.num_params():,} parameters")
print(f"starting point (the pretrained dense model): val {start_loss:.4f}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for name, (_, history) in runs.items():
    ax.plot([0] + history.eval_step, [start_loss] + history.val_loss, "o-", label=name)
ax.set(xlabel="fine-tuning step", ylabel="validation loss", title="Sparse upcycling at equal steps")
ax.legend()
dense_val = runs["dense, continued"][1].final_val_loss
moe_val = runs["upcycled MoE (8 experts, top-2)"][1].final_val_loss
print(f"{'':<34}{'val loss':>9}{'vs start':>10}")
for name, (_, history) in runs.items():
    print(f"{name:<34}{history.final_val_loss:>9.4f}{history.final_val_loss - start_loss:>+10.4f}")
assert dense_val < start_loss and moe_val < start_loss  # both keep learning
assert moe_val < dense_val + 0.01  # no worse than dense (measured: ~0.002 better); floats vary across CPUs

# %% [markdown]
# ## 6 · Generation with a KV cache
# Sampling token *t* without a cache reruns the model over all *t* previous tokens, although their
# keys and values never change (the model is causal). A **KV cache** stores each layer's keys and
# values; a decoding step computes q, k, v for the one new token and attends over the stored ones.
# `model.generate` runs the prompt once ("prefill"), then one position per step. (Past `block_size`
# the window slides, every position embedding shifts, and the cache is stale: from there each step
# recomputes the window, exactly like the uncached path.)
#
# ### ✍️ Exercise 3 — one decoding step of attention
# Given the newest token's query `q (B, nh, 1, hs)` and the cached keys and values `(B, nh, T, hs)`
# (the new token's own included), return its attention output `(B, nh, 1, hs)`.
# Careful: `scaled_dot_product_attention(..., is_causal=True)` aligns its mask to the *top left*.

# %% solutions
def decode_attention(q, k, v):
    """q (B, nh, 1, hs), k and v (B, nh, T, hs) -> (B, nh, 1, hs)."""
    # BEGIN SOLUTION
    scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5  # (B, nh, 1, T): every cached key is in the past
    return F.softmax(scores, dim=-1) @ v
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch05 import check_decode_attention

passed = check_decode_attention(decode_attention)
assert passed  # solutions-only

# %% [markdown]
# Generate from the fine-tuned MoE with nucleus sampling (top-p 0.9: sample among the most likely
# characters that together hold 90% of the probability), with and without the cache. Same random
# numbers, so the text must be identical.

# %%
moe_model = runs["upcycled MoE (8 experts, top-2)"][0].eval()
prompt = torch.tensor([dataset.tokenizer.encode("ROMEO:\n")])
timings, outputs = {}, {}
for use_cache in (False, True):
    start = time.perf_counter()
    outputs[use_cache] = moe_model.generate(prompt, 57, temperature=0.8, top_p=0.9, use_cache=use_cache,
                                            generator=torch.Generator().manual_seed(0))
    timings[use_cache] = time.perf_counter() - start
print(dataset.tokenizer.decode(outputs[True][0]))
assert torch.equal(outputs[True], outputs[False])

# %%
# NBVAL_IGNORE_OUTPUT
print(f"57 new tokens: {timings[False] * 1e3:.0f} ms without cache, {timings[True] * 1e3:.0f} ms with it "
      f"({timings[False] / timings[True]:.1f}x)")

# %% [markdown]
# For this tiny model the cache saves little: each step is dominated by per-layer overheads, not by
# the prefix. `benchmarks/generate.py` measures GPT-2 124M: about 5× faster with the cache after a
# 16-token prompt (128 new tokens, 2 CPU threads), and the gap grows with the length.
#
# ## 7 · Training the big presets
# On GPUs the same `GPT` and `train()` apply with `TrainConfig(device="cuda", dtype="bfloat16")`:
# bf16 autocast (the routers stay fp32), SDPA's flash kernels, and `torch.compile`.
# `benchmarks/train_gpt2_moe.py` measures tokens/s and model-FLOPs utilisation of GPT-2 124M and the
# 16-expert MoE on one GPU. Beyond one GPU's memory — the 2.4B MoE needs ~36 GiB for weights, grads
# and AdamW before any activation — experts are spread over devices: **notebook 06** (expert parallelism
# with `torch.distributed`).
#
# ## Summary
# - `model_info`: total parameters set memory, active parameters set FLOPs; MoE grows the first only.
# - GPT-2's BPE tokenizer via `tiktoken` (cached, verified); OpenAI's weights via `from_pretrained`
#   (Conv1D weights transposed, tanh GELU), tested against `transformers` to 1e-5.
# - `upcycle()`: experts copied from the dense MLP, a straight-through top-1 gate: identical logits at
#   step 0 (asserted); at equal fine-tuning steps, top-2 upcycling edges out continued dense training here.
# - `generate()` uses a KV cache; same tokens as without it (asserted), several times faster on GPT-2.
#
# **Where the finalized code lives:** `moe_tutorial/costs.py`, `presets.py`, `tokenizers.py`,
# `pretrained.py`, `upcycle.py`, `kv_cache.py`, `course.py` (notebook 01's model). Next: **06 · distributed MoE**.
