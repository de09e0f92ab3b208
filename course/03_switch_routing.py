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
# course's `"Switch top-1"` variant; in notebook 04's experts sweep top-1 with 4 or 8 experts is
# slightly better than dense on every seed, within the noise: a tie):

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
# Generation never drops (notebook 04 explains why). So there are three capacities, training (1.25),
# evaluation (2.0) and generation (dropless), and a loss must say which it was measured at.

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
# picks one expert with certainty (`f_1 = P_1 = 1`). Its value alone does not prove balance: with 2
# experts, 3/4 of the tokens barely preferring expert 0 (probabilities ≈ (½, ½)) and 1/4 sure of
# expert 1 give `f = (¾, ¼)`, `P = (⅜, ⅝)` and a loss of 0.875, *below* 1, though the first choices
# are uneven. What balances is the gradient. `α = 0.01` by default.

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
# What moves the router is the gradient on its logits. For token `n`, through the softmax,
# `∂L/∂l_nj = (α·E/N) · p_nj · (f_j − Σ_i p_ni f_i)`: an expert busier than the token's average of
# `f`, weighted by its own probabilities, is pushed down, a quieter one up, each in proportion to its
# probability. On a
# router whose first choices pile onto expert 0:

# %%
from moe_tutorial.router import load_balancing_loss

logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 1.0]], requires_grad=True)
probs = F.softmax(logits, dim=-1)  # (N, E): first choices 0, 0, 3
f = torch.bincount(probs.argmax(-1), minlength=4).float() / 3  # (E,) = (2/3, 0, 0, 1/3)
load_balancing_loss(probs, probs.argmax(-1)).backward()
by_hand = 4 / 3 * probs * (f - (probs * f).sum(-1, keepdim=True))  # alpha = 1
print("f:", [round(v, 2) for v in f.tolist()])
print("gradient on token 0's logits:", [round(g, 3) for g in logits.grad[0].tolist()])
assert torch.allclose(logits.grad, by_hand, atol=1e-6)
assert logits.grad[0, 0] > 0 and (logits.grad[0, 1:] < 0).all()  # expert 0 pushed down, the others up

# %% [markdown]
# Three details of how the loss is used:
# - **One loss per layer.** Each MoE layer has its own router and its own loss, computed on that
#   layer's tokens; the model adds them. Hugging Face's `load_balancing_loss_func` (Mixtral,
#   Qwen-MoE) pools every layer's router outputs into one loss instead: exercise 3 shows what that
#   hides.
# - **The batch it balances.** `f_i` and `P_i` are taken over the tokens the layer sees in one
#   forward pass. Under data parallelism that is each device's micro-batch, which is stricter than
#   balancing the global batch: a device with a run of code tokens must still spread them. Qwen's
#   team (2025) argues it is too strict for experts to specialise, and balances the global batch.
# - **A quiet start.** Switch initialises weights with a tenth of the usual scale `s` (a variance
#   factor): a truncated normal with std `√(0.1 / fan_in)`, about 0.028 for this router's 128 inputs, close to the
#   0.02 of GPT-2's init that the package uses. Small logits mean near-uniform routing at first.
#   Switch also multiplies the router's input by noise from `[1 − ε, 1 + ε]` in training
#   (`MoEConfig.jitter`, off by default here).

# %% [markdown] solutions
# ### ✍️ Exercise 3 — the balancing loss of a whole model
# Given each MoE layer's router probabilities `(N, E)` and first choices `(N,)` (two lists, one
# entry per layer), return the model's total balancing loss: each layer's Switch loss
# `E · Σ_i f_i P_i` on its own tokens, added over layers. Compute `f_i` and `P_i` yourself, as in
# exercise 2, not with the package's `load_balancing_loss`.

# %% solutions
def balancing_loss_over_layers(probs, first):
    """probs: [(N, E)] per layer, first: [(N,)] per layer -> total loss (0-dim tensor)."""
    # BEGIN SOLUTION
    total = 0.0
    for p, f in zip(probs, first):  # each layer on its own tokens
        E = p.size(1)
        share = torch.bincount(f, minlength=E).float() / len(f)  # f_i: a count, no gradient
        total = total + E * (share * p.mean(dim=0)).sum()  # P_i: the mean probability
    return total
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch03 import check_balancing_loss_over_layers

passed = check_balancing_loss_over_layers(balancing_loss_over_layers)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Each router only sees its own layer: its `f_i` and `P_i` must count its own
# tokens. In the check, layer 0 sends every token to expert 0 and layer 1 every token to expert 1.
# Each layer's loss is high: it is collapsed. Concatenated, the two halves look like an even split
# over two experts, so the pooled loss is lower, and its gradient also pushes down experts that a
# layer never chose.
#
# **Wrong answers the check catches:** one loss over the concatenated layers, the mean over layers
# instead of the sum (the package adds each layer's loss, each with the same α), and a call to the
# package's `load_balancing_loss`.

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
#
# The rounding, in numbers: the same two logits half a unit apart, small and large, stored in bf16.

# %%
for pair in ([2.0, 2.5], [200.0, 200.5]):
    exact, rounded = torch.tensor(pair), torch.tensor(pair).bfloat16().float()
    print(f"logits {pair} -> bf16 {rounded.tolist()}: softmax {[round(p, 4) for p in F.softmax(exact, -1).tolist()]}"
          f" -> {[round(p, 4) for p in F.softmax(rounded, -1).tolist()]}")
assert torch.tensor([200.0, 200.5]).bfloat16()[1] == 200  # near 200 bf16's step is 1: the half unit is lost

# %% [markdown] solutions
# ### ✍️ Exercise 4 — the z-loss's gradient, by hand
# Return the gradient of the z-loss `mean_n z_n²` (without its coefficient) with respect to router
# logits `(N, E)`, shape `(N, E)`. Derive it; do not call autograd. It must stay finite for logits
# of 1000.

# %% solutions
def z_loss_gradient(logits):
    """logits (N, E) -> d/dlogits of mean over tokens of logsumexp(logits)^2, (N, E)."""
    # BEGIN SOLUTION
    z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1): stable, it subtracts the row max
    return 2 * z * F.softmax(logits, dim=-1) / logits.size(0)  # (N, E)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch03 import check_z_loss_gradient

z_solved = check_z_loss_gradient(z_loss_gradient)
assert z_solved  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** The chain rule, one token at a time: `∂z²/∂l_i = 2z · ∂z/∂l_i`, and the
# derivative of `logsumexp` is the softmax. The mean over `N` tokens divides each token's gradient
# by `N`. `torch.logsumexp` and `F.softmax` both subtract the row's maximum first, so logits of
# 1000 give finite numbers.
#
# **Wrong answers the check catches:** the gradient of `mean(l²)` (`2l/N`), the sum over tokens
# instead of the mean (no `1/N`), the factor 2 forgotten, the same push for every expert (the
# softmax left out), the softmax over the tokens, `exp` written out (it overflows), and autograd.

# %% [markdown]
# On one token, the gradient says what the loss does. Its log-partition is positive, so every
# logit is pushed down; the push on each is proportional to its probability, so the winner is pushed
# hardest. The same logits shifted down until `z < 0` are pushed up instead.

# %%
from moe_tutorial.exercises import learner_or_package
from moe_tutorial.router import z_loss


def package_z_loss_gradient(logits):  # autograd through the package's loss
    logits = logits.detach().requires_grad_()
    z_loss(logits).backward()
    return logits.grad


z_gradient = learner_or_package(z_solved, z_loss_gradient, package_z_loss_gradient, "z-loss gradient (exercise 4)")
token = torch.tensor([[4.0, 2.0, 0.0, -1.0]])
print(f"{'logits':<30}{'z':>7}   gradient")
for logits in (token, token - 6):
    grad = z_gradient(logits)
    print(f"{str(logits[0].tolist()):<30}{torch.logsumexp(logits, -1).item():>7.2f}   "
          f"{[round(g, 3) for g in grad[0].tolist()]}")
    assert torch.allclose(grad / grad.sum(), F.softmax(logits, -1))  # in proportion to the probabilities
assert (z_gradient(token) > 0).all() and (z_gradient(token - 6) < 0).all()  # z > 0: all down; z < 0: all up

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
# without the z-loss. Then a 2 × 2 of the two brakes on collapse: with or without the load-balancing
# loss, with or without a capacity limit (capacity factor = E: no token can be dropped). One seed
# each: the asserts check several-fold differences in routing, and a loss only where the gap is many
# times the spread between seeds that notebook 04 measures (about 0.02 for this variant, top-1 E=8).

# %%
from dataclasses import replace

from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.moe import dropless
from moe_tutorial.presets import preset
from moe_tutorial.train import train

STEPS = 600
dataset = shakespeare_dataset(progress=False)
switch = MOE_VARIANTS["Switch top-1"]
no_cap = float(switch.n_experts)  # capacity factor E: room for every token
runs = {  # name: the MoE layers
    "Switch MoE": switch,
    "no z-loss": replace(switch, z_loss_coef=0.0),
    "no aux loss": replace(switch, aux_loss_coef=0.0),
    "no cap": replace(switch, capacity_factor_train=no_cap),
    "no aux, no cap": replace(switch, aux_loss_coef=0.0, capacity_factor_train=no_cap),
}
histories, models = {}, {}
for name, moe in runs.items():
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, max_iters=STEPS, eval_interval=200,
                                  progress=False)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "moe": moe})
    torch.manual_seed(train_cfg.seed)
    models[name] = GPT(model_cfg)
    histories[name] = train(models[name], dataset, train_cfg)
print(f"{STEPS} steps each (the recipe trains {preset('char', 65)[1].max_iters})")

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


@torch.no_grad()
def eval_drop_pct(model, batches):
    """% of tokens no expert processed, mean over MoE layers and batches, at the model's eval capacity."""
    model.eval()
    dropped = [r.dropped.float().mean() for x, _ in batches for r in model(x, return_routing=True).routing]
    return 100 * torch.stack(dropped).mean().item()


def busiest_share_per_layer(history):  # (L,) the busiest expert's share of first choices, last 100 steps
    return torch.tensor(history.expert_load[-100:]).amax(-1).mean(0)


val_ids = dataset.val[:64 * 64].view(64, 64)  # 64 validation windows
val_batches = fixed_batches(dataset.val, 20, 12, 64, seed=0)
_, eval_cfg = preset("char", dataset.tokenizer.vocab_size)
stats = {}
for name, h in histories.items():
    with dropless(models[name]):
        free = estimate_loss(models[name], val_batches, eval_cfg)
    busiest = busiest_share_per_layer(h)
    stats[name] = {**h.routing_summary(), "layer0_max_share": busiest[0].item(), "any_layer_max_share":
                   busiest.max().item(), "val_loss": estimate_loss(models[name], val_batches, eval_cfg),
                   "dropless_loss": free, "eval_dropped_pct": eval_drop_pct(models[name], val_batches),
                   **dict(zip(("z", "max_logit", "spread", "top_prob"), router_logit_stats(models[name], val_ids)))}

print("training, last 100 steps: the router's demand, and what training capacity cut")
print(f"{'run':<17}{'dropped %':>10}{'load CV':>9}{'busiest expert: mean':>22}{'layer 0':>9}{'worst layer':>13}")
for name, s_ in stats.items():
    print(f"{name:<17}{s_['dropped_pct']:>10.1f}{s_['load_cv']:>9.2f}{s_['max_share']:>22.2f}"
          f"{s_['layer0_max_share']:>9.2f}{s_['any_layer_max_share']:>13.2f}")
print("\nvalidation batches, eval mode: the loss at capacity factor 2.0 and dropless, and the router's logits")
print(f"{'run':<17}{'loss cf 2':>10}{'dropless':>9}{'dropped %':>10}{'z':>7}{'max logit':>10}{'spread':>7}"
      f"{'top prob':>9}")
for name, s_ in stats.items():
    print(f"{name:<17}{s_['val_loss']:>10.3f}{s_['dropless_loss']:>9.3f}{s_['eval_dropped_pct']:>10.1f}{s_['z']:>7.2f}"
          f"{s_['max_logit']:>10.2f}{s_['spread']:>7.2f}{s_['top_prob']:>9.2f}")

# %%
panels = (("Switch MoE", "no cap"), ("no aux loss", "no aux, no cap"))  # rows: balancing loss on, off
fig, axes = plt.subplots(2, 2, figsize=(12, 5.4), sharex=True, sharey=True)
for row, names in zip(axes, panels):
    for ax, name in zip(row, names):
        load = torch.tensor(histories[name].expert_load)[:, 0]  # (steps, E) for the first MoE layer
        smooth = F.avg_pool1d(load.T[None], 25, stride=5)[0].T  # moving average over 25 steps
        ax.stackplot(range(12, 12 + 5 * len(smooth), 5), smooth.T.numpy(),  # each window at its centre
                     labels=[f"expert {e}" for e in range(load.size(1))])
        ax.set(ylim=(0, 1), title=f"{name}: MoE layer 0")
for ax in axes[1]:
    ax.set_xlabel("step")
for ax in axes[:, 0]:
    ax.set_ylabel("share of first choices")
axes[0, 1].legend(loc="center left", bbox_to_anchor=(1.02, 0.0), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the tables. "Load CV" is the coefficient of variation of the experts' shares of first
# choices (0 = even; `moe_tutorial.router.load_cv`); "busiest expert" is the busiest expert's share
# (1/8 is even), averaged over the MoE layers, in layer 0, and in the worst layer. They measure the
# router's demand, before capacity cuts it.
#
# - **The load-balancing loss** keeps demand even. Without it the load CV is several times higher,
#   and several times more tokens are dropped in training. In its worst layer one expert is the first
#   choice of most tokens, but no layer goes all the way.
# - **Capacity is the other brake.** Lift the limit without the balancing loss and in MoE layer 0 one
#   expert becomes the first choice of almost every token (bottom right). With the balancing loss,
#   lifting the limit collapses nothing (top right): either brake alone prevents total collapse, and
#   only the balancing loss keeps demand even. A plausible reason
#   capacity works: a dropped token outputs 0 whatever its gate, so an expert gets no gate gradient
#   from tokens it has no room for. Dropless MoEs (MegaBlocks, Mixtral) rely on the balancing loss
#   alone.
# - **Drops, not imbalance, cost the run without the balancing loss.** Its loss is far above the
#   Switch MoE's even dropless (a gap many times the seed spread), while the run that is even more
#   imbalanced but drops nothing in training is not. Its evaluation drops barely move its loss:
#   trained with many of its tokens dropped, it seems to have learned to do without the expert on
#   them. (Tokens per second, above, are one run each and say little on a CPU; the fastest run also
#   skips the experts for the tokens it drops. Under expert parallelism the device with the busiest
#   expert would set the pace, notebook 06.)
# - **The z-loss** pins the log-partition `z` near 0, and with it the largest logit. The logits'
#   spread and the router's probability for its choice are one seed each: no claim either way. In
#   fp32 on a CPU this run cannot show the z-loss's real purpose, stability in bf16.
# - **Say which capacity.** The collapsed model trained with room for every token. Evaluated at
#   capacity factor 2.0 it drops many of its tokens, and its loss is worse than a uniform guess over
#   the 65 characters. Dropless, as it trained, its loss is close to the Switch MoE's: one expert
#   does most of layer 0's work, so the other experts' parameters are wasted rather than harmful. A
#   loss means little without the capacity it was measured at.

# %%
with_aux, no_aux, no_z = stats["Switch MoE"], stats["no aux loss"], stats["no z-loss"]
only_aux, collapsed = stats["no cap"], stats["no aux, no cap"]
assert with_aux["load_cv"] < 0.5 * no_aux["load_cv"]  # the balancing loss evens the demand ...
assert no_aux["dropped_pct"] > 3 * with_aux["dropped_pct"]  # ... and without it several times more is dropped
assert 0.5 < no_aux["any_layer_max_share"] < 0.9  # ... most first choices in its worst layer, not all
assert collapsed["layer0_max_share"] > 0.9  # collapse: in MoE layer 0 one expert takes almost every first choice
assert only_aux["any_layer_max_share"] < 0.5  # the balancing loss alone prevents it
assert no_aux["dropless_loss"] > with_aux["dropless_loss"] + 0.1  # the run that drops is far behind ...
assert collapsed["dropless_loss"] < no_aux["dropless_loss"] - 0.1  # ... the imbalanced one that drops nothing is not
assert no_aux["eval_dropped_pct"] > 1 and abs(no_aux["val_loss"] - no_aux["dropless_loss"]) < 0.005
assert abs(with_aux["z"]) < 0.5 * abs(no_z["z"])  # the z-loss pins the log-partition near 0
assert with_aux["max_logit"] < no_z["max_logit"]
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
# characters, wherever they sit in the batch. That makes a character's fate depend on later
# characters of its own sequence too: fine for an encoder, not causal for a decoder.
#
# ## Summary
# - MoE multiplies parameters (the ratio is printed in section 1) at constant compute per token.
# - Switch routing: softmax router in fp32, top-1 expert, output scaled by the gate.
# - Capacity `ceil(cf · N / E)`; late tokens over capacity are dropped and ride the residual.
# - Load balancing `α·E·Σ f_i P_i` (α when uniform, α·E when every token is sure of one expert)
#   evens the demand through its gradient on the logits; the
#   z-loss `mean(logsumexp²)` pins each token's log-partition near 0, bounding the logits' level;
#   its gradient pushes each logit by its probability (exercise 4). Each layer has its own loss
#   (exercise 3). Section 7: the balancing loss and the capacity limit are each a brake on
#   collapse; without both, routing collapses.
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
