# %% [markdown]
# # 04 · Top-2 and beyond
#
# **What you will build.** GShard / Mixtral top-2 routing with capacity priority, expert choice,
# DeepSeek-style shared experts, fine-grained experts and auxiliary-loss-free balancing — all as
# options of the same router and MoE layer from notebook 03 (`MoEConfig` fields, nothing copied) —
# and three ways to dispatch tokens to experts.
#
# **What you will measure.** Which routings let a token's experts depend on *later* tokens or on
# other sequences; what the experts sweep says about MoE against dense; how top-1, top-2 and expert
# choice route the same text once trained; which characters each expert takes; what the dispatch
# strategies cost.
#
# **Objectives**
# 1. Route each token to two experts; understand gates, capacity, priority, and which choices the
#    balancing loss counts.
# 2. Know exactly what is and is not causal in token choice and expert choice routing.
# 3. Balance load without an auxiliary loss; add always-on shared and fine-grained experts.
# 4. Read a seeded comparison: when an MoE beats dense at equal compute per token and at equal
#    time, and at which capacity a loss was measured.
# 5. Know the three dispatch strategies and their costs.
#
# Solutions: `solutions/04_top2_routing_solutions.ipynb`.

# %% solutions
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · From top-1 to top-2
# With `top_k = 2` every token goes to its two most probable experts and its output is the gated
# sum of both. The two gates are the router probabilities of the chosen experts **renormalised
# to sum to 1** (GShard). Mixtral computes a softmax over the two chosen *logits* instead — the
# same numbers: `e^{l_i} / (e^{l_1} + e^{l_2})` either way.
#
# What the second expert buys: every token blends two specialists, and the router gets a gradient
# comparing them. (Renormalise a single top-1 gate and it is always 1: no gradient reaches the
# router. That is why Switch keeps the raw probability as its gate.) What it costs: twice the
# expert compute, unless each expert is made half as wide, as the sweep's "E=16 k=2 (2C)" row in
# section 4 does to compare at equal FLOPs; and, across devices, twice the tokens sent to experts
# and back (notebook 06). Capacity now counts *assignments*:
# `ceil(cf · k · N / E)` slots per expert, and **priority** decides who gets them: every token's
# first choice before any token's second choice.

# %% [markdown] solutions
# ### ✍️ Exercise 1 — top-2 gates
# From router logits `(N, E)`, return the two chosen experts per token (best first, shape `(N, 2)`)
# and their gates `(N, 2)`, renormalised.

# %% solutions
def top2_gates(logits):
    """logits (N, E) -> (experts (N, 2), gates (N, 2) summing to 1 per token)."""
    # BEGIN SOLUTION
    probs = F.softmax(logits, dim=-1)
    gates, experts = torch.topk(probs, 2, dim=-1)
    return experts, gates / gates.sum(dim=-1, keepdim=True)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch04 import check_top2_gates

passed = check_top2_gates(top2_gates)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `topk` on the softmax returns the two largest probabilities, best first, and
# their experts; dividing by their sum renormalises them over the chosen pair, which equals a softmax
# over the two chosen logits (the other experts' `e^{l_j}` cancel).
#
# **Wrong answers the check catches:** the raw softmax probabilities as gates (they sum to less than
# 1), and the experts in the wrong order (worst first).

# %% [markdown]
# Priority on a toy batch: 12 tokens, 4 experts, capacity factor 1.0, so `ceil(1.0·2·12/4) = 6`
# slots per expert. Filled markers were processed, hollow ones dropped.

# %%
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.router import Router

torch.manual_seed(3)
router = Router(8, MoEConfig(n_experts=4, top_k=2))
routing = router(torch.randn(12, 8), capacity_factor=1.0)
fig, ax = plt.subplots(figsize=(7, 2.6))
for t in range(12):
    for j, marker in ((0, "s"), (1, "o")):
        e, kept = routing.expert[t, j].item(), routing.kept[t, j].item()
        ax.scatter(t + (j - 0.5) * 0.3, e, s=120, marker=marker, color="tab:blue" if kept else "white",
                   edgecolor="tab:blue" if kept else "tab:red", linewidth=2)
ax.set(xlabel="token", ylabel="expert", yticks=range(4), xticks=range(12),
       title=f"top-2, capacity {routing.capacity}: squares = first choice, circles = second")
plt.show()
print("tokens each expert processed:", routing.tokens_processed.tolist(), "| gates sum to 1:",
      bool(torch.allclose(routing.weights.sum(-1), torch.ones(12))))
print(f"first choices dropped: {(~routing.kept[:, 0]).sum().item()}, "
      f"second choices dropped: {(~routing.kept[:, 1]).sum().item()}")

# %% [markdown]
# Look at the hollow circles: a second choice can be dropped because of a token that comes
# *later* — its first choice outranks every second choice. Section 2 measures what that means for
# a causal model.

# %% [markdown] solutions
# ### ✍️ Exercise 2 — slots with first-choice priority
# Given each token's chosen experts `(N, k)`, best first, return each assignment's slot at its
# expert `(N, k)`: its arrival order there, counting from 0. Every token's first choice arrives
# before any token's second choice (then third, ...); within one choice rank, tokens arrive in
# order. Write it yourself (the package's `positions_in_expert` is the answer).

# %% solutions
def priority_slots(expert, n_experts):
    """expert (N, k) -> position (N, k): arrival order of each assignment at its expert."""
    # BEGIN SOLUTION
    N, k = expert.shape
    flat = expert.t().reshape(-1)  # (k*N,) choice-major: all first choices, then all second choices
    arrivals = F.one_hot(flat, n_experts).cumsum(dim=0) - 1  # (k*N, E): how many came before, per expert
    return arrivals.gather(1, flat[:, None]).view(k, N).t()  # each assignment's count at its own expert
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch04 import check_priority_slots

passed = check_priority_slots(priority_slots)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Transposing before flattening lists the assignments in priority order: every
# first choice (tokens in order), then every second choice. A running one-hot count per expert then
# says how many assignments reached each expert before this one: its slot. Capacity keeps the
# assignments whose slot is below it.
#
# **Wrong answers the check catches:** token order (token 0's two choices, then token 1's), which
# lets a token's second choice take a slot before a later token's first; code written for k = 2
# only; and a call to `positions_in_expert`, under its name or another.

# %% [markdown]
# **Which choices does the balancing loss count?** The package (like GShard and Switch) computes
# `f_i` from each token's *first* choice only. Mixtral's and Qwen-MoE's loss in Hugging Face
# `transformers` (`load_balancing_loss_func`) counts *all k* choices: `f_i` is the number of
# assignments to expert *i* over `N`, so the `f_i` sum to `k` and the balanced value is `k`, not 1.
# The difference matters when second choices pile onto experts that first choices spare:

# %%
from moe_tutorial.router import load_balancing_loss


def all_choices_balancing_loss(probs, expert):
    """Mixtral / transformers: f_i counts every one of the k choices (sums to k), P_i the mean probability."""
    N, E = probs.shape
    f = torch.bincount(expert.reshape(-1), minlength=E).float() / N  # (E,), sums to k
    return E * (f * probs.mean(dim=0)).sum()


# 8 experts; first choices spread evenly over all 8, but every second choice is expert 0 or 1.
N, E = 800, 8
first = torch.arange(N) % E
second = torch.where(first == 0, 1, 0)
probs = torch.full((N, E), 0.02)
probs[torch.arange(N), first] = 0.6
probs[torch.arange(N), second] = 0.28  # rows sum to 1: 0.6 + 0.28 + 6 x 0.02
expert = torch.stack([first, second], dim=1)  # (N, 2)
first_only = load_balancing_loss(probs, first).item()
all_k = all_choices_balancing_loss(probs, expert).item()
print(f"first choices only (package, GShard, Switch): {first_only:.3f}  (balanced value 1)")
print(f"all k choices (Mixtral in transformers):      {all_k:.3f}  (balanced value {expert.size(1)})")
print(f"assignments per expert: {torch.bincount(expert.reshape(-1), minlength=E).tolist()}")
# With uniform first choices E·Σ (1/E)·P_i = Σ P_i = 1 whatever P is: the first-choice loss cannot see
# second choices at all. The assert that can fail is the second one: the all-k loss sees the pile-up.
assert abs(first_only - 1.0) < 1e-5 and all_k > expert.size(1) * 1.3

# %% [markdown]
# Counting first choices only is GShard's choice (its `m_e` is the mean gate, its `c_e` counts
# first choices): the second expert is a bonus that random routing may even skip. It leaves second
# choices unbalanced, and those are the ones capacity drops first. Counting all k, as Mixtral
# does in `transformers`, balances every request an expert gets (what it processes, when nothing
# is dropped). The package implements
# GShard's definition only. Every variant of section 4's sweep that uses a balancing loss was
# trained with it, including fine-grained ones with k = 3 to 8, where counting all k would be the
# natural choice. The sweep's best variant uses no balancing loss at all (section 3).
#
# A model has one router per MoE layer, and each gets its own balancing loss, computed on that
# layer's tokens; the total adds them. `transformers`' `load_balancing_loss_func` concatenates
# every layer's router outputs and computes one loss over all of them. Then two layers collapsed
# onto different experts look less collapsed together: the pooled loss is lower, and its gradient
# pushes on experts that a layer never uses. (With E layers collapsed onto E different experts the
# pooled `f` is exactly uniform.)

# %% [markdown] solutions
# ### ✍️ Exercise 3 — the balancing loss of a whole model
# Given each MoE layer's router probabilities `(N, E)` and first choices `(N,)` (two lists, one
# entry per layer), return the model's total balancing loss: each layer's Switch loss
# `E · Σ_i f_i P_i` on its own tokens, added over layers. Compute `f_i` and `P_i` yourself (notebook
# 03's exercise 2), not with the package's `load_balancing_loss`.

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
from moe_tutorial.exercises.ch04 import check_balancing_loss_over_layers

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
# ## 2 · What is causal, and what is not
# A causal language model must compute token *t*'s output from tokens ≤ *t* of its own sequence.
# Three routings, three answers:
# - **Token choice, top-1, with capacity.** The expert depends on the token alone. Whether it is
#   *dropped* depends on the tokens that arrived before it — in the flattened `B·T` batch, which
#   includes the *earlier sequences* of the batch. So: no future leak inside a sequence, but the
#   output depends on other sequences.
# - **Token choice, top-2, with capacity.** All first choices rank before any second choice across
#   the whole flattened batch, so a token's *second* choice can be dropped because of a *later*
#   token's first choice: a leak from the future, and from every other sequence.
# - **Expert choice** (Zhou et al. 2022): each expert picks the tokens that score it highest, out
#   of the whole batch. Load is perfectly balanced by construction, but whether token *t* is picked
#   depends on every other token, later ones included.
#
# We measure each on a batch of 4 sequences of 64 tokens: change only the last token of the *last*
# sequence and count how many of its earlier tokens change routing (experts or kept slots) — a leak
# from the future; and change all of the *first* sequence and count how many tokens of the last
# one change — a dependence on another sequence. (The last sequence, because slots run out at the
# end of the arrival order: that is where drops happen.) Then the same with capacity switched off
# (`dropless`).

# %% [markdown] solutions
# ### ✍️ Exercise 4 — expert choice
# Given router probabilities `(N, E)` and a capacity `C`, return `kept (N, E)`, a bool table:
# `kept[n, e]` is True when expert `e` picked token `n`. Each expert picks the `C` tokens that
# score it highest.

# %% solutions
def expert_choice_kept(probs, capacity):
    """probs (N, E), capacity C -> kept (N, E) bool, exactly C True per column."""
    # BEGIN SOLUTION
    kept = torch.zeros_like(probs, dtype=torch.bool)
    chosen = probs.topk(capacity, dim=0).indices  # (C, E): each expert's best tokens
    kept[chosen, torch.arange(probs.size(1))] = True
    return kept
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch04 import check_expert_choice_kept

passed = check_expert_choice_kept(expert_choice_kept)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `topk(C, dim=0)` runs down each column: for every expert, the C tokens with the
# highest score for it. Every expert is full, exactly C tokens, whatever the scores: perfect balance.
# A token can appear in several columns or in none.
#
# **Wrong answers the check catches:** top-k along `dim=1` (each token picks experts: token
# choice), and the `C · E` highest scores of the whole table (experts no longer get C each).

# %%
from moe_tutorial.moe import MoE, dropless


def routing_leaks(layer, trials=40, B=4, T=64):
    """% of the last sequence's tokens re-routed: (a) its earlier tokens when its last token changes,
    (b) all of them when the first sequence changes."""
    def routes(x):
        r = layer(x).routing
        return torch.cat([r.expert * r.kept, r.kept], dim=1).view(B, T, -1)  # (B, T, 2k): who processes each token

    future, other = [], []
    for _ in range(trials):
        x = torch.randn(B, T, layer.router.gate.in_features)
        before = routes(x)
        x_future = x.clone()
        x_future[-1, -1] = 3 * torch.randn(x.size(-1))  # only the last token of the last sequence changes
        future.append((routes(x_future)[-1, :-1] != before[-1, :-1]).any(-1).float().mean().item())
        x_other = x.clone()
        x_other[0] = torch.randn(T, x.size(-1))  # all of the first sequence changes
        other.append((routes(x_other)[-1] != before[-1]).any(-1).float().mean().item())
    return 100 * sum(future) / trials, 100 * sum(other) / trials


torch.manual_seed(0)
routings = {"token choice, top-1": dict(top_k=1), "token choice, top-2": dict(top_k=2),
            "expert choice": dict(routing="expert_choice")}
leaks = {}
print(f"{'routing':<22}{'capacity':>10}{'future leak %':>15}{'other-sequence leak %':>23}")
for name, fields in routings.items():
    layer = MoE(GPTConfig(vocab_size=65, n_embd=32, n_head=4,
                          moe=MoEConfig(n_experts=4, capacity_factor_eval=1.0, **fields))).eval()
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=32 ** -0.5)  # logits of order 1, as in a trained router
        leaks[name, "cf 1.0"] = routing_leaks(layer)
        if fields.get("routing") != "expert_choice":  # expert choice has no dropless form: choosing *is* its capacity
            with dropless(layer):
                leaks[name, "dropless"] = routing_leaks(layer)
for (name, cap), (future, other) in leaks.items():
    print(f"{name:<22}{cap:>10}{future:>15.1f}{other:>23.1f}")

top1, top2 = leaks["token choice, top-1", "cf 1.0"], leaks["token choice, top-2", "cf 1.0"]
expert_choice = leaks["expert choice", "cf 1.0"]
assert top1[0] == 0.0 and top1[1] > 0.0  # top-1: causal within a sequence, not across the batch
assert top2[0] > 0.0 and top2[1] > 0.0 and expert_choice[0] > 0.0  # both leak from the future
assert all(leaks[name, "dropless"] == (0.0, 0.0) for name in ("token choice, top-1", "token choice, top-2"))

# %% [markdown]
# Read the table row by row. **Top-1** never re-routes an earlier token of the same sequence
# (exactly 0, asserted): its drops are causal within a sequence. But the first sequence arrives
# before the last in the flattened batch, so changing it changes which of the last sequence's tokens
# find room: a token's output depends on the other sequences it was batched with. **Top-2** also
# leaks from the future, through second choices that a later first choice outranks. **Expert
# choice** leaks both ways too: every expert ranks the whole batch, later tokens included. Switch
# capacity off and token choice depends on the token alone (the dropless rows: 0 and 0, asserted).
#
# **Generation** with token choice does not have this problem, because the package never drops
# during generation: `GPT.generate` runs every MoE layer `dropless` (the dropless rows: nothing
# leaks, asserted). A token's output then depends only on its own prefix, and a KV-cache step over
# one token gives the same logits as a full forward pass. Training with capacity is the
# approximation: the loss of a top-2 model is measured with a little information from the batch.
#
# Expert choice has no dropless form. Decoding one token at a time, that token is the whole batch,
# and every expert would pick it: the model would compute another function than the one it trained.
# So `generate` refuses an expert-choice model, and its validation loss, measured on whole batches
# that include later tokens, is not comparable with a causal model's. That is why the sweep in
# section 4 leaves expert choice out. Expert choice was designed for encoders and for training; to
# decode with it, Mixture-of-Depths (Raposo et al. 2024) trains a small per-token predictor of the
# experts' top-C decision and uses that at inference.

# %% [markdown]
# ## 3 · Aux-loss-free balancing, shared and fine-grained experts
# DeepSeek-V3 balances load without an auxiliary loss: each expert has a bias `b_i` that is
# **added to its score only when selecting experts**, never to the gate. After every step, `b_i`
# moves by `±γ` toward even load: `b_i += γ · sign(mean_load − load_i)`. The language-model
# gradient is left untouched, yet over-loaded experts become less attractive. Two details of the
# real recipe (notebook 07 builds both): DeepSeek-V3's scores are **sigmoid** affinities, not a
# softmax (the bias is added to `sigmoid(l_i)`), and it keeps a tiny **sequence-wise balance loss**
# (α = 1e-4) so that no single sequence piles onto a few experts — "auxiliary-loss-free" means no
# batch-level loss, not no loss at all.

# %% [markdown] solutions
# ### ✍️ Exercise 5 — the bias update
# Given the bias `(E,)`, the number of tokens each expert received `(E,)` and the rate `γ`,
# return the new bias.

# %% solutions
def update_selection_bias(bias, load, rate):
    """bias (E,), load (E,) -> bias nudged by +-rate toward even load."""
    # BEGIN SOLUTION
    return bias + rate * torch.sign(load.mean() - load)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch04 import check_update_selection_bias

passed = check_update_selection_bias(update_selection_bias)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `mean − load` is positive for under-loaded experts and negative for over-loaded
# ones; its sign moves every bias by a fixed `γ` in the direction that evens the load, and an expert
# exactly at the mean (sign 0) keeps its bias. A fixed step, not one proportional to the imbalance,
# is DeepSeek-V3's rule: it cannot overshoot wildly when one expert is hugely over-loaded.
#
# **Wrong answers the check catches:** the sign reversed (over-loaded experts made *more*
# attractive), and a step proportional to `mean − load` instead of its sign.

# %% [markdown]
# The package's router does exactly this when `bias_update_rate > 0`: in training it counts each
# expert's assignments over every micro-batch of a step, and `train()` calls
# `model.after_optimizer_step()` after each optimizer step, which moves every router's bias by that
# load (`router.update_selection_bias()`). Here it rebalances a deliberately skewed router on a
# stream of inputs, without touching its weights or its gates:

# %%
from moe_tutorial.router import balance_metrics

torch.manual_seed(0)
skewed = Router(16, MoEConfig(n_experts=4, top_k=1, bias_update_rate=0.01))
with torch.no_grad():
    skewed.gate.weight.normal_(std=0.1)
    skewed.gate.weight[0] += 0.1  # expert 0 wins for most inputs
imbalance = []
for step in range(300):
    r = skewed(torch.randn(256, 16) + 1.0, capacity_factor=10.0)
    imbalance.append(balance_metrics(r)["max_over_mean"])
    skewed.update_selection_bias()  # from the load counted in this step's forward pass
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(imbalance)
ax.axhline(1.0, color="gray", ls="--")
ax.set(xlabel="step", ylabel="max load / mean load", title="aux-loss-free balancing of a skewed router")
plt.show()
late = sum(imbalance[-20:]) / 20
print(f"max/mean load: {imbalance[0]:.2f} at the start, {late:.2f} over the last 20 steps; "
      f"bias {[round(b, 2) for b in skewed.selection_bias.tolist()]}")
assert imbalance[0] > 2.0 and late < 1.3  # from badly skewed to within 30% of even

# %% [markdown]
# **Shared experts**: some experts see *every* token, next to the routed ones. DeepSpeed-MoE's
# Residual-MoE (Rajbhandari et al. 2022) added one always-on MLP beside a top-1 expert; DeepSeekMoE
# (Dai et al. 2024) made it the rule: the shared experts learn what all tokens need, so the routed
# ones can specialise.
# `MoEConfig(n_shared_experts=1)` adds one always-on expert.
#
# **Fine-grained experts** (same paper): split each of the `E` experts into `m` experts of width
# `1/m`, and route each token to `m·k` of the `m·E` narrower ones. Parameters and compute per token
# are unchanged, but the number of possible expert *combinations* explodes: with 16 experts top-2
# a token chooses among C(16, 2) = 120 pairs; split into 64 experts top-8, among C(64, 8) ≈ 4.4·10⁹
# sets. Making top-2 experts half as wide without adding experts (a common way to match FLOPs) is
# *not* this: it halves each expert and keeps the number of choices.

# %%
for E_, k_ in ((16, 2), (32, 4), (64, 8)):
    print(f"E={E_:>2} top-{k_}: {math.comb(E_, k_):>13,} possible expert sets per token")
assert math.comb(64, 8) > 1e9

# %% [markdown]
# ## 4 · Does an MoE beat dense? The experts sweep
# `benchmarks/moe_scaling.py` trains top-1 with 4 to 32 full-width experts, fine-grained top-k
# with and without a shared expert, and two changes to the best of them, on the char recipe of
# notebook 01: each with the dense model's active compute per token, 3 seeds each. (A 0.8M-parameter
# character model: a small scale, where findings need not carry to large ones.) One rule judges every MoE
# against dense: "better" or "worse" only when the means differ by more than twice the seeds'
# combined sd (`moe_tutorial.seeds`), otherwise "tie". The val losses were measured in eval mode,
# at capacity factor 2.0 (section 5 measures what that drops); generation is dropless. This cell
# reads the committed results; `python benchmarks/moe_scaling.py` trains them again (hours on a CPU).

# %%
from moe_tutorial import sweep
from moe_tutorial.seeds import verdict

rows = sweep.summary(sweep.load_runs())
print(sweep.format_table(rows))
sweep.plot_results(rows)
plt.show()

# %% [markdown]
# Fine-grained experts with a shared expert, balanced without an auxiliary loss, are the best MoE:
# better than dense at the recipe's 1,800 steps and at twice that. With the same routed width, a
# shared expert helps at 32 and 64 experts. Top-1 with 32 full-width experts is worse than dense: a
# step's 768 tokens give each expert about 24 to learn from. Top-1 with 16 spreads so widely over
# its seeds that nothing about it can be called (below). Half the MoE layers (every other block)
# lose the lead; on this one MoE the bias beats the balancing loss, by just over 2 sd. At equal
# wall time on a 2-core CPU the best MoE only ties dense (dense's mean is lower at both budgets):
# each of its steps costs about twice as much, the `x dense` column. Each equal-time run trained the
# steps a short timing probe said would fit, so its own seconds differ from the budget; compare
# milliseconds within one budget only, since the speed phase and these runs ran in different
# sittings.

# %%
at = {(r.comparison, r.budget, r.variant): r for r in rows}
BEST = "E=32 k=3 (C) + shared, aux-loss-free"
best = min((r for r in rows if r.comparison == "equal_steps" and r.budget == 1800 and r.variant != "dense"),
           key=lambda r: r.mean)
assert best.variant == BEST and best.verdict == "better" and at["equal_steps", 3600, BEST].verdict == "better"
assert at["equal_steps", 1800, "top-1 E=32"].verdict == "worse"
top1_sd = {e: at["equal_steps", 1800, f"top-1 E={e}"].sd for e in (4, 8, 16, 32)}
assert top1_sd[16] > 3 * max(top1_sd[4], top1_sd[8], top1_sd[32])  # one seed far off the others
assert at["equal_steps", 1800, "E=32 k=3 (C) + shared, every other block"].verdict == "tie"
assert verdict(at["equal_steps", 1800, BEST].losses, at["equal_steps", 1800, "E=32 k=3 (C) + shared"].losses) == "lower"
timed_moe = [r for r in rows if r.comparison == "equal_time" and r.variant != "dense"]
assert timed_moe and all(r.verdict == "tie" and r.x_dense > 1.4 for r in timed_moe)
for r in [best, at["equal_steps", 3600, BEST], at["equal_steps", 1800, "top-1 E=32"], *timed_moe]:
    print(f"{r.comparison} {r.budget:g}: {r.variant} vs dense {r.vs_dense:+.4f}: {r.verdict}")
shared_helps = {e: verdict(at["equal_steps", 1800, with_shared].losses, at["equal_steps", 1800, without].losses)
                for e, with_shared, without in ((32, "E=32 k=3 (C) + shared", "E=32 k=4 (C)"),
                                                (64, "E=64 k=7 (C/2) + shared", "E=64 k=8 (C/2)"))}
assert shared_helps == {32: "lower", 64: "lower"} and all(r.vs_dense > 0 for r in timed_moe)

# %% [markdown]
# **Why does top-1 E=16 spread so widely?** The benchmark's `routing` phase trains its three seeds
# again (the same val losses come out: the runs are deterministic) and records what the routers did:
# each layer's busiest expert and drops over the last 100 steps, and through training (each number a
# mean over 300 steps) the loss and the busiest layer's busiest expert.

# %%
print(sweep.routing_table(sweep.load_runs()))
diagnosis = {r["seed"]: r for r in sweep.load_runs() if r["comparison"] == "routing" and r["variant"] == "top-1 E=16"}
sweep_losses = {r["seed"]: r["val_loss"] for r in sweep.load_runs()
                if r["comparison"] == "equal_steps" and r["variant"] == "top-1 E=16" and r["steps"] == 1800}
assert all(abs(diagnosis[seed]["val_loss"] - sweep_losses[seed]) < 1e-3 for seed in sweep_losses)  # reproduced
worst, best_seed = max(sweep_losses, key=sweep_losses.get), min(sweep_losses, key=sweep_losses.get)
assert all(max(r["max_share"]) < 2 / 16 for r in diagnosis.values())  # every seed ends balanced
assert diagnosis[worst]["dropped_pct"][0] == max(r["dropped_pct"][0] for r in diagnosis.values())
middle = (set(diagnosis) - {worst, best_seed}).pop()
assert diagnosis[middle]["dropped_pct"][0] < diagnosis[best_seed]["dropped_pct"][0]  # drops do not rank them
gap = [w - b for w, b in zip(diagnosis[worst]["loss_through_training"], diagnosis[best_seed]["loss_through_training"])]
assert gap[1] > 0.05 and gap[-1] > 0.2  # the worst seed is behind early, and falls further behind

# %% [markdown]
# No seed collapses: every router ends with its busiest expert under twice an even share. The worst
# seed drops the most in its first layer, but the middle seed drops less than the best: drops do not
# rank them. The loss curves part early, while the routers are still settling, and keep parting. So
# the spread is not a routing failure these statistics can see. Sixteen full-width experts, each
# seeing about 48 of a step's tokens, make a model whose result depends strongly on its start; that
# is a finding about this setting, not a tie between equals.

# %% [markdown]
# ## 5 · Three routers, trained
# Now train one model per router on this machine: top-1 over 8 full-width experts (Switch), top-2
# over 8 half-width experts, and expert choice over the same 8 half-width experts, each expert taking
# `ceil(2N/8)` tokens (two per token on average). All three have the dense model's compute per
# token. One seed each, at a third of the recipe: enough to look inside, not to rank them.

# %%
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.train import train

STEPS = 600
ROUTERS = {
    "top-1": MoEConfig(n_experts=8, top_k=1),
    "top-2": MoEConfig(n_experts=8, top_k=2, expert_hidden=256),
    "expert choice": MoEConfig(n_experts=8, top_k=2, expert_hidden=256, routing="expert_choice",
                               capacity_factor_train=1.0, capacity_factor_eval=1.0),
}
dataset = shakespeare_dataset(progress=False)
trained = {}
for name, moe in ROUTERS.items():
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, max_iters=STEPS, eval_interval=STEPS,
                                  progress=False)
    torch.manual_seed(train_cfg.seed)
    trained[name] = GPT(GPTConfig(**{**model_cfg.to_dict(), "moe": moe}))
    train(trained[name], dataset, train_cfg)

# %% [markdown]
# **Which capacity was the loss measured at?** Token choice trains at capacity factor 1.25,
# evaluates at 2.0 and generates dropless. Here is each model's validation loss at its evaluation
# capacity and dropless, and the share of characters no expert processed at the evaluation capacity
# (on one validation batch of 12 × 64, averaged over the MoE layers).
# Expert choice has no dropless form (its capacity *is* its routing): it evaluates at its training
# capacity factor, 1.0.

# %%
val_batches = fixed_batches(dataset.val, 20, 12, 64, seed=0)
print(f"{'router':<15}{'eval capacity factor':>22}{'val loss':>10}{'dropless':>10}{'characters dropped':>20}")
eval_gap, dropped_pct = {}, {}
for name, model in trained.items():
    at_eval = estimate_loss(model, val_batches, train_cfg)
    model.eval()
    with torch.no_grad():
        routings = model(*val_batches[0], return_routing=True).routing
    dropped = dropped_pct[name] = 100 * sum(r.dropped.float().mean().item() for r in routings) / len(routings)
    free = "-"
    if name != "expert choice":
        with dropless(model):
            free = estimate_loss(model, val_batches, train_cfg)
        eval_gap[name] = at_eval - free
        free = f"{free:.4f}"
    print(f"{name:<15}{model.config.moe.capacity_factor_eval:>22}{at_eval:>10.4f}{free:>10}{dropped:>19.1f}%")
assert all(abs(gap) < 0.01 for gap in eval_gap.values())  # at cf 2.0, as good as dropless
assert dropped_pct["expert choice"] > 0  # some characters no expert picked

# %% [markdown]
# For token choice, capacity factor 2.0 is as good as dropless: the two columns agree (asserted to
# within 0.01). Expert choice leaves some characters with no expert, by design: no expert ranked
# them among its best.
#
# ### What do the experts learn?
# Route the validation text through the top-1 model and count, for each frequent character, which
# expert takes it (first and last MoE layer). Each row sums to 1. If routing ignored the character,
# every row would look like the layer's overall load: a character's favourite expert would take
# about the busiest expert's share. That, not `1/E`, is the baseline when load is uneven.

# %%
from collections import Counter

from moe_tutorial.analysis import uncertainty_coefficient

text = dataset.tokenizer.decode(dataset.val[:16384])
ids = torch.tensor(dataset.tokenizer.encode(text)).view(-1, 64)
top1 = trained["top-1"].eval()
with torch.no_grad(), dropless(top1):
    routings = top1(ids, return_routing=True).routing
chars = ids.reshape(-1)
E = ROUTERS["top-1"].n_experts
frequent = [ch for ch, _ in Counter(text).most_common(24)]
labels = [{" ": "␣ (space)", "\n": "↵ (newline)"}.get(c, c) for c in frequent]
fig, axes = plt.subplots(1, 2, figsize=(11, 6), constrained_layout=True)
print(f"{'layer':<7}{'favourite expert':>17}{'busiest expert':>16}{'U(char | expert)':>18}{'shuffled':>10}"
      f"{'U(expert | char)':>18}")
determined = []
for ax, i in zip(axes, (0, len(routings) - 1)):
    expert = routings[i].expert[:, 0]
    table = torch.stack([torch.bincount(expert[chars == dataset.tokenizer.stoi[ch]], minlength=E).float()
                         for ch in frequent])
    table /= table.sum(dim=1, keepdim=True)  # (characters, E): each row sums to 1
    image = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(yticks=range(len(frequent)), yticklabels=labels if i == 0 else [], xticks=range(E),
           xlabel="expert", title=f"MoE layer {i}")
    favourite = table.max(dim=1).values.mean().item()
    busiest = (torch.bincount(expert, minlength=E).max() / len(expert)).item()
    shuffled = chars[torch.randperm(len(chars), generator=torch.Generator().manual_seed(0))]
    tells, baseline = uncertainty_coefficient(expert, chars), uncertainty_coefficient(expert, shuffled)
    determined.append(uncertainty_coefficient(chars, expert))  # 1: the expert is a function of the character
    print(f"{i:<7}{favourite:>17.0%}{busiest:>16.0%}{tells:>18.0%}{baseline:>10.1%}{determined[-1]:>18.0%}")
    assert favourite > busiest + 0.2 and tells > 5 * baseline
fig.colorbar(image, ax=axes, label="share of the character's occurrences", shrink=0.8)
fig.suptitle("Top-1 model: where each frequent character goes")
plt.show()
assert determined[0] > determined[-1]  # layer 0 routes more by the character alone than the last layer

# %% [markdown]
# In both layers a character's favourite expert takes far more of it than the busiest expert's
# share, and knowing the expert removes much of the uncertainty about the character (shuffled
# characters: almost none). The last column asks the reverse: how much of the expert the character
# alone decides. In layer 0 it decides most of it. That is close to **hash routing** (Roller et al.
# 2021), where a fixed hash of the token id picks the expert and this column is 100% by
# construction. Layer 0's input is mostly the character's embedding, after one attention layer;
# deeper layers' inputs carry more context, and they route less by the character alone.
#
# ### The three routers in the explorer
# The routing explorer of notebook 03, with the three models. Choose **show: every model** to see
# top-1, top-2 and expert choice route the same text side by side: how many experts each character
# got, which were dropped, and how full each expert is. (Live kernel only; the static view follows.)

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.viz import RoutingExplorer, plot_routing, route_text

sample = dataset.tokenizer.decode(dataset.val[:256])
explorer = RoutingExplorer(trained, dataset.tokenizer, sample, capacity_factor=1.0)
explorer

# %%
from moe_tutorial.moe import override_capacity

views = {}
print(f"{'':<15}{'':>9}{'assignments':>13}{'characters with this many experts':>38}")
print(f"{'router':<15}{'capacity':>9}{'processed':>13}{'0':>8}{'1':>8}{'2':>8}{'3 or more':>14}")
for name, model in trained.items():
    view = views[name] = route_text(model, dataset.tokenizer, sample, layer=0, capacity_factor=1.0)
    per_character = view.experts_per_character + [0, 0, 0]  # characters with 0, 1, 2, ... experts
    print(f"{name:<15}{view.capacity:>9}{sum(view.processed):>13}{per_character[0]:>8}{per_character[1]:>8}"
          f"{per_character[2]:>8}{sum(per_character[3:]):>14}")
    # The layer's own routing of the same windows: the explorer counts exactly what it kept.
    ids = torch.tensor(dataset.tokenizer.encode(sample))
    windows = torch.cat([ids, ids.new_zeros(view.n_padding)]).view(view.windows, view.window_length)
    with torch.no_grad(), override_capacity(model.moe_layers()[0], 1.0):
        kept = model.eval()(windows, return_routing=True).routing[0].kept
    assert sum(view.processed) + sum(view.padding_processed) == int(kept.sum())
assert len(views["top-1"].experts_per_character) == 2  # top-1: one expert or none
assert len(views["top-2"].experts_per_character) <= 3  # top-2: at most two
assert views["expert choice"].experts_per_character[1] > 0 and len(views["expert choice"].experts_per_character) > 3
for name, view in views.items():
    fig = plot_routing(view, max_lines=2)
    fig.suptitle(f"{name}, capacity factor 1.0", x=0.01, ha="left", fontweight="bold")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# Top-1 gives every character one expert or none. Top-2 gives most characters two, and a character
# whose second choice found no room still has its first. Expert choice gives some characters a
# single expert and others three or more: each expert fills its slots with the characters that score
# it highest, whoever they are. Lower the capacity factor far enough and some characters get none.
#
# ## 6 · Dispatch strategies
# Three ways to get tokens to experts and back (`moe_tutorial.dispatch`), with identical outputs:
# - **einsum** (GShard, Mesh TensorFlow): build one-hot *dispatch* and gate-weighted *combine*
#   tensors of shape `(N, E, C)` and use einsums. Static shapes (good for TPUs), but memory and
#   time grow with tokens × experts × capacity — and capacity itself grows with tokens.
# - **sort**: sort the kept assignments by expert, run one grouped matmul pair over contiguous
#   slices, scatter-add back. The package's default.
# - **loop**: one expert at a time on its own tokens (Hugging Face's Mixtral block).

# %% [markdown] solutions
# ### ✍️ Exercise 6 — the dispatch mask
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
from moe_tutorial.exercises.ch04 import check_dispatch_mask

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
from moe_tutorial.dispatch import DISPATCH
from moe_tutorial.measure import dispatch_point

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
#
# ## Summary
# - Top-2: gates renormalised over the two experts (= Mixtral's top-k softmax); capacity counts
#   assignments, first choices have priority (exercises 1 and 2). The package balances first choices
#   (GShard); Mixtral's loss counts all k; each layer's loss is computed on its own tokens
#   (exercise 3).
# - Causality: with capacity, top-1 drops depend on earlier tokens and earlier sequences, top-2's
#   second choices and expert choice depend on later tokens too (measured); generation runs
#   dropless, so nothing leaks there. Expert choice: each expert takes its top C (exercise 4).
# - Aux-loss-free balancing nudges a selection-only bias by ±γ (exercise 5); shared experts see
#   every token; fine-grained experts multiply the choices at the same compute.
# - The experts sweep (3 seeds, equal compute per token): fine-grained + shared experts with the
#   bias beat dense at equal steps and tie it at equal time on a CPU; losses measured at capacity
#   factor 2.0, as good as dropless for token choice.
# - Trained top-1, top-2 and expert choice route the same text differently: one expert or none,
#   mostly two, and anywhere from none to several. Layer 0 routes almost by the character alone.
# - Dispatch: einsum (one-hot, exercise 6), sort (default), loop — same outputs, different costs.
#
# **Where the finalized code lives:** `moe_tutorial/router.py` (all routing variants,
# `balance_metrics`, `load_cv`), `moe.py` (shared experts, `dropless`), `dispatch.py`, `seeds.py`
# (mean ± sd and ties), `sweep.py` (the sweep's variants and its table), `viz.py` (the explorer),
# `benchmarks/moe_scaling.py`, `benchmarks/moe_dispatch.py`.
#
# ## Further reading
# - Lepikhin et al. 2020, *GShard* — top-2 gating, capacity, first-choice priority, random routing:
#   [arXiv:2006.16668](https://arxiv.org/abs/2006.16668).
# - Fedus et al. 2021, *Switch Transformers* — the load-balancing loss used here:
#   [arXiv:2101.03961](https://arxiv.org/abs/2101.03961).
# - Raposo et al. 2024, *Mixture-of-Depths* — top-C routing made causal with a per-token predictor:
#   [arXiv:2404.02258](https://arxiv.org/abs/2404.02258).
# - Zhou et al. 2022, *Mixture-of-Experts with Expert Choice Routing*:
#   [arXiv:2202.09368](https://arxiv.org/abs/2202.09368).
# - Jiang et al. 2024, *Mixtral of Experts* — top-2 of 8 in every block:
#   [arXiv:2401.04088](https://arxiv.org/abs/2401.04088).
# - Roller et al. 2021, *Hash Layers For Large Sparse Models* — routing by a fixed hash of the token:
#   [arXiv:2106.04426](https://arxiv.org/abs/2106.04426).
# - Rajbhandari et al. 2022, *DeepSpeed-MoE* — Residual-MoE, an always-on MLP beside the routed expert:
#   [arXiv:2201.05596](https://arxiv.org/abs/2201.05596).
# - Dai et al. 2024, *DeepSeekMoE* — fine-grained and shared experts:
#   [arXiv:2401.06066](https://arxiv.org/abs/2401.06066).
# - Wang et al. 2024, *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*:
#   [arXiv:2408.15664](https://arxiv.org/abs/2408.15664); DeepSeek-AI 2024, *DeepSeek-V3*
#   (§2.1.2: sigmoid scores, the bias, the sequence-wise loss): [arXiv:2412.19437](https://arxiv.org/abs/2412.19437).
# - Code: `transformers`' `modeling_mixtral.py` (`load_balancing_loss_func` counts all k choices)
#   and the MegaBlocks repository (dropless, sort-based dispatch).
