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
import copy
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
# - **training memory** for weights, gradients and AdamW's two moments, *before* activations: 16
#   bytes per parameter in fp32. Standard bf16 mixed precision keeps fp32 master weights and moments,
#   so it needs about as much. The `bf16` column (8 bytes) assumes everything in bf16, which few
#   real setups do.

# %%
from moe_tutorial.costs import model_info
from moe_tutorial.presets import GPT2_MOE_SHAPES, GPT2_SHAPES, gpt2_config, preset

rows = []
print(f"{'preset':<26}{'total':>9}{'active':>9}{'GFLOP/token':>13}{'train mem fp32':>16}{'bf16':>8}")
for name in list(GPT2_SHAPES) + list(GPT2_MOE_SHAPES):
    info = model_info(gpt2_config(name))
    rows.append((name, info))
    print(f"{name:<26}{info.total_params / 1e6:>8.0f}M{info.active_params / 1e6:>8.0f}M"
          f"{info.train_flops_per_token / 1e9:>13.2f}{info.memory_bytes['float32']['total'] / 2**30:>13.1f} GiB"
          f"{info.memory_bytes['bfloat16']['total'] / 2**30:>6.1f} GiB")
infos = dict(rows)
assert infos["gpt2"].total_params == 124_439_808  # the released checkpoint's count (the paper says "117M")
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
plt.show()

# %%
moe16, base = infos["gpt2-moe-16x"], infos["gpt2"]
print(f"16-expert MoE against GPT-2 124M: {moe16.total_params / base.total_params:.1f}x the parameters, "
      f"{100 * (moe16.train_flops_per_token / base.train_flops_per_token - 1):+.2f}% training FLOPs per token")

# %% [markdown]
# The 16-expert MoE stores several times GPT-2's parameters, and needs as many times the optimizer
# memory, for almost the same FLOPs per token: only the routers are added. That is the trade:
# quality per FLOP, bought with memory and, across devices, communication (notebook 06).

# %% [markdown] solutions
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

# %% [markdown] solutions-only
# **Why it works.** Every `Linear` has `in·out + out` parameters and every LayerNorm `2C`; a block
# is two LayerNorms, attention's fused `C → 3C` and `C → C`, and the MLP's `C → 4C → C`. The
# embeddings are `V·C + T·C`, and the output layer adds nothing because it *is* the token embedding
# (tied). One final LayerNorm closes the stack.
#
# **Wrong answers the check catches:** counting an untied output layer (`+V·C`), forgetting the
# position embeddings, and forgetting the biases.

# %% [markdown]
# ### Getting tokens to their experts
# An MoE layer's cost is more than its FLOPs: the tokens must be gathered per expert and put back,
# and at GPT-2's sizes a step routes thousands of tokens. Three ways to get tokens to experts and
# back (`moe_tutorial.dispatch`), with identical outputs:
# - **einsum** (GShard, Mesh TensorFlow): build one-hot *dispatch* and gate-weighted *combine*
#   tensors of shape `(N, E, C)` and use einsums. Static shapes (good for TPUs), but memory and
#   time grow with tokens × experts × capacity — and capacity itself grows with tokens.
# - **sort**: sort the kept assignments by expert, run one grouped matmul pair over contiguous
#   slices, scatter-add back. The package's default.
# - **loop**: one expert at a time on its own tokens (Hugging Face's Mixtral block).

# %% [markdown] solutions
# ### ✍️ Exercise 2 — the dispatch mask
# Build the one-hot dispatch tensor `(N, E, C)` from each assignment's expert, its slot (`position`)
# and whether it was kept: `mask[n, expert[n, j], position[n, j]] = 1` for kept assignments only.

# %% solutions
def dispatch_mask(expert, position, kept, n_experts, capacity):
    """expert, position, kept (N, k) -> one-hot (N, E, capacity) float tensor."""
    # BEGIN SOLUTION
    N, k = expert.shape
    mask = torch.zeros(N, n_experts, capacity)
    token, choice = torch.where(kept)
    mask[token, expert[token, choice], position[token, choice]] = 1.0
    return mask
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch05 import check_dispatch_mask

passed = check_dispatch_mask(dispatch_mask)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `torch.where(kept)` lists the (token, choice) pairs that got a slot; indexing
# the mask with each pair's token, expert and slot sets exactly one entry per kept assignment, so
# `einsum("nec,nd->ecd", mask, x)` gathers every expert's batch in slot order.
#
# **Wrong answers the check catches:** a mask that also marks dropped assignments (the check counts
# the ones: there must be exactly as many as kept assignments), and any misplaced entry.

# %%
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.dispatch import DISPATCH
from moe_tutorial.measure import dispatch_point
from moe_tutorial.moe import MoE

torch.manual_seed(0)
layer = MoE(GPTConfig(vocab_size=65, n_embd=128, n_head=4, moe=MoEConfig(n_experts=8, top_k=2))).train()
x = torch.randn(12, 64, 128, requires_grad=True)  # one char-model batch: 768 tokens, C = 128
outputs = {}
for name, fn in DISPATCH.items():
    layer.dispatch = fn
    torch.manual_seed(0)
    outputs[name] = layer(x).out
for name in ("einsum", "loop"):
    assert torch.allclose(outputs[name], outputs["sort"], atol=1e-5)
print("all three give the same output (to 1e-5)")

# %%
# NBVAL_IGNORE_OUTPUT
timing = {(name, tokens): dispatch_point(name, tokens, n_experts=8, repeats=3)["seconds"]
          for tokens in (768, 3072) for name in DISPATCH}
print(f"{'strategy':<8}" + "".join(f"{f'{t} tokens, ms':>18}" for t in (768, 3072)))
for name in DISPATCH:
    print(f"{name:<8}" + "".join(f"{1e3 * timing[name, t]:>18.1f}" for t in (768, 3072)))
ratio = {t: timing["einsum", t] / timing["sort", t] for t in (768, 3072)}
print(f"einsum / sort: {ratio[768]:.1f}x at 768 tokens, {ratio[3072]:.1f}x at 3072")

# %% [markdown]
# The einsum's one-hot tensors grow with the square of the tokens (capacity grows with them);
# sort's work grows only with the tokens. The plain loop is a real contender at these sizes: eight
# experts are eight matmuls, and sort pays for sorting and scattering. Which of the two is faster
# here depends on the machine and on the run (this cell's timings are not checked).
# `benchmarks/moe_dispatch.py` measures time and memory up to 8,192 tokens, each point in a fresh
# process, with repeats (the README shows its table).

# %% [markdown]
# ## 2 · GPT-2's tokenizer
# GPT-2 reads bytes (byte-level BPE): 256 byte tokens, 50,000 learned merges and `<|endoftext|>`.
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
# which the logits drift measurably. The tests load checkpoints written by `transformers` and compare
# logits to 1e-5.
#
# Without a network the call fails with the URL and where to put the file (printed relative to the
# data folder). Then the next cells say so plainly and use a **GPT-2-shaped model with random
# weights** — our `GPT` built from `gpt2_config("gpt2")`, exactly the shapes and parameter count of
# GPT-2 124M, but knowing nothing — for what does not need knowledge: upcycling it and checking that
# the MoE computes the same function.

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

# %%
from moe_tutorial.model import GPT

if gpt2_model is None:
    torch.manual_seed(0)
    gpt2_model = GPT(gpt2_config("gpt2")).eval()
    gpt2_source = "a GPT-2-shaped model with RANDOM weights (OpenAI's weights could not be loaded here)"
else:
    gpt2_source = "OpenAI's GPT-2 124M weights"
print(f"Upcycling below uses {gpt2_source}: {gpt2_model.num_params(non_embedding=False):,} parameters")
assert gpt2_model.num_params(non_embedding=False) == infos["gpt2"].total_params

# %% [markdown]
# Fine-tuning GPT-2 124M, let alone its 8-expert upcycle, takes hours on two CPU cores, so the
# fine-tuning experiment of section 5 upcycles notebook 01's *trained* character model, which takes
# minutes. On a GPU replace `dense` by `gpt2_model` (with OpenAI's weights) and the character
# dataset by a BPE one (`Dataset.from_text(text, tokenizer=bpe)`); nothing else changes.

# %%
from moe_tutorial.cached_models import pretrained_char_model
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
# With this course's gates, right after upcycling the MoE computes exactly the dense function, *if no
# token is dropped* (exact preservation is a property of these gates; the paper's routers — top-K in
# the decoder of its T5 encoder-decoders, expert choice in the encoder — do not aim for it):
# - top-2: the two gates are renormalised to sum to 1 over two identical experts → `1 · MLP(x)`;
# - top-1: Switch multiplies by the router probability `p ≈ 1/E`, which would shrink every MLP output.
#   This course's `upcycle` uses a *straight-through* gate instead — value `p / p.detach() = 1`,
#   gradient of `p` — so the output is unchanged and the router still learns from the task loss. That
#   gate is our device, not the paper's (which upcycles with top-2 or expert choice).

# %% [markdown] solutions
# ### ✍️ Exercise 3 — experts from a dense MLP
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

# %% [markdown] solutions-only
# **Why it works.** `nn.Linear` stores `(out, in)`, the experts `(in, out)`: transposing once gives
# the expert layout, and `repeat(E, 1, 1)` makes `E` independent copies, so fine-tuning can move
# each expert its own way.
#
# **Wrong answers the check catches:** weights left untransposed (`(4C, C)` where `(C, 4C)` is
# wanted), and `expand` instead of `repeat` (all experts share one storage: updating one updates all).

# %% [markdown]
# The package's `upcycle()` does this for every MoE layer (`moe_tutorial/upcycle.py`). Compare logits
# — of the GPT-2-shaped model on BPE tokens, and of the character model on validation text. With the
# default evaluation capacity (factor 2.0) some assignments find their expert full (the share is
# printed below): a dropped assignment skips its MLP, and the token's logits change.
# `dropless(model)` lifts the capacity limit (generation always runs that way): then the MoE is the
# dense model, to float rounding.

# %%
from moe_tutorial.data import get_batch
from moe_tutorial.evaluate import max_logit_difference
from moe_tutorial.moe import dropless
from moe_tutorial.upcycle import upcycle

bpe_batch = torch.tensor(bpe.encode(text[:20_000])[:4 * 128]).view(4, 128)
x_val, y_val = get_batch(dataset.val, 16, dense.config.block_size, torch.Generator().manual_seed(0))
for label, base, batch in ((f"GPT-2 shape ({'random' if 'RANDOM' in gpt2_source else 'OpenAI'} weights)",
                            gpt2_model, bpe_batch), ("char model (trained)", dense, x_val)):
    for top_k in (1, 2):
        moe = upcycle(base, n_experts=8, top_k=top_k, moe_every=2)
        capped = max_logit_difference(base, moe, batch)
        with torch.no_grad():
            routings = moe(batch, return_routing=True).routing  # eval mode, as max_logit_difference left it
        # assignments dropped: a top-2 token that loses one choice keeps only g₁·MLP(x)
        dropped = sum((~r.kept).float().mean().item() for r in routings) / len(routings)
        with dropless(moe):
            exact = max_logit_difference(base, moe, batch)
        print(f"{label:<30} top-{top_k}: {moe.num_params() / base.num_params():.1f}x the parameters; max |logit "
              f"difference| {exact:.1e} without drops; at capacity factor 2.0 {dropped:.1%} of assignments "
              f"dropped per MoE layer, max difference {capped:.2f}")
        assert exact < 1e-4
        del moe

# %% [markdown]
# **What the router learns at step 0.** With top-2 over identical experts, the output is
# `(g₁ + g₂) · MLP(x) = MLP(x)` *whatever the gates are*: the task loss does not depend on the router
# at all, so its gradient there is exactly zero (dropless; in training, a capacity drop that leaves
# only `g₁ · MLP(x)` reintroduces a small task gradient). Only the auxiliary losses (load balancing,
# z-loss) move the router until the experts drift apart — which they do because each receives different
# tokens. The straight-through top-1 gate is different: its gradient is `MLP(x)/p`, so the task loss
# moves the router from the first step. Measured on the character model, dropless, task loss only:

# %%
def router_task_gradient(moe_model, x, y):
    """Norm of the task loss's gradient on all router weights (no auxiliary losses)."""
    moe_model.zero_grad()
    with dropless(moe_model):
        logits = moe_model(x).logits
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
    return torch.stack([layer.router.gate.weight.grad.norm() for layer in moe_model.moe_layers()]).norm().item()


router_grads = {k: router_task_gradient(upcycle(dense, n_experts=8, top_k=k, moe_every=2).train(), x_val, y_val)
                for k in (1, 2)}
print(f"router gradient from the task loss at step 0: top-2 {router_grads[2]:.1e}, "
      f"top-1 straight-through {router_grads[1]:.1e}")
assert router_grads[2] < 1e-6 * router_grads[1]

# %% [markdown]
# **Upcycling in practice.** Identical experts must be pushed apart before they can specialise. Over
# long runs an upcycled MoE learns more slowly than one trained from scratch and ends behind it
# (Nakamura et al. 2025): upcycling pays when the extra budget is small. Their Drop-Upcycling
# re-initialises a random part of each copy's hidden units (half, in their best setting); others add
# noise to the copies. Qwen1.5-MoE upcycled into *fine-grained* experts, each a slice of the dense
# MLP's hidden units rather than a whole copy.

# %% [markdown]
# ## 5 · Fine-tuning: continued dense training vs the upcycled MoE, at equal compute
# The upcycling claim: for the same extra training *compute*, the upcycled MoE beats simply training
# the dense model longer. The MoE is top-2 with 8 experts in the 2nd and 4th blocks: each token runs
# two copies of the MLP there, so each MoE step costs more FLOPs than a dense step. We give the dense
# model as many more steps as those FLOPs buy (from `model_info`), same recipe otherwise, and repeat
# over 3 seeds (each seed: another batch order, another router initialisation).

# %%
from statistics import mean

from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.seeds import describe, mean_sd, verdict
from moe_tutorial.train import TrainConfig, evaluation_batches, train

MOE_STEPS, SEEDS = 300, (2024, 2025, 2026)
upcycled_config = upcycle(dense, n_experts=8, top_k=2, moe_every=2).config
flops = {"dense": model_info(dense.config).train_flops_per_token,
         "MoE": model_info(upcycled_config).train_flops_per_token}
DENSE_STEPS = round(MOE_STEPS * flops["MoE"] / flops["dense"])
print(f"training FLOPs per token: dense {flops['dense']:,}, upcycled MoE {flops['MoE']:,} "
      f"({flops['MoE'] / flops['dense']:.2f}x) -> dense {DENSE_STEPS} steps, MoE {MOE_STEPS} steps")


def finetune_config(steps, seed):
    return TrainConfig(batch_size=12, max_iters=steps, learning_rate=1e-3, min_lr=1e-4, warmup_iters=20,
                       eval_interval=50, eval_iters=20, seed=seed, progress=False)


val_batches = fixed_batches(dataset.val, 20, 12, dense.config.block_size, 0)  # one yardstick for every run
start_loss = estimate_loss(dense, val_batches, finetune_config(1, 0))
# train() evaluates each run on batches of its own seed: the curves start from the dense model on those.
start_by_seed = {seed: estimate_loss(dense, evaluation_batches(dataset, "val", finetune_config(1, seed),
                                                               dense.config.block_size), finetune_config(1, seed))
                 for seed in SEEDS}
finals, histories, seconds = {"dense": [], "MoE": []}, {}, {"dense": 0.0, "MoE": 0.0}
for seed in SEEDS:
    for name in ("dense", "MoE"):
        if name == "dense":
            model, steps = copy.deepcopy(dense), DENSE_STEPS
        else:
            model, steps = upcycle(dense, n_experts=8, top_k=2, moe_every=2, seed=seed), MOE_STEPS
        torch.manual_seed(seed)
        histories[name, seed] = train(model, dataset, finetune_config(steps, seed))
        finals[name].append(estimate_loss(model, val_batches, finetune_config(1, 0)))
        seconds[name] += histories[name, seed].elapsed
        if name == "MoE" and seed == SEEDS[0]:
            moe_model = model  # kept for generation in section 6
for name, vals in finals.items():
    print(f"{name:<6} val {mean_sd(vals)[0]:.4f} ± {mean_sd(vals)[1]:.4f} over seeds {[round(v, 4) for v in vals]}")
print(f"starting point (the pretrained dense model): val {start_loss:.4f}")
upcycling_finding = describe("upcycled MoE", finals["MoE"], "dense, continued", finals["dense"])
print(upcycling_finding)
assert max(finals["dense"]) < start_loss and max(finals["MoE"]) < start_loss  # both keep learning
upcycling_call = verdict(finals["MoE"], finals["dense"])
first_eval = {name: mean(histories[name, seed].val_loss[0] - start_by_seed[seed] for seed in SEEDS) for name in finals}
print(f"first evaluation (step {finetune_config(1, 0).eval_interval}) minus the start on the same batches, "
      f"mean of 3 seeds: " + ", ".join(f"{name} {first_eval[name]:+.4f}" for name in finals))

# %%
# NBVAL_IGNORE_OUTPUT
print(f"seconds per run: dense {seconds['dense'] / 3:.0f} ({DENSE_STEPS} steps), MoE {seconds['MoE'] / 3:.0f} "
      f"({MOE_STEPS} steps): the MoE's {MOE_STEPS} steps take {seconds['MoE'] / seconds['dense']:.2f}x the dense "
      f"run's wall time on this CPU")

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for name, color in (("dense", "tab:gray"), ("MoE", "tab:blue")):
    for i, seed in enumerate(SEEDS):
        h = histories[name, seed]
        tokens = [step * 12 * dense.config.block_size * flops[name] / 1e9 for step in [0] + h.eval_step]
        ax.plot(tokens, [start_by_seed[seed]] + h.val_loss, "o-", ms=3, color=color, alpha=0.7,
                label=("dense, continued" if name == "dense" else "upcycled MoE, top-2") if i == 0 else None)
ax.set(xlabel="fine-tuning compute (GFLOP)", ylabel="validation loss (each seed's evaluation batches)",
       title="Sparse upcycling at equal compute (3 seeds each)")
ax.legend()
plt.show()

# %% [markdown]
# **The finding.** At this budget, upcycling ties continued dense training at equal compute: the
# difference is within the seeds' noise (the line printed above). Seed by seed (each seed gives both
# runs the same batches), the MoE ends a little behind each time; three seeds are too few to call it.
# At equal *wall time* on this CPU the dense model would get even more steps. Three things to read in
# the curves:
# - Fine-tuning re-warms the learning rate above the one at which pretraining ended, and Adam's
#   moments start again from zero. The first evaluation sits *above* the starting point: the first
#   steps undo some of the decay's polish before the loss falls again.
# - Each curve is evaluated on its own run's batches (train() draws them from the run's seed), so its
#   end differs a little from the final losses printed above, which use one set of batches for all.
# - The experts start identical, so the MoE can only gain once they have diverged.
#
# The paper's gains (Komatsuzaki et al.) come from T5 and ViT models of hundreds of millions to
# billions of parameters, upcycled with extra training of up to about half their dense pretraining
# cost.

# %%
assert upcycling_call == "tie"
assert all(moe > dense for moe, dense in zip(finals["MoE"], finals["dense"]))  # behind on every seed
assert finetune_config(1, 0).learning_rate > preset("char", 65)[1].min_lr  # the rate is re-warmed
assert min(first_eval.values()) > 0  # the first evaluation sits above the start

# %% [markdown]
# ## 6 · Generation with a KV cache
# Sampling token *t* without a cache reruns the model over all *t* previous tokens, although their
# keys and values never change (the model is causal). A **KV cache** stores each layer's keys and
# values; a decoding step computes q, k, v for the one new token and attends over the stored ones.
# `model.generate` runs the prompt once ("prefill"), then one position per step. (Past `block_size`
# the window slides, every position embedding shifts, and the cache is stale: from there each step
# recomputes the window, exactly like the uncached path.)

# %% [markdown] solutions
# ### ✍️ Exercise 4 — one decoding step of attention
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

# %% [markdown] solutions-only
# **Why it works.** The new token is the last position, so every cached key is in its past: no mask
# is needed, just `softmax(q·kᵀ/√d)·v` over all `T` keys. With `is_causal=True`, SDPA would align its
# mask to the top-left corner and let the single query see only the *first* key.
#
# **Wrong answers the check catches:** the top-left causal mask (attends to the first key only),
# and scores without the `1/√d` scale.

# %% [markdown]
# Generate from the fine-tuned MoE with nucleus sampling (top-p 0.9: sample among the most likely
# characters that together hold 90% of the probability), with and without the cache. Same random
# numbers, so the text must be identical.

# %%
moe_model = moe_model.eval()  # the upcycled MoE of seed 2024, fine-tuned in section 5
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
# The cell above prints the speed-up on this tiny model (it varies by machine, so it is not checked):
# on a model this small (the upcycled MoE of section 5) each step is dominated by per-layer overheads,
# not by the prefix. On GPT-2 124M
# the saving is larger and grows with the length: `benchmarks/generate.py` measures it (the README
# shows its table).

# %% [markdown]
# ### What decoding costs a real MoE
# A decoding step makes one token for each sequence of the batch, and it is bound by memory
# bandwidth: its cost is the bytes of weights it reads. The dense weights are read once per step,
# whatever the batch. An expert is read if at least one token of the batch chose it: with uniform
# routing, a layer of `E` experts with top-`k` reads `E·(1 − (1 − k/E)^B)` of them at batch `B`. At
# batch 1 a step reads the active weights; by a batch of a few dozen to a few hundred tokens (more
# for more experts) it reads nearly every expert, and the cost per token follows the *total*
# parameters divided by the batch. This counts weights only: every sequence also reads its KV cache,
# its bytes per token times its context, which at long contexts outweighs the weights (MLA's point,
# notebook 07). And at large batches the dense parts turn compute-bound. The four MoEs below are
# counted from their published configs (`moe_tutorial/serving.py`, each count tested equal to a
# tiny version built with transformers' own classes).

# %%
from moe_tutorial.serving import (
    PUBLISHED,
    expected_experts_read,
    kv_cache_bytes_per_token,
    parameter_counts,
    weight_bytes_per_token,
)

BATCHES = (1, 8, 64, 512)
print(f"{'model':<16}{'total':>8}{'active':>8}{'KV cache':>10}   bf16 weights read per token (GB) at batch "
      + ", ".join(map(str, BATCHES)))
for name, m in PUBLISHED.items():
    total, active = parameter_counts(m)
    per_token = [weight_bytes_per_token(m, b) / 1e9 for b in BATCHES]
    print(f"{name:<16}{total / 1e9:>7.1f}B{active / 1e9:>7.1f}B{kv_cache_bytes_per_token(m) / 1024:>7.0f} KiB   "
          + "  ".join(f"{g:>7.3f}" for g in per_token))
    assert all(a > b for a, b in zip(per_token, per_token[1:]))  # a larger batch shares the reads
    assert per_token[0] <= 2 * active / 1e9  # batch 1: at most the active weights
v3 = PUBLISHED["DeepSeek-V3"]
print(f"DeepSeek-V3: experts read per MoE layer at batch 1, 8, 64: "
      f"{[round(expected_experts_read(v3.n_experts, v3.top_k, b), 1) for b in (1, 8, 64)]} of {v3.n_experts}")
assert expected_experts_read(v3.n_experts, v3.top_k, 64) > 0.85 * v3.n_experts
v3_active_bytes = 2 * parameter_counts(v3)[1]
assert 0.9 * v3_active_bytes < weight_bytes_per_token(v3, 1) <= v3_active_bytes  # batch 1: the active weights
assert weight_bytes_per_token(v3, 64) > 10 * v3_active_bytes / 64  # a dense model of that size: active / 64
assert kv_cache_bytes_per_token(v3) < kv_cache_bytes_per_token(PUBLISHED["Mixtral-8x7B"])

fig, ax = plt.subplots(figsize=(6.5, 3.4))
batch = [2 ** i for i in range(10)]
for name, m in PUBLISHED.items():
    ax.plot(batch, [weight_bytes_per_token(m, b) / 1e9 for b in batch], "o-", ms=3, label=name)
ax.set(xscale="log", yscale="log", xlabel="decoding batch (sequences)", ylabel="weight GB read per token (bf16)",
       title="Decoding: bytes per token fall with the batch")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# At batch 1 DeepSeek-V3 reads about its active weights per token. At a batch of 64 it reads most of
# its 256 experts in every layer, and a token costs more than ten times what a dense model of its
# active size would (whose reads the 64 tokens would share). Serving an MoE cheaply needs large
# batches, and the whole model in fast memory. (DeepSeek-V3 ships FP8 weights, half these bf16
# bytes.) The KV cache goes the other way: DeepSeek-V3's latent attention (notebook 07) caches less
# per token than Mixtral, a model more than ten times smaller.
#
# Large batches also decide when the experts stop waiting on memory. An expert serves, on average,
# `B·k/E` tokens of the batch. For each token it serves it does 2 FLOPs per weight, and it
# reads each weight (2 bytes in bf16) once per step: its arithmetic intensity is the number of tokens it
# serves, in FLOPs per byte. It is bound by memory until that number reaches the chip's FLOPs per byte
# of bandwidth (the roofline's ridge, notebook 02). A dense layer serves every token of the batch; an
# expert serves `k/E` of them, so the batch must be `E/k` times larger. The batch is the tokens of the
# whole deployment: expert parallelism pools them, every GPU's tokens for each expert on one GPU.

# %%
H100_BF16_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12  # dense bf16 tensor-core peak; HBM3 bandwidth (SXM)
ridge = H100_BF16_FLOPS / H100_BYTES_PER_S  # FLOPs per byte at which a kernel stops waiting on memory
print(f"H100 ridge: {ridge:.0f} FLOPs per byte, so an expert is compute-bound once it serves ~{ridge:.0f} tokens")
print(f"{'model':<16}{'E/k':>6}{'tokens per expert at batch 64':>31}{'batch for compute-bound experts':>33}")
for name, m in PUBLISHED.items():
    print(f"{name:<16}{m.n_experts / m.top_k:>6.0f}{64 * m.top_k / m.n_experts:>31.1f}"
          f"{ridge * m.n_experts / m.top_k:>33,.0f}")
for m in PUBLISHED.values():  # at every batch of the table above, every expert is still memory-bound
    assert max(BATCHES) * m.top_k / m.n_experts < ridge

# %% [markdown] solutions
# ### ✍️ Exercise 5 — count a published MoE
# From a `PublishedMoE` `m` and one layer's attention parameters `attention` (given: its formula
# depends on GQA or MLA), return `(total, active)` parameters: token embedding, lm head (none if
# `m.tie_embeddings`), attention in every layer, two RMSNorms per layer and a final one, SwiGLU MLPs
# (`3 · C · width` each): one dense MLP of `m.dense_hidden` in each of the first `m.n_dense_layers`
# layers, and in every other layer a router (`E · C`), `m.n_experts` routed experts and
# `m.n_shared_experts` shared ones of `m.expert_hidden`. Active: everything but the routed experts a
# token does not run (it runs `m.top_k` of them per MoE layer). The check runs the four models above.

# %% solutions
def published_moe_params(m, attention):
    """m: PublishedMoE, attention: one layer's attention parameters -> (total, active)."""
    # BEGIN SOLUTION
    C = m.hidden_size

    def swiglu(width):
        return 3 * C * width

    always = m.vocab_size * C * (1 if m.tie_embeddings else 2) + m.n_layers * attention + (2 * m.n_layers + 1) * C
    always += m.n_dense_layers * swiglu(m.dense_hidden)
    always += m.n_moe_layers * (m.n_experts * C + m.n_shared_experts * swiglu(m.expert_hidden))  # routers, shared
    routed = m.n_moe_layers * swiglu(m.expert_hidden)  # one routed expert in every MoE layer
    return always + m.n_experts * routed, always + m.top_k * routed
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch05 import check_published_moe_params

passed = check_published_moe_params(published_moe_params)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Everything but the routed experts runs for every token: embeddings, attention,
# norms, routers, dense and shared MLPs. Of each MoE layer's routed experts a token runs `top_k`.
# DeepSeek-V3 shows why each term matters: its 3 dense layers and its shared expert are active for
# every token, and 256 routed experts make its total eighteen times its active count.
#
# **Wrong answers the check catches:** every expert counted as active, the shared experts forgotten,
# the dense first layers counted as MoE layers, a tied lm head counted twice, the routers or the
# norms forgotten, and a call to `serving.parameter_counts`.

# %% [markdown]
# ## 7 · Training the big presets
# On GPUs the same `GPT` and `train()` apply with `TrainConfig(device="cuda", dtype="bfloat16")`:
# bf16 autocast (the routers stay fp32), SDPA's flash kernels, and `torch.compile`.
# `benchmarks/train_gpt2_moe.py` measures tokens/s and model-FLOPs utilisation of GPT-2 124M and the
# 16-expert MoE on one GPU.
#
# The course's largest preset still fits one 80 GB GPU for training (section 1's table). Real MoEs do
# not. Mixtral-8x7B has 46.7B parameters: at 16 bytes per parameter (fp32 master weights, gradients
# and Adam's two moments, as bf16 mixed precision keeps them) that is about 750 GB before any
# activation. DeepSeek-V3 has 671B. Their experts are spread over devices: **notebook 06** (expert
# parallelism with `torch.distributed`).

# %% [markdown]
# ## Summary
# - `model_info`: total parameters set memory, active parameters set FLOPs; MoE grows the first only.
# - GPT-2's BPE tokenizer via `tiktoken` (cached, verified); OpenAI's weights via `from_pretrained`
#   (Conv1D weights transposed, tanh GELU), tested against `transformers` to 1e-5; offline, a
#   GPT-2-shaped model with random weights, said so.
# - `upcycle()`: experts copied from the dense MLP, a straight-through top-1 gate: identical logits
#   without drops (asserted); a top-2 router gets no task-loss gradient at step 0 (measured). Upcycled
#   MoE vs continued dense training at equal compute over 3 seeds: the verdict is printed in section 5.
# - `generate()` uses a KV cache; same tokens as without it (asserted).
# - Three dispatch strategies, same outputs (exercise 2). Decoding a real MoE reads about its active
#   weights at batch 1 and nearly all of them at a few dozen to a few hundred tokens (more for more
#   experts; `serving.py`); each expert serves
#   `B·k/E` tokens of the batch, so experts stay memory-bound until the batch is `E/k` times a dense
#   layer's.
#
# **Where the finalized code lives:** `moe_tutorial/costs.py`, `presets.py`, `tokenizers.py`,
# `pretrained.py`, `upcycle.py`, `kv_cache.py`, `dispatch.py`, `serving.py`, `seeds.py`, `cached_models.py`
# (notebook 01's model). Next:
# **06 · distributed MoE**.
#
# ## Further reading
# - Radford et al. 2019, *Language Models are Unsupervised Multitask Learners* (GPT-2):
#   [PDF](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)
#   — the shapes and the tokenizer used here.
# - Sennrich et al. 2016, *Neural Machine Translation of Rare Words with Subword Units* (BPE):
#   [arXiv:1508.07909](https://arxiv.org/abs/1508.07909).
# - Kaplan et al. 2020, *Scaling Laws for Neural Language Models* — the `6N` FLOPs per token rule:
#   [arXiv:2001.08361](https://arxiv.org/abs/2001.08361).
# - Komatsuzaki et al. 2023, *Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints*:
#   [arXiv:2212.05055](https://arxiv.org/abs/2212.05055).
# - Nakamura et al. 2025, *Drop-Upcycling: Training Sparse Mixture of Experts with Partial
#   Re-initialization*: [arXiv:2502.19261](https://arxiv.org/abs/2502.19261).
# - Pope et al. 2022, *Efficiently Scaling Transformer Inference* — KV caches and decoding costs:
#   [arXiv:2211.05102](https://arxiv.org/abs/2211.05102).
# - Holtzman et al. 2020, *The Curious Case of Neural Text Degeneration* (nucleus sampling):
#   [arXiv:1904.09751](https://arxiv.org/abs/1904.09751).
# - Code: nanoGPT's `model.py` (`from_pretrained`, the Conv1D transposes) and `tiktoken`.
