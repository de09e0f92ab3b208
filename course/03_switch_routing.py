# %% [markdown]
# # 03 · Mixture of Experts: the Switch layer
#
# **What you will build.** A Mixture-of-Experts (MoE) feed-forward layer with Switch Transformer
# top-1 routing: a router, expert capacity and token dropping, the load-balancing loss and the
# router z-loss. Then you put it in the GPT of notebook 01 and look inside with an interactive
# routing explorer.
#
# **What you will measure.** Parameters vs compute per token; validation loss of a dense model
# and a Switch MoE with the same compute per token and the same training budget; expert load and
# dropped tokens over training, with and without the load-balancing loss.
#
# **Objectives**
# 1. Know what MoE buys: more parameters at the same compute per token.
# 2. Build a router and top-1 routing; understand capacity and dropping.
# 3. Derive the load-balancing loss `α·E·Σ f_i·P_i` and the z-loss.
# 4. Check a from-scratch MoE layer against `moe_tutorial.moe.MoE`.
# 5. Train dense vs MoE, and watch routing collapse without the auxiliary loss.
#
# Solutions: `solutions/03_switch_routing_solutions.ipynb`.

# %% solutions
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · Why experts?
# In a transformer most parameters and FLOPs sit in the feed-forward MLPs. An MoE layer keeps
# `E` MLPs ("experts") and sends each token to only one (or `k`) of them. Parameters grow `E`-fold;
# the compute per token stays that of one MLP (plus a tiny router). For the char model of
# notebook 01, with every other block an MoE of 8 experts:

# %%
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT


def ffn_counts(config):
    """(total parameters, parameters used per token) of the model."""
    model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(m.experts.c_fc.numel() + m.experts.c_proj.numel() for m in model.moe_layers())
    active = total - inactive * (1 - config.moe.top_k / config.moe.n_experts) if config.moe else total
    return total, int(active)


dense_cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
moe_cfg = GPTConfig(**{**dense_cfg.to_dict(), "moe": MoEConfig(n_experts=8, top_k=1, every=2)})
for name, cfg in (("dense", dense_cfg), ("Switch MoE, E=8", moe_cfg)):
    total, active = ffn_counts(cfg)
    print(f"{name:<16} total {total:>9,} parameters, {active:>8,} used per token")

# %% [markdown]
# About 3.4× the parameters for the same matrix multiplications per token (the router adds
# `C × E` = 1,024 multiply-adds per token and MoE layer). Whether those extra parameters help is
# what section 6 measures.
#
# ## 2 · A router from scratch
# The router is a linear layer from the token's `C` features to `E` logits. A softmax turns them
# into probabilities; Switch routing sends the token to its single most probable expert and
# multiplies that expert's output by the probability (the **gate**), which is how the router
# learns: its only gradient from the language-model loss flows through the gate.

# %%
torch.manual_seed(0)
N, C, E = 12, 16, 4  # a toy batch: 12 tokens, 16 features, 4 experts
x = torch.randn(N, C)
router_weight = torch.randn(E, C) * 0.5

logits = x @ router_weight.T  # (N, E)
probs = F.softmax(logits, dim=-1)
gate, expert = probs.max(dim=-1)  # top-1: (N,) each
print("expert per token:", expert.tolist())
print("gate per token:  ", [round(g, 2) for g in gate.tolist()])

from moe_tutorial.router import Router

router = Router(C, MoEConfig(n_experts=E, top_k=1))
with torch.no_grad():
    router.gate.weight.copy_(router_weight)
routing = router(x, capacity_factor=1.0)
assert torch.equal(routing.expert[:, 0], expert) and torch.allclose(routing.weights[:, 0], gate)
print("the package's Router agrees")

# %% [markdown]
# The package computes the router in **fp32 even under bf16 autocast** ("selective precision" in
# the Switch paper): a softmax over experts is sensitive to rounding, and a mis-rounded router
# sends tokens to the wrong expert.
#
# ## 3 · Capacity and dropped tokens
# To run experts as fixed-size batches (and to bound the worst case), each expert gets a
# **capacity**: `ceil(capacity_factor · N / E)` slots. Tokens arrive in sequence order; once an
# expert is full, later tokens sent to it are **dropped**: the layer outputs zero for them and the
# residual connection carries them to the next block unchanged. Switch Transformer trains with a
# capacity factor of 1.25 and evaluates with 2.0.

# %%
from moe_tutorial.router import capacity

cap = capacity(N, E, capacity_factor=1.0)
print(f"{N} tokens, {E} experts, capacity factor 1.0 -> {cap} slots per expert")
routing = router(x, capacity_factor=1.0)
kept = routing.kept[:, 0]
print("kept:", kept.int().tolist(), f"-> {int((~kept).sum())} dropped")

fig, ax = plt.subplots(figsize=(7, 2.4))
for t in range(N):
    e = expert[t].item()
    ax.scatter(t, e, s=220, marker="s", color="tab:blue" if kept[t] else "white", edgecolor="tab:red" if not kept[t]
               else "tab:blue", linewidth=2)
for e in range(E):
    ax.text(N - 0.2, e, f"{int((expert[kept] == e).sum())}/{cap}", va="center")
ax.set(xlabel="token (arrival order)", ylabel="expert", yticks=range(E), xticks=range(N),
       title="top-1 routing with capacity: filled = processed, hollow red = dropped")
plt.show()

# %% [markdown]
# ### ✍️ Exercise 1 — who fits?
# Given each token's expert (top-1, shape `(N,)`), the number of experts and the capacity, return a
# bool tensor `kept` of shape `(N,)`: a token is kept if fewer than `capacity` earlier tokens chose
# the same expert. No Python loop over tokens needed (hint: `F.one_hot` and `cumsum`).

# %% solutions
def assign_with_capacity(expert, n_experts, capacity):
    """expert (N,) -> kept (N,) bool: the first `capacity` tokens of each expert are kept."""
    # BEGIN SOLUTION
    one_hot = F.one_hot(expert, n_experts)  # (N, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # arrival order at its expert
    return position < capacity
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch03 import check_assign_with_capacity

passed = check_assign_with_capacity(assign_with_capacity)
assert passed  # solutions-only

# %% [markdown]
# ## 4 · Keeping the experts busy: the load-balancing loss
# Nothing in the language-model loss asks the router to spread tokens. Left alone, a router tends
# to favour a few experts, they get better, it favours them more — *collapse*: most experts idle,
# most tokens dropped. Switch Transformer adds
#
# $$\mathcal{L}_{\text{aux}} = \alpha \cdot E \cdot \sum_{i=1}^{E} f_i \, P_i,$$
#
# - `f_i`: the fraction of tokens whose top choice is expert *i* — a count, so it has no gradient;
# - `P_i`: the mean router probability of expert *i* over all tokens — differentiable.
#
# Why this form? The gradient with respect to `P_i` is `α·E·f_i`: experts that receive many tokens
# get their probability pushed down hardest. With a uniform router `f_i = P_i = 1/E`, so
# `E · Σ 1/E² = 1`: the loss is exactly `α` when balanced, and `α·E` when one expert takes
# everything. `α = 0.01` by default.
#
# ### ✍️ Exercise 2 — the load-balancing loss
# From router probabilities `(N, E)`, return `E · Σ f_i · P_i` (without α) as a scalar tensor.

# %% solutions
def switch_load_balancing_loss(probs):
    """probs (N, E) -> E * sum_i f_i * P_i, f_i from each token's top choice (no gradient)."""
    # BEGIN SOLUTION
    N, E = probs.shape
    f = torch.bincount(probs.argmax(dim=-1), minlength=E).float() / N  # counts: no gradient
    P = probs.mean(dim=0)
    return E * (f * P).sum()
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch03 import check_switch_load_balancing_loss

passed = check_switch_load_balancing_loss(switch_load_balancing_loss)
assert passed  # solutions-only

# %% [markdown]
# ## 5 · The router z-loss
# ST-MoE found that large router logits make training unstable (softmax saturates, bf16 rounding
# bites). The **z-loss** `mean_tokens( logsumexp(logits)² )`, weighted by 1e-3, keeps them small
# without changing which expert wins.
#
# ### ✍️ Exercise 3 — the z-loss
# Return the z-loss (without its coefficient) of router logits `(N, E)` as a scalar tensor.

# %% solutions
def router_z_loss(logits):
    """logits (N, E) -> mean over tokens of logsumexp(logits)^2."""
    # BEGIN SOLUTION
    return torch.logsumexp(logits, dim=-1).square().mean()
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch03 import check_router_z_loss

passed = check_router_z_loss(router_z_loss)
assert passed  # solutions-only

# %% [markdown]
# ## 6 · The whole layer, from scratch, against the package
# Putting it together: route, find who fits, run each expert on its tokens, scale by the gate,
# put the results back in place. This version loops over experts for clarity. The package's
# `MoE` does the same with the experts' weights stacked in `(E, C, H)` tensors: it sorts the kept
# tokens by expert and runs all experts with one grouped matrix multiply
# (`moe_tutorial.dispatch.sort_dispatch`).

# %%
from moe_tutorial.moe import MoE
from moe_tutorial.router import positions_in_expert


def scratch_moe(x, router_weight, w_fc, w_proj, capacity_factor):
    """x (N, C); router_weight (E, C); w_fc (E, C, H); w_proj (E, H, C) -> (N, C)."""
    N, E = x.size(0), router_weight.size(0)
    probs = F.softmax(x @ router_weight.T, dim=-1)
    gate, expert = probs.max(dim=-1)
    cap = math.ceil(capacity_factor * N / E)
    kept = positions_in_expert(expert[:, None], E)[:, 0] < cap
    out = torch.zeros_like(x)
    for e in range(E):
        mine = (expert == e) & kept  # this expert's tokens that fit
        h = F.gelu(x[mine] @ w_fc[e])
        out[mine] = gate[mine, None] * (h @ w_proj[e])
    return out


config = GPTConfig(vocab_size=65, n_embd=32, n_head=4, moe=MoEConfig(n_experts=4, capacity_factor_eval=1.0))
layer = MoE(config).eval()
x = torch.randn(2, 24, 32)  # (B, T, C)
ours = scratch_moe(x.view(-1, 32), layer.router.gate.weight, layer.experts.c_fc, layer.experts.c_proj, 1.0)
theirs, aux_loss = layer(x)  # the layer also returns its weighted balancing losses (sections 4-5)
theirs = theirs.view(-1, 32)
print(f"max |difference| {(ours - theirs).abs().max():.1e}; "
      f"dropped {int(layer.last_routing.dropped.sum())} of {x.shape[0] * x.shape[1]} tokens")
assert torch.allclose(ours, theirs, atol=1e-6)

# %% [markdown]
# ## 7 · Training: dense vs Switch MoE
# Same model as notebook 01, same recipe (`"char"` preset), same steps; the MoE version has 8
# experts in blocks 1 and 3 (top-1, so the same compute per token). A third run switches the
# load-balancing loss off. To fit a few minutes of CPU we train each for 800 steps rather than
# the preset's 2000.

# %%
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.presets import preset
from moe_tutorial.train import train

dataset = shakespeare_dataset(progress=False)
runs = {
    "dense": None,
    "Switch MoE": MoEConfig(n_experts=8, top_k=1, every=2),
    "MoE, no aux loss": MoEConfig(n_experts=8, top_k=1, every=2, aux_loss_coef=0.0),
}
histories, models = {}, {}
for name, moe in runs.items():
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, max_iters=800, eval_interval=200,
                                  progress=False)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "moe": moe})
    torch.manual_seed(train_cfg.seed)
    models[name] = GPT(model_cfg)
    histories[name] = train(models[name], dataset, train_cfg)
    print(f"{name:<17} val loss {histories[name].final_val_loss:.3f}  ({histories[name].elapsed:.0f} s)")

# %%
def load_cv(history, last=100):
    """Coefficient of variation of expert load, averaged over layers and the last steps."""
    loads = torch.tensor(history.expert_load[-last:])  # (steps, layers, E)
    return (loads.std(dim=-1) / loads.mean(dim=-1)).mean().item()


print(f"{'run':<17}{'val loss':>9}{'dropped %':>11}{'load CV':>9}{'max share':>11}{'tokens/s':>10}")
for name, h in histories.items():
    moe = bool(h.expert_load)
    dropped = 100 * torch.tensor(h.dropped[-100:]).mean().item() if moe else 0.0  # last 100 steps
    max_share = torch.tensor(h.expert_load[-100:]).amax(dim=-1).mean().item() if moe else float("nan")
    print(f"{name:<17}{h.final_val_loss:>9.3f}{dropped:>11.1f}{load_cv(h) if moe else 0.0:>9.2f}"
          f"{max_share:>11.2f}{h.tokens / h.elapsed:>10,.0f}")

assert histories["Switch MoE"].final_val_loss < 2.2 and histories["dense"].final_val_loss < 2.2
def mean_dropped(history, last=100):
    return torch.tensor(history.dropped[-last:]).mean().item()


assert load_cv(histories["Switch MoE"]) < load_cv(histories["MoE, no aux loss"])
assert mean_dropped(histories["MoE, no aux loss"]) > 3 * mean_dropped(histories["Switch MoE"])

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for name, h in histories.items():
    axes[0].plot(h.eval_step, h.val_loss, "o-", label=name)
axes[0].set(xlabel="step", ylabel="val loss", title="validation loss")
axes[0].legend()
for ax, name in zip(axes[1:], ("Switch MoE", "MoE, no aux loss")):
    load = torch.tensor(histories[name].expert_load)[:, 0]  # (steps, E) for the first MoE layer
    smooth = F.avg_pool1d(load.T[None], 25, stride=5)[0].T  # moving average over 25 steps
    ax.stackplot(range(0, 5 * len(smooth), 5), smooth.T.numpy())
    ax.set(xlabel="step", ylabel="share of tokens", ylim=(0, 1), title=f"{name}: top choices, MoE layer 0")
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the table, don't take the course's word. "Load CV" is the coefficient of variation of the
# experts' share of top choices (0 = perfectly even), "max share" the busiest expert's share
# (1/8 = 0.125 is even), both over the last 100 steps. At this small budget the MoE and the dense
# model are close in validation loss (MoE gains grow with training budget and model size), and the
# MoE is slower per token on a CPU: routing, sorting and scattering cost time that a dense matmul
# does not pay (`benchmarks/moe_layer.py` measures the layer alone). The load-balancing loss keeps
# the experts' demand even; without it the router's preferences drift apart, and several times more
# tokens are dropped (asserted above).
#
# ## 8 · The routing explorer
# Which expert does each character go to, and what is dropped when capacity shrinks? The panel
# below routes real Shakespeare through the trained Switch MoE. Move the **capacity** slider,
# change the **layer** or the **text**, and watch the coloured text and the load bars against the
# capacity line. (It needs a live kernel; a static rendering of the same view follows.)

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.viz import RoutingExplorer

sample = dataset.tokenizer.decode(dataset.val[:256])
explorer = RoutingExplorer(models["Switch MoE"], dataset.tokenizer, sample, capacity_factor=1.0)
explorer

# %%
from moe_tutorial.viz import plot_routing, route_text

for capacity_factor in (1.0, 0.5):
    view = route_text(models["Switch MoE"], dataset.tokenizer, sample, layer=0, capacity_factor=capacity_factor)
    plot_routing(view, max_lines=4)
    plt.show()
    print(f"capacity factor {capacity_factor}: capacity {view.capacity}, dropped {view.n_dropped} of {len(sample)}")

# %% [markdown]
# ## Summary
# - MoE multiplies parameters (×3.4 here) at constant compute per token.
# - Switch routing: softmax router in fp32, top-1 expert, output scaled by the gate.
# - Capacity `ceil(cf · N / E)`; late tokens over capacity are dropped and ride the residual.
# - Load balancing `α·E·Σ f_i P_i` (= α when uniform, α·E when collapsed) and z-loss
#   `mean(logsumexp²)`; without the former, load collapses onto a few experts (measured above).
# - Our from-scratch layer equals `moe_tutorial.moe.MoE`.
#
# **Where the finalized code lives:** `moe_tutorial/config.py` (`MoEConfig`), `router.py` (routing,
# capacity, losses), `experts.py` (stacked experts, grouped matmul), `moe.py` (the layer), `viz.py` (the explorer),
# `benchmarks/moe_layer.py` (speed against dense and a per-expert loop).
