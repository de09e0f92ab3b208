# %% [markdown]
# # 03 · Mixture of Experts: the Switch layer
#
# **What you will build.** A Mixture-of-Experts (MoE) feed-forward layer with Switch Transformer
# top-1 routing: a router, expert capacity and token dropping, the load-balancing loss and the
# router z-loss. Then you put it in the GPT of notebook 01 and look inside with an interactive
# routing explorer.
#
# **What you will measure.** Parameters vs compute per token; expert load and dropped tokens over
# training with and without the load-balancing loss; what the router z-loss does to the router's
# logits; a setting in which routing really collapses. (Whether the MoE beats the dense model needs
# seeds: notebook 04 measures it.)
#
# **Objectives**
# 1. Know what MoE buys: more parameters at the same compute per token.
# 2. Build a router and top-1 routing; understand capacity and dropping.
# 3. Motivate the load-balancing loss `α·E·Σ f_i·P_i` and the z-loss from their gradients.
# 4. Check a from-scratch MoE layer against `moe_tutorial.moe.MoE`.
# 5. Train MoEs with and without each auxiliary loss, and see what collapse looks like.
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
# `E` MLPs ("experts") and sends each token to only one (or `k`) of them. The feed-forward
# parameters grow `E`-fold (attention and embeddings are shared, so the model grows less); the
# compute per token stays that of one MLP, plus a tiny router. The layer, in four steps:

# %%
from moe_tutorial.diagrams import moe_layer_diagram

moe_layer_diagram()
plt.show()

# %% [markdown]
# Each token's router picks one expert and a gate `g`; tokens are grouped by expert, at most
# `capacity` per expert in arrival order (token 4 finds expert 1 full and is dropped); each expert
# is an ordinary MLP run on its group; outputs are scaled by their gates and put back in token
# order. For the char model of notebook 01 with an MoE of 8 full-width experts in every block (the
# course's `"Switch top-1"` variant; in notebook 04's experts sweep top-1 with 4 or 8 experts ties
# dense, and 4 and 8 tie each other):

# %%
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.costs import model_info
from moe_tutorial.model import GPT
from moe_tutorial.presets import MOE_VARIANTS

dense_cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
moe_cfg = GPTConfig(**{**dense_cfg.to_dict(), "moe": MOE_VARIANTS["Switch top-1"]})
infos = {name: model_info(cfg) for name, cfg in (("dense", dense_cfg), ("Switch MoE, E=8", moe_cfg))}
counts = {name: (info.total_params, info.active_params) for name, info in infos.items()}
assert counts["Switch MoE, E=8"][0] == sum(p.numel() for p in GPT(moe_cfg).parameters())  # every weight counted
for name, (total, active) in counts.items():
    print(f"{name:<16} total {total:>9,} parameters, {active:>8,} used per token")
print(f"the MoE has {counts['Switch MoE, E=8'][0] / counts['dense'][0]:.2f}x the dense model's parameters")
n_routers = sum(moe_cfg.is_moe_layer(i) for i in range(moe_cfg.n_layer))  # one per MoE block
assert counts["Switch MoE, E=8"][1] - counts["dense"][1] == n_routers * moe_cfg.n_embd * moe_cfg.moe.n_experts

# %% [markdown]
# Several times the parameters, and the same matrix multiplications per token: the only extra
# weights a token uses are the routers', `C × E` per MoE layer (the assert). Whether the extra
# parameters help is a question for seeds: notebook 04 answers it.
#
# ## 2 · A router from scratch
# The router is a linear layer from the token's `C` features to `E` logits. A softmax turns them
# into probabilities; Switch routing sends the token to its single most probable expert and
# multiplies that expert's output by the probability (the **gate**), which is how the router
# learns: its only gradient from the language-model loss flows through the gate.
#
# One expert per token was a bold choice. Shazeer et al. (2017) routed to k ≥ 2, reasoning that
# the router needs at least two experts to compare. Switch Transformer showed top-1 trains well:
# the gradient through one gate still tells the router whether its choice helped, and one expert
# halves the expert compute and the tokens sent between devices.

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
# the Switch paper): in bf16 the `exp` of the softmax amplifies rounding errors in the logits, and
# the Switch authors found such routers trained unstably.
#
# ## 3 · Capacity and dropped tokens
# To run experts as fixed-size batches (and to bound the worst case), each expert gets a
# **capacity**: `ceil(capacity_factor · N / E)` slots. Tokens arrive in the order of the flattened
# batch (`B·T`: all of sequence 0, then sequence 1, ...), so the later sequences of a batch are the
# ones that lose slots. Once an expert is full, later tokens sent to it are **dropped**: the layer
# outputs zero for them and the residual connection carries them to the next block unchanged.
# The package's defaults, training at capacity factor 1.25 and evaluating at 2.0, are ST-MoE's;
# the Switch paper sweeps 1.0 to 2.0.
# Generation never drops (notebook 04 explains why): three capacities, so a loss must say which.

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

# %% [markdown] solutions
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

capacity_solved = check_assign_with_capacity(assign_with_capacity)
assert capacity_solved  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Row `n` of `one_hot.cumsum(dim=0)` counts, per expert, the tokens up to and
# including token `n`; multiplying by `one_hot` keeps only the token's own expert, so the row sum
# minus 1 is how many earlier tokens chose that expert — its slot. Slots `0 … capacity−1` fit.
#
# **Wrong answers the check catches:** keeping every token (capacity ignored), and keeping the
# *last* tokens of each expert instead of the first (the count is right, the order is not).

# %% [markdown]
# **Why a capacity factor above 1?** Even a perfectly balanced router sends each expert a random
# number of tokens. If each of `N` tokens picks one of `E` experts uniformly, an expert's count is
# binomial: mean `N/E`, standard deviation about `√(N/E)`. The fewer tokens per expert, the larger
# that noise is against the mean, and the more a capacity of exactly `N/E` drops. Simulated:

# %%
generator = torch.Generator().manual_seed(0)
FACTORS, E_SIM, TRIALS = (1.0, 1.25, 2.0), 8, 200
drop = {}
print(f"{'tokens per expert':>18}" + "".join(f"{f'dropped at cf {cf:g}':>20}" for cf in FACTORS))
for per_expert in (4, 16, 96, 512):
    n = per_expert * E_SIM
    load = F.one_hot(torch.randint(E_SIM, (TRIALS, n), generator=generator), E_SIM).sum(1)  # (trials, E)
    for cf in FACTORS:
        drop[per_expert, cf] = (load - capacity(n, E_SIM, cf)).clamp(min=0).sum().item() / (TRIALS * n)
    print(f"{per_expert:>18}" + "".join(f"{drop[per_expert, cf]:>20.1%}" for cf in FACTORS))
assert drop[4, 1.0] > drop[16, 1.0] > drop[96, 1.0] > drop[512, 1.0] > 0  # fewer per expert: more dropped
assert all(drop[4, cf] >= drop[16, cf] >= drop[96, cf] >= drop[512, cf] for cf in FACTORS)
assert drop[96, 1.0] > 0.02 and drop[96, 1.25] < 0.001  # the char model's 96 per expert

# %% [markdown]
# A uniform router drops tokens too, and the fewer tokens per expert, the more (the asserts). The
# char model's batch gives each of 8 experts 96 tokens on average (768 / 8): there a uniform
# router loses a few percent at factor 1.0 and almost nothing at 1.25. A trained router is not
# uniform, so its drops are higher (section 7 measures them). So the factor must rise as the
# tokens per expert fall: many experts, small batches, or a batch split over many devices.

# %% [markdown]
# ## 4 · Keeping the experts busy: the load-balancing loss
# Nothing in the language-model loss asks the router to spread tokens. Left alone, a router tends
# to favour a few experts, they get better, it favours them more: *collapse*, where one or a few
# experts are the first choice of most tokens and the rest sit idle. With a capacity limit, the
# tokens over it are then dropped. Switch Transformer adds
#
# $$\mathcal{L}_{\text{aux}} = \alpha \cdot E \cdot \sum_{i=1}^{E} f_i \, P_i,$$
#
# - `f_i`: the fraction of tokens whose top choice is expert *i* — a count, so it has no gradient;
# - `P_i`: the mean router probability of expert *i* over all tokens — differentiable.
#
# Why this form? The gradient with respect to `P_i` is `α·E·f_i`: experts that receive many tokens
# get their probability pushed down hardest. With a uniform router `f_i = P_i = 1/E`, so
# `E · Σ 1/E² = 1`: the loss is `α` when balanced. It is at most `α·E`, reached when every token
# picks one expert with certainty (`f_1 = P_1 = 1`). Its value alone does not prove balance:
# `f = (1, 0, …)` with a uniform `P` also gives 1. What balances is the gradient. `α = 0.01` by
# default.

# %% [markdown] solutions
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

# %% [markdown] solutions-only
# **Why it works.** `bincount` of each token's argmax gives the top-choice counts; as integers they
# carry no gradient, so the whole gradient flows through `P = probs.mean(0)`, scaled by `f` — the
# busiest experts' probabilities are pushed down hardest. The factor `E` makes a balanced router
# score exactly 1.
#
# **Wrong answers the check catches:** `f` taken as the mean probability (soft, differentiable
# `f`: `E·Σ P_i²`, whose gradient is wrong), and the loss without the factor `E` (1/E when balanced).

# %% [markdown]
# Three details of how the loss is used:
# - **One loss per layer.** Each MoE layer has its own router and its own loss, computed on that
#   layer's tokens; the model adds them. (Notebook 04's exercise 3 shows why pooling the layers into
#   one loss fails.)
# - **The batch it balances.** `f_i` and `P_i` are taken over the tokens the layer sees in one
#   forward pass. Under data parallelism that is each device's micro-batch, which is stricter than
#   balancing the global batch: a device with a run of code tokens must still spread them.
# - **A quiet start.** Switch initialises weights with a tenth of the usual scale `s` (a variance
#   factor): a truncated normal with std `√(0.1 / fan_in)`, about 0.028 for this router's 128 inputs, close to the
#   0.02 of GPT-2's init that the package uses. Small logits mean near-uniform routing at first.
#   Switch also multiplies the router's input by noise from `[1 − ε, 1 + ε]` in training
#   (`MoEConfig.jitter`, off by default here).

# %% [markdown]
# ## 5 · The router z-loss
# ST-MoE (Zoph et al. 2022) found that large router logits make training unstable: a float's
# absolute rounding error grows with its magnitude (bf16 keeps 8 significant bits, about 2.4
# decimal digits, at any size), and `exp` turns an absolute error in a logit into a relative error
# in the probability.
# The **z-loss** `z² = mean_tokens( logsumexp(logits)² )`, weighted by 1e-3, is smallest when each
# token's log-partition `z = logsumexp(l)` is 0. Its gradient is `∂z²/∂l_i = 2z · softmax(l)_i`:
# when `z > 0` every logit is pushed *down* in proportion to its probability (the winner hardest),
# when `z < 0` pushed *up*. So it pins `z` near 0, and since `max_i l_i ≤ z ≤ max_i l_i + ln E`, that
# caps every logit near or below 0 — it bounds the logits' *level*. (A softmax ignores a common shift,
# so the level is what floats and what the z-loss fixes; whether the distribution gets flatter or
# sharper is a separate question.) Section 7 measures `z`, the largest logit, and the logits' spread.

# %% [markdown] solutions
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

# %% [markdown] solutions-only
# **Why it works.** `torch.logsumexp` computes `log Σ_i e^{l_i}` stably (it subtracts the row's max
# first), so large logits do not overflow; squaring per token and then averaging is ST-MoE's
# definition.
#
# **Wrong answers the check catches:** the mean of the squared logits (not the logsumexp),
# `log(exp(l).sum())` written out (overflows to `inf` for large logits), and the logsumexp without
# the square.

# %% [markdown]
# ## 6 · The whole layer, from scratch, against the package
# Putting it together: route, find who fits, run each expert on its tokens, scale by the gate,
# put the results back in place. This version loops over experts for clarity. The package's
# `MoE` does the same with the experts' weights stacked in `(E, C, H)` tensors: it sorts the kept
# tokens by expert and runs all experts with one grouped matrix multiply
# (`moe_tutorial.dispatch.sort_dispatch`).

# %%
from moe_tutorial.exercises import learner_or_package
from moe_tutorial.moe import MoE
from moe_tutorial.router import positions_in_expert


def package_assign_with_capacity(expert, n_experts, capacity):
    return positions_in_expert(expert[:, None], n_experts)[:, 0] < capacity


fits = learner_or_package(capacity_solved, assign_with_capacity, package_assign_with_capacity,
                          "who fits (exercise 1)")


def scratch_moe(x, router_weight, w_fc, w_proj, capacity_factor):
    """x (N, C); router_weight (E, C); w_fc (E, C, H); w_proj (E, H, C) -> (N, C)."""
    N, E = x.size(0), router_weight.size(0)
    probs = F.softmax(x @ router_weight.T, dim=-1)
    gate, expert = probs.max(dim=-1)
    cap = math.ceil(capacity_factor * N / E)
    kept = fits(expert, E, cap)
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
theirs, aux_loss, routing = layer(x)  # also: the weighted balancing losses (sections 4-5), the routing
theirs = theirs.view(-1, 32)
print(f"max |difference| {(ours - theirs).abs().max():.1e}; "
      f"dropped {int(routing.dropped.sum())} of {x.shape[0] * x.shape[1]} tokens")
assert torch.allclose(ours, theirs, atol=1e-6)

# %% [markdown]
# ## 7 · Training: what each auxiliary loss does
# Notebook 01's model and recipe (`"char"` preset), fewer steps, with the Switch MoE above: 8
# full-width experts in every block, top-1, so the same compute per token. Then the same MoE
# without the load-balancing loss, without the z-loss, and with neither loss, no capacity limit
# (capacity factor = E: no token can be dropped) and a higher learning rate — the setting most
# likely to collapse. One seed each, so the asserts below only check several-fold
# differences in routing, and nothing here compares validation losses: whether an MoE beats the
# dense model is a question for 3 seeds, answered in notebook 04.

# %%
from dataclasses import replace

from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.moe import dropless
from moe_tutorial.presets import preset
from moe_tutorial.train import train

STEPS = 800
COLLAPSE_LR = 1e-2
dataset = shakespeare_dataset(progress=False)
switch = MOE_VARIANTS["Switch top-1"]
runs = {  # name: (MoE layers, learning rate or None for the recipe's)
    "Switch MoE": (switch, None),
    "no aux loss": (replace(switch, aux_loss_coef=0.0), None),
    "no z-loss": (replace(switch, z_loss_coef=0.0), None),
    "neither, no cap": (replace(switch, aux_loss_coef=0.0, z_loss_coef=0.0,
                                capacity_factor_train=float(switch.n_experts)), COLLAPSE_LR),
}
histories, models = {}, {}
for name, (moe, lr) in runs.items():
    overrides = {"learning_rate": lr} if lr else {}
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, max_iters=STEPS, eval_interval=200,
                                  progress=False, **overrides)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "moe": moe})
    torch.manual_seed(train_cfg.seed)
    models[name] = GPT(model_cfg)
    histories[name] = train(models[name], dataset, train_cfg)
recipe_steps, recipe_lr = preset("char", 65)[1].max_iters, preset("char", 65)[1].learning_rate
print(f"{STEPS} steps each (the recipe trains {recipe_steps}); learning rate {recipe_lr:g}, "
      f"{COLLAPSE_LR:g} for the last run")

# %%
# NBVAL_IGNORE_OUTPUT
for name, h in histories.items():
    print(f"{name:<17} {h.tokens / h.elapsed:>8,.0f} tokens/s  ({h.elapsed:.0f} s)")

# %%
@torch.no_grad()
def router_logit_stats(model, ids):
    """Mean over MoE layers and tokens of: logsumexp of the router logits (z), the largest logit,
    the logits' spread (std over experts) and the router's probability for its chosen expert."""
    model.eval()
    rows = [(torch.logsumexp(r.logits, -1).mean(), r.logits.max(-1).values.mean(), r.logits.std(-1).mean(),
             r.probs.max(-1).values.mean()) for r in model(ids, return_routing=True).routing]
    return [torch.stack(col).mean().item() for col in zip(*rows)]


val_ids = dataset.val[:64 * 64].view(64, 64)  # 64 validation windows
val_batches = fixed_batches(dataset.val, 20, 12, 64, seed=0)
_, eval_cfg = preset("char", dataset.tokenizer.vocab_size)


@torch.no_grad()
def eval_drop_pct(model, batches):
    """% of tokens no expert processed, mean over MoE layers and batches, at the model's eval capacity."""
    model.eval()
    dropped = [r.dropped.float().mean() for x, _ in batches for r in model(x, return_routing=True).routing]
    return 100 * torch.stack(dropped).mean().item()


def layer0_max_share(history):  # the busiest expert's share of MoE layer 0's first choices, last 100 steps
    return torch.tensor(history.expert_load[-100:])[:, 0].amax(-1).mean().item()


print(f"{'':<17}{'training, last 100 steps':<41}{'validation batches, eval mode':<40}")
print(f"{'run':<17}{'dropped %':>10}{'load CV':>9}{'max share':>11}{'layer 0':>9}   {'loss cf 2':>10}{'dropless':>9}"
      f"{'dropped %':>10}{'z':>7}{'max logit':>10}{'spread':>7}{'top prob':>9}")
stats = {}
for name, h in histories.items():
    with dropless(models[name]):
        free = estimate_loss(models[name], val_batches, eval_cfg)
    stats[name] = {**h.routing_summary(), "val_loss": estimate_loss(models[name], val_batches, eval_cfg),
                   "dropless_loss": free, "eval_dropped_pct": eval_drop_pct(models[name], val_batches),
                   "layer0_max_share": layer0_max_share(h),
                   **dict(zip(("z", "max_logit", "spread", "top_prob"), router_logit_stats(models[name], val_ids)))}
    s_ = stats[name]
    print(f"{name:<17}{s_['dropped_pct']:>10.1f}{s_['load_cv']:>9.2f}{s_['max_share']:>11.2f}"
          f"{s_['layer0_max_share']:>9.2f}   "
          f"{s_['val_loss']:>10.3f}{s_['dropless_loss']:>9.3f}{s_['eval_dropped_pct']:>10.1f}{s_['z']:>7.2f}"
          f"{s_['max_logit']:>10.2f}{s_['spread']:>7.2f}{s_['top_prob']:>9.2f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for ax, name in zip(axes, ("Switch MoE", "no aux loss", "neither, no cap")):
    load = torch.tensor(histories[name].expert_load)[:, 0]  # (steps, E) for the first MoE layer
    smooth = F.avg_pool1d(load.T[None], 25, stride=5)[0].T  # moving average over 25 steps
    ax.stackplot(range(0, 5 * len(smooth), 5), smooth.T.numpy(), labels=[f"expert {e}" for e in range(load.size(1))])
    ax.set(xlabel="step", ylabel="share of first choices", ylim=(0, 1), title=f"{name}: MoE layer 0")
axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the table. "Load CV" is the coefficient of variation of the experts' shares of first
# choices (0 = even; `moe_tutorial.router.load_cv`), "max share" the busiest expert's share (1/8 is
# even), averaged over the MoE layers, and "layer 0" that share in the first MoE layer. They
# measure the router's demand, before capacity cuts it, over the last 100 training steps; the first
# "dropped %" is what training capacity cut. The rest is measured on the same validation batches in
# eval mode: the loss at capacity factor 2.0 and dropless, and what capacity 2.0 drops.
#
# - **The load-balancing loss** keeps demand even. Without it the load CV is several times higher,
#   and several times more tokens are dropped in training. The busiest expert still takes under
#   half the first choices in any layer: at this budget the router drifts but does not collapse.
#   Its training drops cost it even when evaluated dropless: its loss is well above the Switch
#   MoE's. Its evaluation drops, on the other hand, barely move its loss (the two loss columns
#   agree): trained with about a third of its tokens dropped, it seems to have learned to do
#   without the expert on many tokens. (Its tokens per second, above, are one noisy run each; a dropped token skips its
#   expert's matmul, which can only make it faster.)
# - **The z-loss** pins the log-partition `z` near 0, and with it the largest logit. The logits'
#   spread and the router's probability for its choice are one seed each: no claim either way. In
#   fp32 on a CPU this run cannot show the z-loss's real purpose, stability in bf16.
# - **Collapse.** With neither loss, no capacity limit and a higher learning rate, one expert is the
#   first choice of most tokens in MoE layer 0 (the right plot). That run changes three things at
#   once; which of them was needed is not tested here. A plausible reason to lift the capacity: a
#   dropped token outputs 0 whatever its gate, so it adds nothing to that expert's gate gradient.
# - **Say which capacity.** The collapsed model trained with room for every token. Evaluated at
#   capacity factor 2.0 it drops many of its tokens, and its loss is worse than a uniform guess over
#   the 65 characters. Dropless, as it trained, its loss is close to the Switch MoE's: one expert
#   does most of the work, so the other experts' parameters are wasted rather than harmful. A loss
#   means little without the capacity it was measured at.

# %%
with_aux, no_aux, no_z, collapsed = (stats[n] for n in ("Switch MoE", "no aux loss", "no z-loss", "neither, no cap"))
assert with_aux["load_cv"] < 0.5 * no_aux["load_cv"]  # the balancing loss evens the demand ...
assert no_aux["dropped_pct"] > 3 * with_aux["dropped_pct"]  # ... and without it several times more is dropped
assert no_aux["max_share"] < 0.5 and no_aux["layer0_max_share"] < 0.5  # ... but no collapse at this budget
assert no_aux["dropless_loss"] > with_aux["dropless_loss"] + 0.1  # its training drops cost it, even dropless
assert no_aux["eval_dropped_pct"] > 1 and abs(no_aux["val_loss"] - no_aux["dropless_loss"]) < 0.005
assert abs(with_aux["z"]) < 0.5 * abs(no_z["z"])  # the z-loss pins the log-partition near 0
assert with_aux["max_logit"] < no_z["max_logit"]
assert collapsed["layer0_max_share"] > 0.5  # collapse: in MoE layer 0 one expert is the first choice of most tokens
assert collapsed["eval_dropped_pct"] > 25  # capacity 2.0 cuts what it trained to send to one expert
assert collapsed["dropless_loss"] < math.log(65) < collapsed["val_loss"]  # worse than uniform only at cf 2.0
assert abs(collapsed["dropless_loss"] - with_aux["dropless_loss"]) < 0.1  # dropless, close to the Switch MoE

# %% [markdown]
# ## 8 · The routing explorer
# Which expert does each character go to, and what is dropped when capacity shrinks? The panel
# below routes real Shakespeare through the models trained above, and through an untrained one.
# Move the **capacity factor** slider, change the **model**, the **layer** or the **text**. The
# chart shows, per expert, its demand (outlined bar: the characters that chose it) against the
# capacity line, and what it processed (filled). Click the number under a bar to highlight that
# expert's characters. Hover over a character, or type its number, to see its router probabilities,
# its expert, its gate and its slot. A dropped character keeps its expert's colour, hatched and
# struck through. (It needs a live kernel; a static rendering of the
# same view follows.)

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.viz import RoutingExplorer

sample = dataset.tokenizer.decode(dataset.val[:256])
torch.manual_seed(0)
untrained = GPT(models["Switch MoE"].config)  # the same model before any training: routing by chance
explorer = RoutingExplorer({**models, "untrained": untrained}, dataset.tokenizer, sample, capacity_factor=1.0)
explorer

# %%
from moe_tutorial.viz import plot_routing, route_text

for capacity_factor in (1.0, 0.5):
    view = route_text(models["Switch MoE"], dataset.tokenizer, sample, layer=0, capacity_factor=capacity_factor)
    plot_routing(view, max_lines=4)
    plt.show()
    over = sum(max(d - view.capacity, 0) for d in view.demand)
    print(f"capacity factor {capacity_factor}: {view.capacity_formula()}; demand {view.demand}, "
          f"dropped {view.n_dropped} of {len(sample)}")
    assert view.n_dropped == over  # top-1: exactly the demand above each expert's capacity is dropped

# %% [markdown]
# At capacity factor 0.5 the experts have slots for only half the characters together, so at
# least half must be dropped. Exactly that many are when every expert is asked for at least its
# capacity. The outlined part above the dashed line is what was dropped (the assert checks that the
# drops are exactly the demand over capacity). The explorer's "slots by: highest gate" shows what
# batch priority routing (V-MoE, Riquelme et al. 2021) would keep instead: the highest-gated
# characters, wherever they sit in the batch.
#
# ## Summary
# - MoE multiplies parameters (the ratio is printed in section 1) at constant compute per token.
# - Switch routing: softmax router in fp32, top-1 expert, output scaled by the gate.
# - Capacity `ceil(cf · N / E)`; late tokens over capacity are dropped and ride the residual.
# - Load balancing `α·E·Σ f_i P_i` (= α when uniform, α·E when collapsed) evens the demand; the
#   z-loss `mean(logsumexp²)` pins each token's log-partition near 0, bounding the logits' level.
#   Section 7 measures both, and a setting that collapses.
# - Our from-scratch layer equals `moe_tutorial.moe.MoE`.
#
# **Where the finalized code lives:** `moe_tutorial/config.py` (`MoEConfig`), `router.py` (routing,
# capacity, losses, `load_cv`), `experts.py` (stacked experts, grouped matmul), `moe.py` (the layer),
# `viz.py` (the explorer), `diagrams.py` (the layer's picture), `benchmarks/moe_layer.py` (speed
# against dense and a per-expert loop).
#
# ## Further reading
# - Shazeer et al. 2017, *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
#   Layer* — the modern MoE layer, noisy top-k gating: [arXiv:1701.06538](https://arxiv.org/abs/1701.06538).
# - Lepikhin et al. 2020, *GShard* — expert capacity, the balancing loss's ancestor:
#   [arXiv:2006.16668](https://arxiv.org/abs/2006.16668).
# - Fedus, Zoph, Shazeer 2021, *Switch Transformers* — top-1 routing, `α·E·Σ f_i P_i`, capacity
#   factors, selective precision: [arXiv:2101.03961](https://arxiv.org/abs/2101.03961).
# - Zoph et al. 2022, *ST-MoE: Designing Stable and Transferable Sparse Expert Models* — the router
#   z-loss and why logits blow up: [arXiv:2202.08906](https://arxiv.org/abs/2202.08906).
# - Code: Mesh TensorFlow's / Flaxformer's MoE layers (the Switch reference implementation) and
#   `transformers`' `modeling_switch_transformers.py` (router, capacity, losses in one file).
