# %% [markdown]
# # 06 · Outgrowing one machine: data-parallel and expert-parallel MoE
#
# **What you will build.** Nothing home-made: PyTorch's own engine, `torch.distributed`, launched with
# `torchrun`. The course's `train()` runs unchanged on several processes (DDP), and the MoE layer gets
# an expert-parallel dispatch: each process holds a slice of the experts and tokens travel to them
# with `all_to_all`.
#
# **What you will measure.** The all-to-all's volume as a function of tokens, width, `top_k` and the
# number of ranks; a real 2-process run on this machine (gloo on 127.0.0.1): the sharded layer equals
# the full one, and how the tokens spread over ranks and experts.
#
# **Objectives**
# 1. Tell data, tensor and expert parallelism apart: what each splits, what each communicates.
# 2. Follow one all-to-all: who sends what to whom, and why the counts go first.
# 3. Launch a multi-process run with `torchrun` and read its per-rank loads.
# 4. Know what changes on GPUs and across machines.
#
# Solutions: `solutions/06_distributed_moe_solutions.ipynb`.

# %% solutions
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import torch

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · Three ways to split the work
# - **Data parallel (DDP).** Every rank holds the whole model and a different slice of the batch;
#   after backward the gradients are averaged with an *all-reduce*, so every rank takes the same step.
#   Memory per rank: the whole model. Communication: one gradient-sized all-reduce per step.
# - **Tensor parallel.** Each weight matrix is split across ranks (Megatron): every layer needs an
#   all-reduce of activations, in forward and backward. Worth it only over very fast links (one node).
# - **Expert parallel.** Attention and everything else stay data parallel; each MoE layer's *experts*
#   are divided among the ranks. A token is routed where it is, sent to the rank that owns its expert
#   (**all-to-all**), processed, and sent back (another all-to-all). Expert weights are never
#   all-reduced: each rank's experts already saw every rank's tokens.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
colors = plt.cm.tab10.colors
for ax, title in zip(axes, ("data parallel", "tensor parallel", "expert parallel")):
    ax.set(xlim=(0, 4), ylim=(0, 3), xticks=[], yticks=[], title=title)
    for rank in range(2):
        x0 = 0.2 + 2 * rank
        ax.add_patch(plt.Rectangle((x0, 0.2), 1.6, 2.6, fill=False, ls="--", color="gray"))
        ax.text(x0 + 0.8, 2.55, f"rank {rank}", ha="center", fontsize=9)
        ax.text(x0 + 0.8, 0.35, f"batch slice {rank}" if title != "tensor parallel" else "whole batch",
                ha="center", fontsize=8)
        if title == "data parallel":
            ax.add_patch(plt.Rectangle((x0 + 0.2, 0.7), 1.2, 1.6, color=colors[0], alpha=0.5))
            ax.text(x0 + 0.8, 1.5, "all weights", ha="center", fontsize=8)
        elif title == "tensor parallel":
            ax.add_patch(plt.Rectangle((x0 + 0.2 + 0.6 * rank, 0.7), 0.6, 1.6, color=colors[1], alpha=0.5))
            ax.text(x0 + 0.8, 1.5, "half of\nevery matrix", ha="center", fontsize=8)
        else:
            ax.add_patch(plt.Rectangle((x0 + 0.2, 1.7), 1.2, 0.6, color=colors[0], alpha=0.5))
            ax.text(x0 + 0.8, 1.95, "attention (all)", ha="center", fontsize=8)
            for e in range(4):
                ax.add_patch(plt.Rectangle((x0 + 0.2 + 0.3 * e, 0.8), 0.25, 0.7, color=colors[(4 * rank + e) % 10]))
                ax.text(x0 + 0.32 + 0.3 * e, 1.1, str(4 * rank + e), ha="center", fontsize=7)
    label = {"data parallel": "all-reduce gradients", "tensor parallel": "all-reduce activations (every layer)",
             "expert parallel": "all-to-all tokens (MoE layers)"}[title]
    ax.annotate("", xy=(2.3, 1.2), xytext=(1.7, 1.2), arrowprops=dict(arrowstyle="<->", color="black"))
    ax.text(2.0, 0.05, label, ha="center", fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 2 · The all-to-all
# With `W` ranks and `E` experts, rank `r` owns experts `r·E/W … (r+1)·E/W − 1`. Each rank:
# 1. routes its own tokens and sorts the kept assignments by expert (exactly as `sort_dispatch`);
# 2. **exchanges the counts first** — every rank must know how many rows will arrive from every other
#    rank before the rows can move (`all_to_all_single` with equal splits of `E/W` counts);
# 3. sends its rows: block `r` of its buffer goes to rank `r` (`all_to_all_single` with uneven
#    `input_split_sizes`/`output_split_sizes`);
# 4. runs its local experts on what arrived (regrouped by expert), and sends results back with the
#    splits swapped; 5. combines them with the gates.
#
# Autograd must flow through both exchanges: the gradient of an all-to-all is the same all-to-all
# with the splits swapped (`moe_tutorial.distributed._AllToAll`).
#
# ### ✍️ Exercise 1 — how many rows go to each rank
# Rows are sorted by expert; `expert` (M,) holds each row's expert. Return the number of rows to send
# to each of the `world_size` ranks (a list of ints): the `input_split_sizes` of step 3.

# %% solutions
def send_splits(expert, n_experts, world_size):
    """expert (M,) sorted -> [rows for rank 0, rows for rank 1, ...]."""
    # BEGIN SOLUTION
    per_expert = torch.bincount(expert, minlength=n_experts)  # (E,)
    return per_expert.view(world_size, n_experts // world_size).sum(dim=1).tolist()
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch06 import check_send_splits

passed = check_send_splits(send_splits)
assert passed  # solutions-only

# %% [markdown]
# ### ✍️ Exercise 2 — the communication volume
# With even routing and no drops, how many bytes does one rank send per MoE layer in the forward
# pass? It has `tokens` tokens, each with `top_k` assignments of `n_embd` numbers; assignments for its
# own experts (a fraction `1/W`) stay home; results come back the same way.

# %% solutions
def all_to_all_volume(tokens, n_embd, top_k, world_size, bytes_per_element):
    """Bytes one rank sends per MoE layer, forward pass (dispatch + combine)."""
    # BEGIN SOLUTION
    remote_rows = tokens * top_k * (world_size - 1) / world_size
    return 2 * remote_rows * n_embd * bytes_per_element
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch06 import check_all_to_all_volume

passed = check_all_to_all_volume(all_to_all_volume)
assert passed  # solutions-only

# %% [markdown]
# What that means for GPT-2-sized MoE layers (C = 768, bf16, 8 sequences of 1,024 tokens per rank):
# the volume grows linearly with tokens, width and `top_k`, and approaches its maximum quickly with `W`.
# The backward pass sends as much again; an all-reduce of the replicated weights comes on top.

# %%
from moe_tutorial.distributed import all_to_all_bytes

worlds = [1, 2, 4, 8, 16, 32, 64]
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for top_k in (1, 2):
    ax.plot(worlds, [all_to_all_bytes(8 * 1024, 768, top_k, w, 2) / 2**20 for w in worlds], "o-", label=f"top-{top_k}")
ax.set(xscale="log", xticks=worlds, xticklabels=worlds, xlabel="ranks (W)", ylabel="MiB per rank per MoE layer",
       title="all-to-all volume, forward (C=768, bf16, 8k tokens per rank)")
ax.legend()
print(f"top-2, W=8: {all_to_all_bytes(8 * 1024, 768, 2, 8, 2) / 2**20:.1f} MiB per rank per MoE layer, forward")
assert all_to_all_bytes(8 * 1024, 768, 2, 8, 2) == 2 * all_to_all_bytes(8 * 1024, 768, 1, 8, 2)

# %% [markdown]
# ## 3 · A real 2-process run
# `torchrun --nproc_per_node=2` starts two Python processes, gives each `RANK`, `WORLD_SIZE` and a
# rendezvous address, and watches them. `moe_tutorial.distributed.setup()` joins the group: **gloo** on
# CPU (here), **nccl** on GPUs, with a timeout so a missing rank becomes an error, not a hang.
#
# First `benchmarks/expert_parallel_stats.py`: it checks on every rank that the sharded layer gives the
# same outputs and input gradients as the full layer (the tests also compare every weight gradient),
# then trains the notebook-04 Switch model for 5 steps with 8 experts split 4 + 4, and prints what each
# rank sent to whom and how many rows each of its experts processed.

# %%
def torchrun(*args, nproc=2):
    """Run `python -m torch.distributed.run` on this machine; return its output (rank 0 prints)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", *args]  # one machine, a free local port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd="..")
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


stats = torchrun("benchmarks/expert_parallel_stats.py", "--steps", "5")
print(stats)
difference = float(stats.split("input gradients ")[1].split()[0])
assert difference < 1e-5

# %% [markdown]
# Each rank sends roughly half its rows to the other rank (its tokens pick the other rank's experts
# about half the time) — the `(W−1)/W` of exercise 2. The load on each expert is the sum over both
# ranks' tokens; an expert at 240 rows is full (capacity 120 per rank's 768 tokens, from each rank).
#
# Now the course's training entry point itself, unchanged, on 2 ranks with the experts sharded
# (`--expert-parallel`); DDP keeps attention, embeddings and routers in sync and leaves the experts out
# of its all-reduce. 300 steps of the Switch model, batch 12 per rank (24 in all):

# %%
# NBVAL_IGNORE_OUTPUT
run = torchrun("-m", "moe_tutorial.train", "--preset", "char", "--variant", "Switch top-1", "--expert-parallel",
               "--max-iters", "300", "--batch-size", "12", "--sample", "120", "--no-progress")
print(run)

# %%
val_loss = float(run.split("val loss ")[1].split()[0])
print(f"2-rank expert-parallel run: val loss {val_loss:.3f} after 300 steps")
assert val_loss < 2.3

# %% [markdown]
# ## 4 · On GPUs and across machines
# - **Backend.** `setup()` picks **nccl** when CUDA is present; each rank drives one GPU
#   (`LOCAL_RANK`). `all_to_all_single` maps onto NVLink/InfiniBand transfers.
# - **Overlap.** Production systems hide the all-to-all behind computation: split the batch into
#   chunks and send chunk *i+1* while the experts run chunk *i* (DeepSpeed-MoE, Megatron, Tutel); DDP
#   already overlaps its all-reduce with the backward pass, bucket by bucket.
# - **Capacity and drops across devices.** Here capacity is counted per rank (each rank routes its own
#   tokens), so an expert may receive up to `W ×` its per-rank capacity. Systems either cap per
#   expert after the exchange, or drop no tokens at all (dropless MoE, MegaBlocks) at the price of
#   uneven per-GPU work; a hot expert then slows every rank, which is why load balance matters more
#   once experts live on different devices.
# - **Many machines.** The same script, one `torchrun` per node:
#   `torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m moe_tutorial.train ...`.
#   Expert parallelism is usually kept inside a node (fast links) and data parallelism across nodes.
#
# ## Summary
# - Data parallel: the whole model per rank, gradients all-reduced (DDP). Expert parallel: experts
#   divided among ranks, tokens exchanged with two all-to-alls per MoE layer (counts first), autograd
#   through both; expert weights are not all-reduced.
# - Volume per rank per layer, forward: `2 · tokens · top_k · (W−1)/W · C · bytes`.
# - `torchrun -m moe_tutorial.train --expert-parallel` trains the course's model on several processes;
#   the tests check that the sharded layer equals the single-process one (outputs and every gradient)
#   and that 2-rank DDP equals one process with the doubled batch.
#
# **Where the finalized code lives:** `moe_tutorial/distributed.py`, `train.py`, `cli.py`;
# `benchmarks/expert_parallel_stats.py`.
