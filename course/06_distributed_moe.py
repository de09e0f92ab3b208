# %% [markdown]
# # 06 · Outgrowing one machine: data-parallel and expert-parallel MoE
#
# **What you will build.** Nothing home-made: PyTorch's own engine, `torch.distributed`, launched with
# `torchrun`. The course's `train()` runs unchanged on several processes (DDP), and the MoE layer gets
# an expert-parallel dispatch: each process holds a slice of the experts and tokens travel to them
# with `all_to_all`.
#
# **What you will measure.** The all-to-all's volume as a function of tokens, width, `top_k` and the
# number of ranks; real 2-process runs on this machine (gloo on 127.0.0.1): the sharded layer equals
# the full one; how the tokens spread over ranks and experts; what the optimizer step must do
# differently (expert gradients, the clipping norm, the balancing loss and bias); a 2-rank training
# run against one process training on the same batches; training memory per GPU for DeepSeek-V3
# under several layouts; and a 4-rank run whose expert shards have replicas.
#
# **Objectives**
# 1. Tell data, tensor and expert parallelism apart: what each splits, what each communicates.
# 2. Follow one all-to-all: who sends what to whom, and why the counts go first.
# 3. Know what expert parallelism changes after backward: gradient scaling, the global gradient
#    norm, per-rank balancing losses, and the aux-loss-free bias.
# 4. Launch a multi-process run with `torchrun` and read its per-rank loads.
# 5. Know what changes on GPUs and across machines.
#
# Solutions: `solutions/06_distributed_moe_solutions.ipynb`.

# %% solutions
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import moe_tutorial

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · Three ways to split the work
# - **Data parallel (DDP).** Every rank holds the whole model and a different slice of the batch;
#   after backward the gradients are averaged with an *all-reduce*, so every rank takes the same step.
#   Memory per rank: the whole model. Communication: one gradient-sized all-reduce per step.
# - **Tensor parallel.** Each weight matrix is split across ranks (Megatron): every layer needs an
#   all-reduce of activations, in forward and backward, so it is usually kept on a node's fast links.
# - **Expert parallel.** Attention and everything else stay data parallel; each MoE layer's *experts*
#   are divided among the ranks. A token is routed where it is, sent to the rank that owns its expert
#   (**all-to-all**), processed, and sent back (another all-to-all). When the experts are split over
#   all ranks, expert weights are not all-reduced: each rank's experts already saw every rank's
#   tokens (section 3 shows what that means for their gradients). With more ranks than expert
#   shards, each shard has replicas, and those average its gradients (section 4).

# %%
from moe_tutorial.diagrams import all_to_all_diagram, parallelism_diagram

parallelism_diagram()
plt.show()

# %% [markdown]
# ## 2 · The all-to-all
# With `W` ranks and `E` experts, rank `r` owns experts `r·E/W … (r+1)·E/W − 1`. Each rank:
# 1. routes its own tokens and sorts the kept assignments by expert (exactly as `sort_dispatch`);
# 2. **exchanges the counts first** — every rank must know how many rows will arrive from every other
#    rank before the rows can move (`all_to_all_single` with equal splits of `E/W` counts);
# 3. sends its rows: block `s` of its buffer goes to rank `s` (`all_to_all_single` with uneven
#    `input_split_sizes`/`output_split_sizes`);
# 4. runs its local experts on what arrived (regrouped by expert);
# 5. sends the results back with the splits swapped, and combines them with the gates.
#
# Below, 2 ranks with 2 experts each and an uneven routing: rank 1 sends one row to rank 0 and
# keeps the rest, so the two exchanges move blocks of different sizes in the two directions.
# Autograd must flow through both exchanges: the gradient of an all-to-all is the same all-to-all
# with the splits swapped (`moe_tutorial.distributed._AllToAll`).

# %%
all_to_all_diagram(world_size=2, experts_per_rank=2)
plt.show()

# %% [markdown] solutions
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

# %% [markdown] solutions-only
# **Why it works.** Rank `r` owns a contiguous block of `E/W` experts, so counting rows per expert
# (`bincount` with `minlength=E`, which keeps experts that got no rows) and summing each block of
# `E/W` counts gives the rows for each rank — the `counts.view(world, n_local).sum(1)` of
# `ExpertParallelDispatch`.
#
# **Wrong answers the check catches:** one count per expert instead of per rank (8 numbers for
# 8 experts); an even split `[M/W] * W`, which ignores where the rows go; a round-robin owner
# (`expert % W`), which sends `[0, 0, 1, 3, 3, 3, 5, 7]` as `[2, 6]` instead of `[6, 2]`; and a
# `bincount` without `minlength`, which breaks on a rank with no rows (the empty case must give `[0, 0]`).

# %% [markdown] solutions
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

# %% [markdown] solutions-only
# **Why it works.** Each token makes `top_k` rows of `n_embd` numbers; with even routing a fraction
# `(W − 1)/W` of them belongs to other ranks' experts and leaves, and each result comes back as a row
# of the same size: `2 · tokens · top_k · (W − 1)/W · n_embd · bytes`. With one rank nothing moves.
#
# **Wrong answers the check catches:** counting the dispatch only (half the answer); counting every
# row, the ones for this rank's own experts too (`2 · tokens · top_k · n_embd · bytes`); and
# forgetting `top_k` (one row per token).

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
plt.show()
print(f"top-2, W=8: {all_to_all_bytes(8 * 1024, 768, 2, 8, 2) / 2**20:.1f} MiB per rank per MoE layer, forward")
assert all_to_all_bytes(8 * 1024, 768, 2, 8, 2) == 2 * all_to_all_bytes(8 * 1024, 768, 1, 8, 2)

# %% [markdown]
# ## 3 · Real 2-process runs
# `torchrun --nproc_per_node=2` starts two Python processes, gives each `RANK`, `WORLD_SIZE` and a
# rendezvous address, and watches them. `moe_tutorial.distributed.setup()` joins the group: **gloo** on
# CPU (here), **nccl** on GPUs, with a timeout so a missing rank becomes an error, not a hang.
#
# The runs below are scripts of this repository, found from where the `moe_tutorial` package lives
# (so the notebook works from any working directory).

# %%
REPO = Path(moe_tutorial.__file__).resolve().parent.parent  # the checkout the package is installed from
if not (REPO / "benchmarks" / "expert_parallel_stats.py").exists():
    raise FileNotFoundError("this notebook runs benchmarks/expert_parallel_stats.py of the course's repository: "
                            "install the package from a checkout (pip install -e .)")


def torchrun(*args, nproc=2):
    """Run `python -m torch.distributed.run` in the repository; return its output (rank 0 prints)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", *args]  # one machine, a free local port
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share this machine's cores
    failures = []
    for _attempt in range(2):  # a launch can fail outside the code (a peer's socket closing at exit): once more
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        if done.returncode == 0:
            return done.stdout
        failures.append(f"torchrun failed ({done.returncode}):\n{first_traceback(done.stderr)}")
    raise RuntimeError("\n\n".join(failures))


def first_traceback(stderr, limit=4000):
    """The first worker's traceback, where torchrun's own summary at the end of stderr would hide it."""
    start = stderr.find("Traceback")
    return stderr[start:start + limit] if start >= 0 else stderr[-limit:]

# %% [markdown]
# ### 3.1 The sharded layer, and where the rows go
# First `benchmarks/expert_parallel_stats.py`: it checks on every rank that the sharded layer gives the
# same outputs and input gradients as the full layer (the tests also compare every weight gradient),
# then trains the char model's `"Switch top-1"` variant (8 experts in every block) for 20 steps with
# the experts split 4 + 4, and prints a row per step, MoE layer and rank: what the rank sent to whom
# and how many rows each of its experts processed. Below, its first lines, then what the rows add up to.

# %%
STATS_STEPS = 20
stats = torchrun("benchmarks/expert_parallel_stats.py", "--steps", str(STATS_STEPS))
print("\n".join(stats.splitlines()[:10]) + "\n...")
difference = float(stats.split("input gradients ")[1].split()[0])
assert difference < 1e-5

# %%
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.presets import preset
from moe_tutorial.router import capacity

dataset = shakespeare_dataset(progress=False)
switch_cfg, _ = preset("char", dataset.tokenizer.vocab_size, variant="Switch top-1")
W, tokens_per_rank = 2, 12 * switch_cfg.block_size  # the stats script's batch: 12 sequences per rank
cap = capacity(tokens_per_rank, switch_cfg.moe.n_experts, switch_cfg.moe.capacity_factor_train, switch_cfg.moe.top_k)
table = re.findall(r"^\s*\d+\s+\d+\s+(\d+)\s+\[([\d, ]+)\]\s+[\d.]+\s+\[([\d, ]+)\]", stats, re.M)
sent = [(int(rank), [int(n) for n in to.split(",")]) for rank, to, _ in table]  # rows to each rank
expert_rows = [int(n) for *_, rows in table for n in rows.split(",")]  # rows on each expert, per step and layer
left = sum(n for rank, to in sent for dest, n in enumerate(to) if dest != rank) / sum(sum(to) for _, to in sent)
full = sum(n == W * cap for n in expert_rows)
n_moe_layers = sum(switch_cfg.is_moe_layer(i) for i in range(switch_cfg.n_layer))
assert len(table) == STATS_STEPS * n_moe_layers * W  # a row per step, MoE layer and rank
assert max(expert_rows) <= W * cap
print(f"rows that left their rank: {left:.0%} (even routing: (W-1)/W = {(W - 1) / W:.0%})")
print(f"slots per expert on each rank: {switch_cfg.moe.capacity_factor_train} x {tokens_per_rank} tokens / "
      f"{switch_cfg.moe.n_experts} experts = {cap}; most rows an expert can receive: {W} x {cap} = {W * cap}")
print(f"expert-steps that were full: {full} of {len(expert_rows)}")
routed = len(table) * tokens_per_rank  # every rank routes its tokens in every step and MoE layer (top-1)
dropped = 1 - sum(expert_rows) / routed
work = [sum(int(n) for n in rows.split(",")) for *_, rows in table]  # rows each rank's experts processed
busiest = [max(work[i:i + W]) / (sum(work[i:i + W]) / W) for i in range(0, len(work), W)]  # per step and layer
print(f"rows processed: {sum(expert_rows):,} of {routed:,} routed ({dropped:.1%} dropped)")
print(f"busiest rank's rows / the ranks' mean, per step and layer: mean {sum(busiest) / len(busiest):.2f}, "
      f"max {max(busiest):.2f}")
assert abs(left - (W - 1) / W) < 0.1 and 0 < full < len(expert_rows)
assert 0.03 < dropped < 0.4 and max(busiest) > 1.05

fig, axes = plt.subplots(1, n_moe_layers, figsize=(11, 2.6), sharey=True)
for layer, ax in enumerate(axes):
    for rank in range(W):
        rows = [work[(step * n_moe_layers + layer) * W + rank] for step in range(STATS_STEPS)]
        ax.plot(range(STATS_STEPS), rows, "o-", ms=2, label=f"rank {rank}'s experts")
    ax.axhline(tokens_per_rank, color="gray", ls="--", lw=1, label="even split, nothing dropped")
    ax.set(title=f"MoE layer {layer}", xlabel="step", xticks=range(0, STATS_STEPS, 5))
axes[0].set(ylabel="rows processed")
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.1))
fig.suptitle("Work per rank: the busier rank sets each layer's time", y=1.02)
fig.tight_layout()
rows_per_step = [[sum(work[(step * n_moe_layers + layer) * W:(step * n_moe_layers + layer + 1) * W])
                  for step in range(STATS_STEPS)] for layer in range(n_moe_layers)]  # both ranks, per layer
for layer, rows in enumerate(rows_per_step):
    low = min(range(STATS_STEPS), key=rows.__getitem__)
    print(f"MoE layer {layer}: rows processed, share of all routed: lowest {rows[low] / (W * tokens_per_rank):.0%} "
          f"at step {low}, last step {rows[-1] / (W * tokens_per_rank):.0%}")
lowest = min(work) / tokens_per_rank
recovered = [rows[-1] - min(rows) > 0.2 * W * tokens_per_rank for rows in rows_per_step]
assert lowest < 0.7 and any(recovered) and not all(recovered)  # the dip; some layers recover, some not yet

# %% [markdown]
# About `(W−1)/W` of the rows leave their rank, as even routing would send (exercise 2). Capacity is
# counted per rank: each rank gives every expert `cf · tokens / E` slots for its own rows, so an
# expert can receive up to `W` times that. Some experts were full in some steps, and at capacity
# factor 1.25 rows were dropped (how many: the line above).
#
# The ranks' work is uneven too. In each step and layer one rank's experts process more rows than
# the other's, and the other waits for it at the next all-to-all: **the busiest rank sets the step's
# time**. With dispatch that runs each expert on the rows it received (sorted, as here), the ratio
# printed above is how much longer than an even split each MoE layer takes, before communication.
# Balancing matters more once experts live on different devices.
#
# The plot shows a second effect. Over the first steps the routers send more and more tokens to a few
# experts, which fill up: the rows processed fall well below an even share. In some layers the load
# spreads again within these steps; in others it is still falling at the last one (the lines below). At
# this point the learning rate is still warming up, and the balancing loss has yet to catch up with
# the routers (notebook 03).

# %% [markdown]
# ### 3.2 What changes in the optimizer step
# The forward pass above equals the single-process layer. The gradients need two corrections
# before `optimizer.step()`, and one thing stays deliberately per rank. This is the package's code:
# `train_step` calls it between `backward()` and `optimizer.step()`:
# - **Expert gradients ÷ W.** Each rank's loss is the mean over *its own* tokens, and DDP averages
#   the replicated weights' gradients over ranks: together, the gradient of the mean over the global
#   batch. An expert's gradient is different: it already holds the contributions of *every* rank's
#   tokens (their rows came to it), each scaled by its own rank's `1/tokens` — a sum over ranks, `W`
#   times the global-batch gradient. `average_expert_grads` divides it by `W`.
# - **A global gradient norm.** Clipping by `torch.nn.utils.clip_grad_norm_` on each rank would see
#   only that rank's experts: each rank would compute a different norm and scale its replicated
#   weights by a different factor, and the copies would drift apart. `clip_grad_norm_` here sums the
#   squared norms of the expert shards over ranks (one all-reduce) and adds the replicated part once.
# - **The balancing loss, per rank.** Each rank's router loss is computed on its own tokens (the
#   fraction routed to each expert and the mean router probability of *that rank's* tokens), as GShard
#   computes it per group of tokens. The Switch loss multiplies two batch averages, so the mean of the
#   ranks' losses is not exactly the loss of the whole batch: it asks each rank's tokens to be
#   balanced, a slightly different regulariser. (The alternative, a global-batch balancing loss,
#   all-reduces the routed fractions first: one more collective per MoE layer.)

# %% [markdown] solutions
# ### ✍️ Exercise 3 — one gradient norm for the whole model
# After backward and DDP, rank `r` knows `shard_squares[r]`, the squared norm of its own expert shards'
# gradients, and `replicated_square`, the squared norm of the replicated weights' gradients (the same
# on every rank). Return the norm of the whole model's gradient: the one a single process holding
# every expert would clip by.

# %% solutions
def global_grad_norm(shard_squares, replicated_square):
    """[squared norm of each rank's expert shards], squared norm of the replicated part -> the model's norm."""
    # BEGIN SOLUTION
    return (sum(shard_squares) + replicated_square) ** 0.5
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch06 import check_global_grad_norm

passed = check_global_grad_norm(global_grad_norm)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** The model's squared norm is the sum of its parameters' squared gradients. Every
# expert lives on exactly one rank, so the shards' squares add up over ranks (one all-reduce of a
# single number); the replicated weights are one set of parameters held `W` times, so their square
# counts once. One square root at the end.
#
# **Wrong answers the check catches:** the norm one rank sees alone; the replicated part counted once
# per rank; the sum or the mean of the ranks' own norms; norms added instead of squares.

# %% [markdown]
# The package's code for the step:

# %%
from moe_tutorial import distributed
from moe_tutorial import train as training

for function in (training.train_step, training.clip_gradients, distributed.average_expert_grads,
                 distributed.clip_grad_norm_):
    print(inspect.getsource(function))

# %% [markdown]
# The same step, measured. The script below builds the Switch model twice from the same seed — once
# whole, in every process, computing one process's gradients on the whole batch of 24 sequences; once
# sharded over 2 ranks under DDP, each rank taking 12 of the 24 — and compares. Capacity is raised so
# that no token is dropped (otherwise one process and two ranks would drop different tokens). For
# section 3.3 it then trains the aux-loss-free variant for a few steps, twice.

# %%
STEP_SCRIPT = '''
# One step of the Switch model on W ranks (experts sharded, DDP) beside the same step in one process on
# the whole batch; rank 0 prints every rank's measurements as one JSON line.
import gc
import json
from dataclasses import replace

import torch
import torch.distributed as dist

from moe_tutorial import distributed
from moe_tutorial.data import get_batch, shakespeare_dataset
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.train import TrainConfig, make_optimizer, train_step

ranks = distributed.setup()
W, rank = ranks.world_size, ranks.rank
torch.set_num_threads(1)
dataset = shakespeare_dataset(progress=False)
config, _ = preset("char", dataset.tokenizer.vocab_size, variant="Switch top-1")
config = replace(config, moe=replace(config.moe, capacity_factor_train=8.0))  # room for every token: no drops
B = 12  # sequences per rank
x, y = get_batch(dataset.train, B * W, config.block_size, torch.Generator().manual_seed(0))  # the global batch
mine = slice(B * rank, B * (rank + 1))

torch.manual_seed(0)
one = GPT(config)  # one process: every expert, the whole batch
one_out = one(x, y, return_routing=True)
one_out.loss.backward()  # the task loss (the balancing loss is compared separately)

torch.manual_seed(0)
model = distributed.shard_experts(GPT(config))  # the same weights; this rank keeps E/W experts
net = distributed.wrap_for_training(model, "cpu")  # DDP
out = net(x[mine], y[mine], return_routing=True)
out.loss.backward()  # DDP averages the replicated gradients; experts' are left alone

n_local = config.moe.n_experts // W
owned = slice(rank * n_local, (rank + 1) * n_local)  # this rank's experts, in the full model


def expert_grads(m, part=slice(None)):
    return torch.cat([p.grad[part].flatten() for layer in m.moe_layers() for p in layer.experts.parameters()])


def fitted_ratio(g, ref):  # the c that makes g = c * ref closest
    return (g @ ref / (ref @ ref)).item()


def norm(m):  # in float64: the experts' small gradients would be lost in a float32 sum beside the others
    return sum(p.grad.double().square().sum() for p in m.parameters()).sqrt().item()


one_grads = dict(one.named_parameters())
result = dict(
    expert_ratio_before=fitted_ratio(expert_grads(model), expert_grads(one, owned)),
    replicated_error=max(((p.grad - one_grads[name].grad).abs().max() / (one_grads[name].grad.abs().max() + 1e-12))
                         .item() for name, p in model.named_parameters() if not distributed.is_expert_parallel(p)),
)
distributed.average_expert_grads(model, W)  # what train_step does next
result.update(
    expert_ratio_after=fitted_ratio(expert_grads(model), expert_grads(one, owned)),
    local_norm=norm(model),  # what this rank alone would clip by
    global_norm=distributed.clip_grad_norm_(model, max_norm=float("inf")).item(),  # inf: measure, do not clip
    one_norm=norm(one),
    balance_loss=sum(r.aux_loss for r in out.routing).item(),  # this rank's tokens
    one_balance_loss=sum(r.aux_loss for r in one_out.routing).item(),
)

# Aux-loss-free balancing (section 3.3): a few training steps, the biases moved from the counts of
# the whole batch (the package) or from each rank's own counts.
aux_free, _ = preset("char", dataset.tokenizer.vocab_size, variant="aux-loss-free top-1")
train_cfg = TrainConfig(batch_size=B, progress=False)
sum_router_loads = distributed.sum_router_loads


def biases_after(steps, all_reduce_counts):
    torch.manual_seed(0)
    m = distributed.shard_experts(GPT(aux_free))
    net = distributed.wrap_for_training(m, "cpu")
    # False: train_step skips the sum over ranks, and each rank moves its biases by its own counts
    distributed.sum_router_loads = sum_router_loads if all_reduce_counts else (lambda model, group=None: None)
    optimizer = make_optimizer(m, train_cfg)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        xb, yb = get_batch(dataset.train, B * W, aux_free.block_size, batches)
        train_step(net, m, optimizer, [(xb[mine], yb[mine])], train_cfg, train_cfg.learning_rate)
    return torch.stack([layer.router.selection_bias for layer in m.moe_layers()]).tolist()  # (layers, E)


result.update(steps=30, bias_all_reduced=biases_after(30, True), bias_rank_local=biases_after(30, False))
everyone = [None] * W
dist.all_gather_object(everyone, result)
if ranks.is_main:
    print(json.dumps(everyone))
del net, model  # DDP's wrapper holds the process group: let it go before the group is torn down
gc.collect()
dist.barrier()  # no rank tears down its process group while another still talks to it
distributed.cleanup()
'''
script = Path(tempfile.mkdtemp()) / "optimizer_step.py"
script.write_text(STEP_SCRIPT)
step = json.loads(torchrun(str(script)).strip().splitlines()[-1])  # one dict per rank
rows = [("expert gradient / one process's (fitted), before ÷ W", "expert_ratio_before", "{:.4f}"),
        ("expert gradient / one process's (fitted), after ÷ W", "expert_ratio_after", "{:.4f}"),
        ("replicated gradients vs one process's: max rel. error", "replicated_error", "{:.1e}"),
        ("gradient norm this rank alone sees", "local_norm", "{:.4f}"),
        ("gradient norm, clip_grad_norm_ (all ranks' shards)", "global_norm", "{:.4f}"),
        ("balancing loss on this rank's tokens", "balance_loss", "{:.7f}")]
print(f"{'':55}" + "".join(f"{f'rank {r}':>10}" for r in range(len(step))))
for label, key, fmt in rows:
    print(f"{label:55}" + "".join(f"{fmt.format(s[key]):>10}" for s in step))
one_norm, one_balance = step[0]["one_norm"], step[0]["one_balance_loss"]
mean_balance = sum(s["balance_loss"] for s in step) / len(step)
print(f"one process, whole batch: gradient norm {one_norm:.4f}, balancing loss {one_balance:.7f} "
      f"(the ranks' mean: {mean_balance:.7f})")

for s in step:
    assert abs(s["expert_ratio_before"] - len(step)) < 1e-3 and abs(s["expert_ratio_after"] - 1) < 1e-3
    assert s["replicated_error"] < 1e-4  # DDP's average = one process's gradient
    assert abs(s["global_norm"] - one_norm) < 1e-4 * one_norm  # all shards counted once
    assert s["local_norm"] < s["global_norm"] - 1e-4 * one_norm  # one shard alone: a smaller norm
balance = [s["balance_loss"] for s in step]
assert balance[0] != balance[1]  # each rank's loss comes from its own tokens (at init: all near alpha per layer)
assert 0 < abs(mean_balance - one_balance) < 0.05 * one_balance  # close to the whole batch's, not equal

# %% [markdown]
# Read the table: before the division each rank's expert gradients are `W` times one process's,
# after it they are equal; the replicated weights' gradients match one process's to float rounding;
# each rank alone sees a smaller gradient norm than the model's (only its own experts), and the
# all-reduced norm is one process's. The balancing loss is the one quantity that stays per rank: the
# two ranks' losses differ, and their mean is close to, not equal to, the whole batch's.
#
# ### 3.3 Aux-loss-free balancing across ranks
# Aux-loss-free balancing (notebook 04) moves each expert's selection bias after every optimizer
# step, up if the expert got fewer tokens than average, down if more. Under data or expert
# parallelism each rank counts only its own tokens. If each rank moved its bias from its own counts,
# the ranks' biases would drift apart — the same token would be routed differently on different
# ranks. Two pieces of the package prevent that:
# - `train_step` calls `distributed.sum_router_loads`, which sums the counts over ranks
#   (`dist.all_reduce(loads)`) before `GPT.after_optimizer_step` updates the biases, so every rank
#   moves every bias the same way, by the load of the whole batch;
# - `ddp()` passes `broadcast_buffers=False`. The bias and the counts are buffers, and DDP's default
#   copies rank 0's buffers over every other rank's at each forward: that would hide any drift of the
#   bias by forcing rank 0's, and it would erase the other ranks' counts between the micro-batches of
#   a step, before they are summed (`tests/test_distributed.py` checks both: the bias equals one
#   process's with the whole batch, and each rank keeps its own counts).

# %%
print(inspect.getsource(distributed.sum_router_loads))
print(inspect.getsource(distributed.ddp))

# %%
def ranks_differ(key):  # (entries where rank 0's and rank 1's biases differ, the largest difference)
    bias_0, bias_1 = torch.tensor(step[0][key]), torch.tensor(step[1][key])
    return (bias_0 != bias_1).sum().item(), (bias_0 - bias_1).abs().max().item(), bias_0.numel()


local_n, local_max, entries = ranks_differ("bias_rank_local")
shared_n, shared_max, _ = ranks_differ("bias_all_reduced")
print(f"after {step[0]['steps']} training steps of the aux-loss-free Switch model on 2 ranks:")
print(f"  each rank moving its biases from its own counts: {local_n} of {entries} biases (experts x MoE layers) "
      f"differ between the ranks, by up to {local_max:.0e}")
print(f"  the counts all-reduced first (the package):       {shared_n} of {entries} differ (max {shared_max:.0e})")
assert local_n > 0 and shared_n == 0


# %% [markdown]
# ### 3.4 The course's training, on 2 ranks
# Now the course's training entry point itself, unchanged, on 2 ranks with the experts sharded
# (`--expert-parallel`); DDP keeps attention, embeddings and routers in sync and leaves the experts out
# of its all-reduce. 300 steps of the Switch model, batch 12 per rank (24 in all). Its checkpoint is
# sharded: each rank writes its own experts (`moe_tutorial.sharded_checkpoint`), here into a
# temporary folder.

# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
run_dir = tempfile.mkdtemp()  # its sharded checkpoint goes here, not into the repository
run = torchrun("-m", "moe_tutorial.train", "--preset", "char", "--variant", "Switch top-1", "--expert-parallel",
               "--max-iters", "300", "--batch-size", "12", "--sample", "120", "--no-progress", "--out-dir", run_dir)
run_seconds = time.perf_counter() - start
print(run.replace(run_dir, "RUN_DIR"))
shutil.rmtree(run_dir)
print(f"wall time of the 2-rank run, from launch to exit (process start-up and data loading included): "
      f"{run_seconds:.0f} s")

# %% [markdown]
# Did sharding the experts change what the model learns? The reference is one process training the
# same model from the same seed on the same batches: 24 sequences per step instead of 12 on each of
# two ranks. The runs are not identical — capacity and the balancing loss are per rank in the
# 2-rank run — so after 300 steps their losses differ a little, as two training runs do. The claim
# checked is that they agree within a tolerance, on the same validation batches: it is meant to
# catch a broken training path (experts that stop learning, copies of the replicated weights that drift
# apart). It is too blunt for the ÷ W and the norm — Adam's update barely changes when a gradient is
# scaled by a constant — which is why section 3.2 checks those exactly, one step at a time.

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.train import train

single_cfg, single_train = preset("char", dataset.tokenizer.vocab_size, variant="Switch top-1", max_iters=300,
                                  batch_size=24, progress=False)
torch.manual_seed(single_train.seed)  # the CLI seeds the same way: the same initial weights
single = GPT(single_cfg)
start = time.perf_counter()
train(single, dataset, single_train)
print(f"one process, 2 threads, batch 24, 300 steps: {time.perf_counter() - start:.0f} s "
      f"(the two runs share the same 2 cores: neither time is a speed-up measurement)")

# %%
# The 2-rank run evaluated 20 fixed batches of 12 sequences (its per-rank batch); so does this.
same_batches = fixed_batches(dataset.val, single_train.eval_iters, 12, single_cfg.block_size, single_train.seed + 1)
single_val = estimate_loss(single, same_batches, single_train)
val_loss = float(re.search(r"val loss ([\d.]+)", run).group(1))
tokens = dataset.train
bigram_counts = torch.zeros(dataset.tokenizer.vocab_size, dataset.tokenizer.vocab_size)
bigram_counts.index_put_((tokens[:-1], tokens[1:]), torch.ones(len(tokens) - 1), accumulate=True)
bigram_logp = ((bigram_counts + 1) / (bigram_counts + 1).sum(1, keepdim=True)).log()  # add-one smoothed
bigram_val = -bigram_logp[dataset.val[:-1], dataset.val[1:]].mean().item()
TOLERANCE = 0.05  # nats
print(f"val loss after 300 steps: 2 ranks, experts sharded {val_loss:.3f}; one process {single_val:.3f}; "
      f"difference {val_loss - single_val:+.3f} (claim: within ±{TOLERANCE})")
print(f"for scale: the count-based bigram model scores {bigram_val:.3f} on the validation split")
assert abs(val_loss - single_val) < TOLERANCE

# %% [markdown]
# ## 4 · On GPUs and across machines
# - **Backend.** `setup()` picks **nccl** when CUDA is present; each rank drives one GPU
#   (`LOCAL_RANK`). `all_to_all_single` maps onto NVLink/InfiniBand transfers.
# - **Overlap.** Production systems hide the all-to-all behind computation: split the batch into
#   chunks and send chunk *i+1* while the experts run chunk *i* (Tutel, Megatron-Core); DeepSeek-V3's
#   DualPipe overlaps one micro-batch's all-to-all with another's computation. DDP already overlaps its
#   all-reduce with the backward pass, bucket by bucket.
# - **Capacity and drops across devices.** Here capacity is counted per rank (each rank routes its own
#   tokens), so an expert may receive up to `W ×` its per-rank capacity. Systems either cap per
#   expert after the exchange, or drop no tokens at all (dropless MoE, MegaBlocks) at the price of
#   uneven per-GPU work; a hot expert then slows every rank, which is why load balance matters more
#   once experts live on different devices.
# - **Many machines.** The same script, one `torchrun` per node:
#   `torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m moe_tutorial.train ...`.
#   Inside a node the all-to-all runs over NVLink; between nodes over InfiniBand, several times
#   slower. Expert parallelism can still span nodes: DeepSeek-V3 trains with 64-way expert
#   parallelism over 8 nodes and bounds the cross-node traffic with **node-limited routing** — each
#   token's experts are chosen on at most 4 nodes, so a token crosses the network to at most 4 nodes
#   and is forwarded to the GPUs inside each over NVLink (its DeepEP library provides those kernels).
#   This course's `MoEConfig(n_group=..., topk_group=...)` (notebook 07) is that routing rule, with
#   groups standing for nodes. DeepSeek-V3's dispatch also sends a token's row to each node once,
#   however many of its experts sit there, and forwards it inside the node.
# - **Time on the wire against time in the GEMMs.** Per MoE layer and rank, the forward sends about
#   `2 · tokens · k · (W−1)/W · C · bytes` (exercise 2) and computes `2 · tokens · k · 3 · C · H` FLOPs
#   for SwiGLU experts of width `H`: `(W−1)/W · bytes / (3H)` bytes per FLOP. At `H` = 2048 in bf16
#   that is about 1/3000: the transfer takes as long as the GEMMs when the link's bytes/s are a
#   three-thousandth of the GPU's FLOP/s. InfiniBand's 50 GB/s beside a GPU's 1,000 TFLOP/s is a
#   twenty-thousandth: across nodes the all-to-all dominates unless it overlaps the GEMMs or crosses
#   fewer nodes.
# - **Serving.** Inference runs expert parallelism too, with no gradients but the same hot experts:
#   DeepSeek-V3 places *redundant* copies of its busiest experts (in prefill one extra expert on each
#   GPU, in decoding on extra GPUs) and re-balances the placement from observed load (its EPLB library).

# %% [markdown]
# ### Memory per GPU
# Why split at all? Training in bf16 mixed precision keeps, per parameter, bf16 weights and gradients
# (2 + 2 bytes) and fp32 master weights and Adam's two moments (12 bytes): about 16 bytes, before
# activations. (That is the ZeRO paper's accounting; DeepSeek-V3's own recipe, with FP8 matmuls and
# bf16 Adam moments, differs in the details, not in the conclusion.) Layouts for DeepSeek-V3 on 2048
# GPUs, the first four each adding one idea to the one before:
# - **data parallel only**: every GPU holds everything;
# - **expert parallel** over 64 GPUs: each holds 1/64 of the routed experts; the rest is replicated;
# - **ZeRO-1** (Rajbhandari et al. 2020): the 12 bytes of optimizer state are split among the GPUs
#   that hold copies of the same weights, each updating its part. For an expert shard those copies are
#   its replica group, fewer than for the other weights: the more ways the experts are split, the fewer
#   copies each shard has to share its optimizer state with. (ZeRO-2 also splits the gradients.)
# - **pipeline parallel** over 16 stages: each GPU holds the layers of one stage, and micro-batches
#   flow through the stages; the price is idle time at the start and end of each step (the pipeline's
#   bubble). DeepSeek-V3's DualPipe schedule shrinks it by feeding micro-batches from both ends of the
#   pipeline, and overlaps each chunk's all-to-all with another chunk's computation; it keeps two copies
#   of each stage's weights to do so, affordable because expert parallelism has made them small.
# - **ZeRO-3** (FSDP, notebook 05's `--fsdp`) on its own: weights, gradients and optimizer state all
#   split over the 2048 GPUs, each weight gathered over the network when its layer runs.
#
# DeepSeek-V3 trained with the fourth layout: 16 pipeline stages, 64-way expert parallelism, ZeRO-1.

# %%
from moe_tutorial.serving import PUBLISHED, parameter_counts

BYTES = dict(weights=2, grads=2, optimizer=12)  # bf16 weights and gradients; fp32 master, Adam m and v
GPUS = 2048
v3 = PUBLISHED["DeepSeek-V3"]
total, active = parameter_counts(v3)
routed = (total - active) * v3.n_experts // (v3.n_experts - v3.top_k)  # every layer's routed experts
rest = total - routed  # attention, embeddings, dense and shared MLPs, routers, norms: on every GPU of a stage


def gib_per_gpu(ep=1, pp=1, zero=0):
    """Training state on one GPU (GiB): its stage's share of the non-expert weights and of its expert shard.
    ZeRO stage 1 splits the optimizer state among the GPUs holding the same weights, 2 the gradients
    too, 3 the weights too."""
    copies_of_rest, copies_of_experts = GPUS // pp, GPUS // (pp * ep)  # GPUs holding the same weights
    total_bytes = 0.0
    for params, copies in ((rest / pp, copies_of_rest), (routed / (pp * ep), copies_of_experts)):
        split = {name: copies if zero >= stage else 1 for name, stage in (("optimizer", 1), ("grads", 2),
                                                                          ("weights", 3))}
        total_bytes += params * sum(BYTES[name] / split[name] for name in BYTES)
    return total_bytes / 2**30


print(f"DeepSeek-V3: {total / 1e9:.0f} B parameters, {routed / 1e9:.0f} B of them in routed experts; {GPUS} GPUs")
layouts = {"data parallel only": {}, "expert parallel 64": dict(ep=64), "+ ZeRO-1": dict(ep=64, zero=1),
           "+ pipeline parallel 16": dict(ep=64, zero=1, pp=16), "ZeRO-3 alone": dict(zero=3)}
for name, layout in layouts.items():
    print(f"{name:<26}{gib_per_gpu(**layout):>10,.0f} GiB per GPU")
gathered = 2 * total / 2**30  # GiB of bf16 weights a GPU gathers for one pass over the model under ZeRO-3
print(f"ZeRO-3: each GPU gathers {gathered:,.0f} GiB of weights per forward pass, again for the backward")
assert gib_per_gpu() > 100 * 80 and gib_per_gpu(ep=64, zero=1) > 80  # neither fits an 80 GB GPU
assert gib_per_gpu(ep=64, zero=1, pp=16) < 80 / 4 and gib_per_gpu(zero=3) < 80 / 4  # both leave room
assert gathered > 1000  # over a terabyte: at tens of GB/s between nodes, tens of seconds per pass

# %% [markdown]
# Of the first four layouts only the last fits an 80 GB GPU. ZeRO-3 alone fits too, but it pays in
# communication: every GPU gathers every weight of the model in every forward and backward pass, over
# a terabyte each time, where expert parallelism moves only the tokens' rows. The memory left over
# goes to activations. Pipelining divides them less than the weights: with the usual schedule (1F1B)
# the first stage holds activations of about as many micro-batches as there are stages, so
# DeepSeek-V3 also recomputes some of them in the backward pass instead of storing them.

# %% [markdown]
# ### Expert parallelism with replicas
# With `W` ranks and the experts split `EP` ways (`EP < W`), ranks form `W / EP` expert-parallel
# groups of `EP` consecutive ranks. Each group holds every expert and exchanges tokens within itself.
# Shard `s` then lives on ranks `s, s + EP, s + 2·EP, …`: that **replica group** averages its
# gradients, as DDP would, while the non-expert weights are averaged over all `W` ranks.
# `distributed.expert_parallel_groups` computes both; `EP = W` is what this notebook ran.

# %%
from moe_tutorial.distributed import expert_parallel_groups

for world, ep in ((2, 2), (4, 2), (8, 4), (8, 1)):
    ep_groups, replicas = expert_parallel_groups(world, ep)
    print(f"W={world}, EP={ep}: expert-parallel groups {ep_groups}; replica groups {replicas}")
ep_groups, replicas = expert_parallel_groups(4, 2)
assert ep_groups == [[0, 1], [2, 3]] and replicas == [[0, 2], [1, 3]]
assert all(len(group) == 1 for group in expert_parallel_groups(2, 2)[1])  # EP = W: no expert all-reduce

# %% [markdown]
# Only two things change in the step. Each expert shard's gradient holds the tokens of its own
# expert-parallel group only, so its replicas first add up their gradients (one all-reduce per replica
# group), and then the division by `W` makes it the global batch's mean. The clipping norm adds the
# shards' squares over one expert-parallel group, so that each shard counts once, not once per
# replica. `distributed.shard_experts_with_replicas(model, ep_size)` sets both up.
#
# Four ranks, EP 2 × DP 2, on this machine's two cores, with the Switch model (8 experts per layer).
# First one backward pass: after the replicas' sum and the division by `W`, each rank's expert
# gradients must equal one process's on the whole batch. Then a few training steps twice from the same
# seed, once with the experts split over all four ranks (two each), once split two ways and held twice
# (four each): the two runs must end with the same weights, and each shard's two copies must be
# identical. (The weights alone could not catch a wrong division: Adam's step barely changes when a
# gradient is scaled by a constant. The gradient check can.)

# %%
REPLICA_SCRIPT = '''
# The same few steps on 4 ranks, experts split 4 ways (no replicas) and 2 ways (each shard twice);
# rank 0 prints how far apart the two runs' weights are, as one JSON line.
import json
from dataclasses import replace

import torch
import torch.distributed as dist

from moe_tutorial import distributed
from moe_tutorial.data import get_batch, shakespeare_dataset
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.train import TrainConfig, train

ranks = distributed.setup()
W, rank = ranks.world_size, ranks.rank
torch.set_num_threads(1)
dataset = shakespeare_dataset(progress=False)
config, _ = preset("char", dataset.tokenizer.vocab_size, variant="Switch top-1")
config = replace(config, moe=replace(config.moe, capacity_factor_train=8.0))  # no drops: the same tokens either way

# One backward pass: one process on the whole batch, and this rank's slice with experts split 2 ways.
x, y = get_batch(dataset.train, 4 * W, config.block_size, torch.Generator().manual_seed(0))
torch.manual_seed(0)
one = GPT(config)
one(x, y).loss.backward()
torch.manual_seed(0)
model = distributed.shard_experts_with_replicas(GPT(config), ep_size=2)
model(x[4 * rank:4 * (rank + 1)], y[4 * rank:4 * (rank + 1)]).loss.backward()
distributed.average_expert_grads(model, W)  # the replicas' sum, then / W: what train_step does
n_local = config.moe.n_experts // 2
mine = slice((rank % 2) * n_local, (rank % 2 + 1) * n_local)  # this rank's experts in the full model
full = dict(one.named_parameters())
gradient_error = max(((p.grad - full[name].grad[mine]).abs().max() / full[name].grad[mine].abs().max()).item()
                     for name, p in model.named_parameters() if distributed.is_expert_parallel(p))
errors = [None] * W
dist.all_gather_object(errors, gradient_error)

recipe = TrainConfig(batch_size=4, max_iters=5, eval_interval=5, eval_iters=1, progress=False)  # 4 x 4 sequences
weights = {}
for ep_size in (4, 2):
    torch.manual_seed(0)
    model = GPT(config)
    if ep_size == 4:
        distributed.shard_experts(model)
    else:
        distributed.shard_experts_with_replicas(model, ep_size)
    train(model, dataset, recipe)
    weights[ep_size] = {name: p.detach() for name, p in model.named_parameters()}
everyone = [None] * ranks.world_size
dist.all_gather_object(everyone, weights)
if ranks.is_main:
    experts = [name for name in weights[2] if ".experts." in name]
    # Rank r holds shard r % 2 of the 2-way split: experts 4s..4s+3, which the 4-way split put on ranks 2s, 2s + 1.
    shard_vs_split = max((everyone[r][2][n] - torch.cat([everyone[2 * (r % 2) + i][4][n] for i in range(2)]))
                         .abs().max().item() for r in range(4) for n in experts)
    replicas = max((everyone[r][2][n] - everyone[r % 2][2][n]).abs().max().item() for r in range(4) for n in experts)
    others = max((everyone[r][2][n] - everyone[r][4][n]).abs().max().item()
                 for r in range(4) for n in weights[2] if n not in experts)
    print(json.dumps(dict(gradient_error=max(errors), shard_vs_split=shard_vs_split, replicas=replicas,
                          others=others)))
dist.barrier()
distributed.cleanup()
'''
replica_script = Path(tempfile.mkdtemp()) / "replicas.py"
replica_script.write_text(REPLICA_SCRIPT)
replica_run = json.loads(torchrun(str(replica_script), nproc=4).strip().splitlines()[-1])
print(f"expert gradients, replicas summed and / W, against one process on the whole batch: "
      f"max relative error {replica_run['gradient_error']:.1e}")
print("after 5 steps on 4 ranks, experts split 2 ways (held twice) vs 4 ways: max |difference|")
print(f"  expert weights, each shard against the same experts split 4 ways  {replica_run['shard_vs_split']:.1e}")
print(f"  expert weights, a shard's two copies                              {replica_run['replicas']:.1e}")
print(f"  every other weight                                                {replica_run['others']:.1e}")
assert replica_run["gradient_error"] < 1e-4  # the gradient of the global batch's mean loss
assert replica_run["replicas"] == 0.0  # the copies add the same gradients: identical
assert replica_run["shard_vs_split"] < 1e-5 and replica_run["others"] < 1e-5  # the same run, to float rounding

# %% [markdown]
# ## Summary
# - Data parallel: the whole model per rank, gradients all-reduced (DDP). Expert parallel: experts
#   divided among ranks, tokens exchanged with two all-to-alls per MoE layer (counts first), autograd
#   through both; expert weights are all-reduced only over a shard's replicas, if it has any
#   (`shard_experts_with_replicas`: 4 ranks, EP 2 × DP 2, train as the experts split 4 ways).
# - Volume per rank per layer, forward: `2 · tokens · top_k · (W−1)/W · C · bytes`.
# - After backward: expert gradients ÷ W (they are sums over ranks, DDP's are means), the clipping
#   norm all-reduced over the expert shards, the balancing loss per rank; aux-loss-free counts
#   all-reduced before the bias moves, and DDP told not to broadcast buffers.
# - `torchrun -m moe_tutorial.train --expert-parallel` trains the course's model on several processes;
#   the tests check that the sharded layer equals the single-process one (outputs and every gradient)
#   and that 2-rank DDP equals one process with the doubled batch.
# - The busiest rank sets each MoE layer's time; early in training the load drifts far from even.
# - Memory: about 16 bytes per parameter of training state; DeepSeek-V3 fits 80 GB GPUs only with
#   expert parallelism, ZeRO-1 and pipeline stages together.
#
# **Where the finalized code lives:** `moe_tutorial/distributed.py`, `train.py` (`train_step`,
# `clip_gradients`), `model.py` (`after_optimizer_step`), `cli.py`; `benchmarks/expert_parallel_stats.py`.

# %% [markdown]
# ## Further reading
# Papers:
# - [Lepikhin et al. 2020, *GShard*](https://arxiv.org/abs/2006.16668) — experts sharded over
#   devices with all-to-all, capacity and the per-group balancing loss. GShard exchanges fixed
#   (E, C, d) capacity buffers; this notebook sends uneven splits, the counts first (Megatron, Tutel).
# - [Fedus et al. 2021, *Switch Transformers*](https://arxiv.org/abs/2101.03961) — top-1 routing and
#   how experts, data and model parallelism combine (its section on distributed Switch).
# - [Rajbhandari et al. 2022, *DeepSpeed-MoE*](https://arxiv.org/abs/2201.05596) — expert, data and
#   tensor parallelism together, for training and inference.
# - [Hwang et al. 2022, *Tutel*](https://arxiv.org/abs/2206.03382) — adaptive parallelism and
#   pipelining of the all-to-all with the experts' work; hierarchical all-to-all.
# - [Gale et al. 2022, *MegaBlocks*](https://arxiv.org/abs/2211.15841) — dropless MoE with
#   block-sparse kernels: no capacity, uneven work per expert.
# - [DeepSeek-AI 2024, *DeepSeek-V3 Technical Report*](https://arxiv.org/abs/2412.19437) — cross-node
#   expert parallelism, node-limited routing, computation–communication overlap (its infrastructure section).
# - [Li et al. 2020, *PyTorch Distributed: Experiences on Accelerating Data Parallel Training*](https://arxiv.org/abs/2006.15704)
#   — how DDP buckets gradients and overlaps the all-reduce with backward.
#
# Code:
# - [`torch.distributed.all_to_all_single`](https://docs.pytorch.org/docs/stable/distributed.html#torch.distributed.all_to_all_single)
#   — the collective used here: `input_split_sizes` / `output_split_sizes`.
# - [Megatron-LM's MoE token dispatcher](https://github.com/NVIDIA/Megatron-LM/blob/main/megatron/core/transformer/moe/token_dispatcher.py)
#   — the production version of `ExpertParallelDispatch`: permute, counts, all-to-all, unpermute.
# - [DeepEP](https://github.com/deepseek-ai/DeepEP) — DeepSeek's dispatch/combine kernels for
#   expert parallelism over NVLink and RDMA.
