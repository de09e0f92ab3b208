# %% [markdown]
# # 04 · Top-2 and beyond
#
# **What you will build.** GShard's top-2 routing with capacity and first-choice priority, then
# expert choice, shared and fine-grained experts, and auxiliary-loss-free balancing: each an option
# of notebook 03's router. **What you will measure.** Which routings leak from later tokens or other
# sequences; whether an MoE beats dense; how trained routers route the same text.
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
# With `top_k = 2` every token goes to its two most probable experts. Its output is the gated sum
# of both, with the two probabilities **renormalised to sum to 1** (GShard). Mixtral's softmax over
# the two chosen logits gives the same numbers: `e^{l_i} / (e^{l_1} + e^{l_2})`.
#
# The second expert buys a blend of two specialists and a router gradient that compares them (a
# renormalised top-1 gate is always 1: Switch keeps the raw probability). Shazeer et al. (2017) held
# that k ≥ 2 was needed for the router to learn; Switch showed k = 1 works. It costs twice the expert
# compute, unless experts are half as wide, and twice the tokens sent across devices. Capacity counts
# *assignments*, `ceil(cf · k · N / E)` slots per expert, and **priority** decides who gets them:
# every token's first choice before any token's second.
#
# A toy batch: 12 tokens, 4 experts, capacity factor 1.0: 6 slots per expert. Hollow markers were
# dropped.

# %%
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.router import Router

torch.manual_seed(6)
router = Router(8, MoEConfig(n_experts=4, top_k=2))
routing = router(torch.randn(12, 8), capacity_factor=1.0)
expert, kept = routing.expert, routing.kept  # (12, 2) each
fig, ax = plt.subplots(figsize=(7, 2.8))
for t in range(12):
    for j, marker in ((0, "s"), (1, "o")):
        ax.scatter(t + (j - 0.5) * 0.3, expert[t, j], s=120, marker=marker, linewidth=2,
                   color="tab:blue" if kept[t, j] else "white", edgecolor="tab:blue" if kept[t, j] else "tab:red")
displaced = [(u, t) for t in torch.where(~kept[:, 1])[0].tolist() for u in range(t + 1, 12)
             if expert[u, 0] == expert[t, 1] and kept[u, 0]]  # (later token, earlier token it displaced)
u, t = max(displaced, key=lambda pair: pair[0] - pair[1])
ax.annotate("", xy=(t + 0.15, expert[t, 1] + 0.15), xytext=(u - 0.15, expert[u, 0] + 0.15),
            arrowprops=dict(arrowstyle="->", color="tab:red", connectionstyle="arc3,rad=0.12"))
ax.text((t + u) / 2, 4.05, f"token {u}'s first choice takes token {t}'s slot", color="tab:red", fontsize=8,
        ha="center")
ax.set(xlabel="token", ylabel="expert", yticks=range(4), xticks=range(12), ylim=(-0.7, 4.5),
       title=f"top-2, capacity {routing.capacity}: squares = first choice, circles = second")
plt.show()
print(f"assignments processed per expert: {routing.tokens_processed.tolist()}; dropped: {(~kept).sum(0).tolist()} "
      "(first, second choices)")
assert torch.allclose(routing.weights.sum(-1), torch.ones(12))  # the two gates sum to 1
assert u - t > 2  # a second choice lost its slot to a first choice several tokens later

# %% [markdown]
# A second choice can be dropped because of a *later* token: section 2 measures what that means.
#
# **GShard's random routing.** A weak second choice still takes a slot, so GShard sends a token to its
# second expert only with probability `min(1, 2·g₂)` (`g₂ ≤ ½`, renormalised): a near-tie almost
# always goes, a gate of 0.1 one time in five, and a skipped assignment takes no slot.
# `MoEConfig(second_expert="random")` does this in training; evaluation sends all.

# %%
torch.manual_seed(0)
gshard = Router(8, MoEConfig(n_experts=4, top_k=2, second_expert="random")).train()
with torch.no_grad():
    gshard.gate.weight.mul_(5)  # logits of a few units: second gates spread over 0 to 1/2
    r = gshard(torch.randn(20000, 8), capacity_factor=4.0)  # room for all: only the coin decides
second_gate = r.weights[:, 1]
print(f"{'second gate':<14}{'tokens':>8}{'sent to 2nd expert':>20}{'min(1, 2 g2)':>14}")
for low in (0.0, 0.1, 0.2, 0.3, 0.4):
    rows = (second_gate >= low) & (second_gate < low + 0.1)
    sent, expected = r.kept[rows, 1].float().mean(), (2 * second_gate[rows]).clamp(max=1).mean()
    print(f"{f'{low:.1f} to {low + 0.1:.1f}':<14}{int(rows.sum()):>8}{sent:>20.2f}{expected:>14.2f}")
    assert abs(sent - expected) < 0.05
assert bool(r.kept[:, 0].all())  # first choices always go

# %% [markdown] solutions
# ### ✍️ Exercise 1 — slots with first-choice priority
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

slots_solved = check_priority_slots(priority_slots)
assert slots_solved  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** Transposing before flattening lists the assignments in priority order: every
# first choice, then every second choice. A running one-hot count per expert gives each its slot.
#
# **Wrong answers the check catches:** token order (token 0's two choices, then token 1's), code
# written for k = 2 only, and a call to `positions_in_expert` under any name.

# %% [markdown]
# Top-2 routing from scratch, with your slots: choose two experts, renormalise their gates, keep the
# assignments that fit. It matches the package's router on the toy batch above.

# %%
from moe_tutorial.exercises import learner_or_package
from moe_tutorial.router import positions_in_expert

slots = learner_or_package(slots_solved, priority_slots, positions_in_expert, "slots (exercise 1)")
x = torch.randn(12, 8)
gate, chosen = F.softmax(x @ router.gate.weight.T, dim=-1).topk(2, dim=-1)  # (N, 2) each, best first
gate = gate / gate.sum(dim=-1, keepdim=True)  # renormalised over the chosen pair
fits = slots(chosen, 4) < math.ceil(1.0 * 2 * 12 / 4)  # capacity: ceil(cf · k · N / E) slots
theirs = router(x, capacity_factor=1.0)
assert torch.equal(chosen, theirs.expert) and torch.allclose(gate, theirs.weights) and torch.equal(fits, theirs.kept)

# %% [markdown]
# **Which choices does the balancing loss count?** The package, like GShard and Switch, computes
# `f_i` from first choices only. Mixtral's loss in `transformers` (`load_balancing_loss_func`)
# counts all k choices: its `f_i` sum to `k` and its balanced value is `k`, not 1. The two differ
# when second choices pile onto a few experts:

# %%
from moe_tutorial.router import load_balancing_loss

N, E = 800, 8
first = torch.arange(N) % E  # first choices: perfectly even
second = torch.where(first == 0, 1, 0)  # second choices: all on experts 0 and 1
probs = torch.full((N, E), 0.02)
probs[torch.arange(N), first], probs[torch.arange(N), second] = 0.6, 0.28  # rows sum to 1
first_only = load_balancing_loss(probs, first).item()
f_all = torch.bincount(torch.cat([first, second]), minlength=E).float() / N  # all k choices: sums to k
all_k = (E * f_all * probs.mean(dim=0)).sum().item()
print(f"first choices only (package, GShard, Switch): {first_only:.3f}  (balanced: 1)")
print(f"all k choices (Mixtral in transformers):      {all_k:.3f}  (balanced: 2)")
assert abs(first_only - 1.0) < 1e-5 and all_k > 2 * 1.3  # only the all-k loss sees the pile-up

# %% [markdown]
# With even first choices the first-choice loss is exactly 1 whatever the second choices do, and its
# gradient is zero: `∂L/∂P_i = E·f_i` is the same for every expert, and the `P_i` sum to 1. So it
# leaves second choices unbalanced, and capacity drops those first. GShard accepts that: its second
# expert is a bonus that random routing may skip. The package implements GShard's definition, and
# every variant of section 4's sweep that uses a balancing loss was trained with it.

# %% [markdown]
# ## 2 · What is causal, and what is not
# A causal language model must compute token *t*'s output from tokens ≤ *t* of its own sequence.
# Capacity breaks that in three ways:
# - **Top-1.** Whether a token is *dropped* depends on the tokens before it in the flattened `B·T`
#   batch, earlier sequences included.
# - **Top-2.** A later token's first choice can drop an earlier token's second choice.
# - **Expert choice** (Zhou et al. 2022): each expert picks its best-scoring tokens out of the whole
#   batch. Load is balanced by construction, but whether token *t* is picked depends on every other
#   token, later ones included.
#
# The measurement, on 4 sequences of 64 tokens: change the last token of the *last* sequence and
# count its earlier tokens whose routing changes (a leak from the future); change the *first*
# sequence and count the last one's tokens that change (a leak across sequences). The last sequence,
# because slots run out at the end of the arrival order. Then again `dropless`.

# %%
from moe_tutorial.moe import MoE, dropless


def routing_leaks(layer, trials=40, B=4, T=64):
    """% of the last sequence's tokens re-routed when (a) its last token, (b) the first sequence changes."""
    def routes(x):
        r = layer(x).routing
        return torch.cat([r.expert * r.kept, r.kept], dim=1).view(B, T, -1)  # (B, T, 2k): who processes it

    future, other = [], []
    for _ in range(trials):
        x = torch.randn(B, T, layer.router.gate.in_features)
        before, x_future, x_other = routes(x), x.clone(), x.clone()
        x_future[-1, -1] = 3 * torch.randn(x.size(-1))  # only the last token of the last sequence changes
        x_other[0] = torch.randn(T, x.size(-1))  # all of the first sequence changes
        future.append((routes(x_future)[-1, :-1] != before[-1, :-1]).any(-1).float().mean().item())
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

top1, top2, chosen = (leaks[name, "cf 1.0"] for name in routings)
assert top1[0] == 0.0 and top1[1] > 0.0  # top-1: causal within a sequence, not across the batch
assert top2[0] > 0.0 and top2[1] > 0.0 and chosen[0] > 0.0  # both leak from the future
assert all(leaks[name, "dropless"] == (0.0, 0.0) for name in ("token choice, top-1", "token choice, top-2"))

# %% [markdown]
# **Top-1** never re-routes an earlier token of its own sequence: its drops are causal within a
# sequence. But a token's fate depends on the sequences batched before it. **Top-2** and **expert
# choice** leak from the future as well. Without capacity, token choice depends on the token alone.
# GShard counts capacity per *group* of tokens, which bounds how far the dependence reaches; V-MoE's
# batch prioritized routing fills slots by gate instead of position, so every slot depends on all.
#
# **Generation** runs every MoE layer dropless (`GPT.generate`), so nothing leaks there: a token's
# output depends only on its prefix, and a KV-cache step gives the same logits as a full forward.
# Training with capacity is the approximation. Expert choice has no dropless form: decoding one
# token, that token is the whole batch and every expert would pick it. So `generate` refuses an
# expert-choice model, and its validation loss, measured on batches that include later tokens, is
# not comparable with a causal model's; the sweep of section 4 leaves it out. Mixture-of-Depths
# (Raposo et al. 2024) trains with top-C and decodes without it, from router scores trained to tell
# the chosen tokens apart (or a small predictor).

# %% [markdown] solutions
# ### ✍️ Exercise 2 — expert choice
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
# **Why it works.** `topk(C, dim=0)` runs down each column: each expert takes its C best tokens.
# A token can appear in several columns or in none.
#
# **Wrong answers the check catches:** top-k along `dim=1` (token choice), and the `C · E` highest
# scores of the whole table (experts no longer get C each).

# %% [markdown]
# ## 3 · Aux-loss-free balancing, shared and fine-grained experts
# DeepSeek-V3 balances load without an auxiliary loss. Each expert has a bias `b_i`, **added to
# its score only when selecting experts**, never to the gate. After every step it moves by `±γ`
# toward even load: `b_i += γ · sign(mean_load − load_i)`. The language-model gradient is untouched,
# yet over-loaded experts become less attractive. DeepSeek-V3 adds the bias to **sigmoid** scores
# and keeps a tiny **sequence-wise balance loss** (α = 1e-4); notebook 07 builds both.

# %% [markdown] solutions
# ### ✍️ Exercise 3 — one aux-loss-free step
# From router probabilities `(N, E)`, the bias `(E,)`, `k` and `γ`, return the experts `(N, k)` (the
# top-k of `probs + bias`), their gates `(N, k)` (the *unbiased* probabilities, renormalised over the
# k) and the next bias `(E,)`, moved by `±γ` by this step's load (all k choices count).

# %% solutions
def aux_free_step(probs, bias, k, rate):
    """probs (N, E), bias (E,) -> experts (N, k), gates (N, k), next bias (E,)."""
    # BEGIN SOLUTION
    expert = (probs + bias).topk(k, dim=-1).indices  # the bias chooses ...
    gate = probs.gather(1, expert)  # ... the unbiased probabilities weigh
    load = torch.bincount(expert.reshape(-1), minlength=probs.size(1)).float()  # (E,)
    return expert, gate / gate.sum(dim=-1, keepdim=True), bias + rate * torch.sign(load.mean() - load)
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch04 import check_aux_free_step

passed = check_aux_free_step(aux_free_step)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** The bias enters only `topk`'s input: it changes which experts are chosen, never
# the gates, so the gradient never sees it. A fixed step `γ` cannot overshoot wildly.
#
# **Wrong answers the check catches:** gates from the biased scores, gates not renormalised, the load
# of the unbiased choices, first choices only, the sign reversed, and a step proportional to the load.

# %% [markdown]
# With `bias_update_rate > 0` the package's router counts each expert's assignments over a step, and
# `train()` moves every bias after each optimizer step. Section 4's best MoE is balanced this way.
#
# **Shared experts** see *every* token, beside the routed ones. DeepSpeed-MoE's Residual-MoE
# (Rajbhandari et al. 2022) put one always-on MLP beside a top-1 expert; DeepSeekMoE (Dai et al.
# 2024) made it the rule, so the routed experts can specialise (`MoEConfig(n_shared_experts=1)`).
#
# **Fine-grained experts** (same paper): split each of `E` experts into `m` of width `1/m` and
# route each token to `m·k` of the `m·E`. Parameters and compute per token are unchanged; the number
# of expert *combinations* explodes, from C(16, 2) = 120 pairs to C(64, 8) ≈ 4.4·10⁹ sets. Halving
# top-2 experts' width without adding experts is *not* this: it keeps the number of choices.

# %% [markdown]
# ## 4 · Does an MoE beat dense? The experts sweep
# `benchmarks/moe_scaling.py` trains top-1 with 4 to 32 full-width experts and fine-grained top-k
# with and without a shared expert, each at the dense model's compute per token, 3 seeds each. An MoE
# is "better" or "worse" than dense only when the means differ by more than twice the seeds' combined
# sd, else "tie". Val losses are at capacity factor 2.0 (section 5 measures what that drops, on
# smaller models of the same kind). The cell reads the committed runs; `python
# benchmarks/moe_scaling.py` trains them (hours on a CPU).

# %%
from moe_tutorial import sweep
from moe_tutorial.seeds import verdict

rows = sweep.summary(sweep.load_runs())
print(sweep.format_table(rows))
sweep.plot_results(rows)
plt.show()

# %% [markdown]
# The best MoE is fine-grained with a shared expert, balanced by the bias: better than dense at the
# recipe's steps and at twice as many. A shared expert helps at 32 and at 64 experts. Top-1 with 32
# full-width experts is worse, plausibly because each expert sees about 24 of a step's 768 tokens.
# At equal wall time on a 2-core CPU the best MoE is not better: its mean is worse at both budgets,
# within the noise, as its steps cost more (`x dense`; compare within one budget, the phases ran in
# different sittings). A 0.8M-parameter model: findings need not carry.

# %%
at = {(r.comparison, r.budget, r.variant): r for r in rows}
BEST = "E=32 k=3 (C) + shared, aux-loss-free"
best = min((r for r in rows if r.comparison == "equal_steps" and r.budget == 1800 and r.variant != "dense"),
           key=lambda r: r.mean)
assert best.variant == BEST and best.verdict == "better" and at["equal_steps", 3600, BEST].verdict == "better"
assert at["equal_steps", 1800, "top-1 E=32"].verdict == "worse"
for e, with_shared, without in ((32, "E=32 k=3 (C) + shared", "E=32 k=4 (C)"),
                                (64, "E=64 k=7 (C/2) + shared", "E=64 k=8 (C/2)")):
    assert verdict(at["equal_steps", 1800, with_shared].losses, at["equal_steps", 1800, without].losses) == "lower"
timed_moe = [r for r in rows if r.comparison == "equal_time" and r.variant != "dense"]
assert timed_moe and all(r.verdict == "tie" and r.x_dense > 1.4 for r in timed_moe)

# %% [markdown]
# **Why does top-1 E=16 spread so widely over its seeds?** The benchmark's `routing` phase trains
# them again (same losses) and records each layer's busiest expert and drops, and the loss over time.

# %%
runs = sweep.load_runs()
print(sweep.routing_table(runs))
diagnosis = {r["seed"]: r for r in runs if r["comparison"] == "routing" and r["variant"] == "top-1 E=16"}
losses = {seed: r["val_loss"] for seed, r in diagnosis.items()}
worst, best_seed = max(losses, key=losses.get), min(losses, key=losses.get)
middle = (set(losses) - {worst, best_seed}).pop()
in_sweep = {r["seed"]: r["val_loss"] for r in runs if r["comparison"] == "equal_steps"
            and r["variant"] == "top-1 E=16" and r["steps"] == 1800}
assert all(abs(losses[seed] - in_sweep[seed]) < 1e-3 for seed in in_sweep)  # the same losses come out
assert all(max(r["max_share"]) < 2 / 16 for r in diagnosis.values())  # every seed ends balanced
assert diagnosis[middle]["dropped_pct"][0] < diagnosis[best_seed]["dropped_pct"][0]  # drops do not rank them
gap = [w - b for w, b in zip(diagnosis[worst]["loss_through_training"], diagnosis[best_seed]["loss_through_training"])]
assert gap[1] > 0.05 and gap[-1] > 0.2  # the worst seed is behind early, and stays behind

# %% [markdown]
# No seed collapses. The worst seed drops the most in the first two MoE layers, but drops do not
# separate the best two. The gap opens in the first half of training, while the routers settle, and
# stays. Sixteen
# full-width experts, each seeing about 48 of a step's tokens, make a model whose result depends
# strongly on its start. Here "tie" means three seeds cannot tell, not that the losses are equal.

# %% [markdown]
# ## 5 · Three routers, trained
# One model per router: top-1 over 8 full-width experts, top-2 over 8 half-width experts, and expert
# choice over 8 half-width experts, each taking `ceil(2N/8)` tokens (Zhou et al.'s capacity factor 2):
# the dense model's compute per token. One seed each, a third of the recipe: enough to look inside,
# not to rank them.

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
# **At which capacity was the loss measured?** Token choice trains at capacity factor 1.25,
# evaluates at 2.0 and generates dropless. Expert choice has no dropless form: it evaluates at its
# training factor, 1.0. The last column is the share of characters no expert processed (one
# validation batch, mean over MoE layers).

# %%
val_batches = fixed_batches(dataset.val, 20, 12, 64, seed=0)
print(f"{'router':<15}{'eval capacity factor':>22}{'val loss':>10}{'dropless':>10}{'characters dropped':>20}")
eval_gap, dropped_pct = {}, {}
for name, model in trained.items():
    at_eval = estimate_loss(model, val_batches, train_cfg)
    with torch.no_grad():
        routings = model.eval()(*val_batches[0], return_routing=True).routing
    dropped = dropped_pct[name] = 100 * sum(r.dropped.float().mean().item() for r in routings) / len(routings)
    free = "-"  # expert choice has no dropless form
    if name != "expert choice":
        with dropless(model):
            free = estimate_loss(model, val_batches, train_cfg)
        eval_gap[name], free = at_eval - free, f"{free:.4f}"
    loss = f"{at_eval:.4f}" + "*" * (name == "expert choice")  # *: sees later tokens, not comparable
    print(f"{name:<15}{model.config.moe.capacity_factor_eval:>22}{loss:>10}{free:>10}{dropped:>19.1f}%")
assert abs(eval_gap["top-1"]) < 0.01 and abs(eval_gap["top-2"]) < 0.01  # at cf 2.0, as good as dropless
assert dropped_pct["expert choice"] > 0  # some characters no expert picked

# %% [markdown]
# For token choice, capacity factor 2.0 is as good as dropless. Expert choice leaves some
# characters with no expert, by design; its loss (starred) saw later tokens and does not rank.
#
# ### What do the experts learn?
# For each frequent character, which expert of the top-1 model takes it (first and last MoE layer)?
# If routing ignored the character, a character's favourite expert would take about the busiest
# expert's share: that, not `1/E`, is the baseline when load is uneven.

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
print(f"{'layer':<7}{'favourite':>10}{'busiest':>9}{'U(char | expert)':>18}{'shuffled':>10}{'U(expert | char)':>18}")
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
    print(f"{i:<7}{favourite:>10.0%}{busiest:>9.0%}{tells:>18.0%}{baseline:>10.1%}{determined[-1]:>18.0%}")
    assert favourite > busiest + 0.2 and tells > 5 * baseline
fig.colorbar(image, ax=axes, label="share of the character's occurrences", shrink=0.8)
fig.suptitle("Top-1 model: where each frequent character goes")
plt.show()
assert determined[0] > determined[-1]  # layer 0 routes more by the character alone than the last layer

# %% [markdown]
# In both layers a character's favourite expert takes far more of it than the busiest expert's
# share, and the expert tells much about the character (shuffled: almost nothing). The last column:
# how much of the expert the character alone decides. In layer 0, most of it, close to **hash
# routing** (Roller et al. 2021), where a hash of the token id picks the expert (100%). Deeper layers
# see more context and route less by the character.
#
# ### The three routers in the explorer
# Notebook 03's explorer with the three models. Choose **show: every model** to see them route the
# same text side by side. (Live kernel only; the static view follows.)

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.viz import RoutingExplorer, plot_routing, route_text

sample = dataset.tokenizer.decode(dataset.val[:256])
explorer = RoutingExplorer(trained, dataset.tokenizer, sample, capacity_factor=1.0)
explorer

# %%
views = {}
print(f"{'router':<15}{'capacity':>9}{'processed':>10}   characters with 0, 1, 2, 3+ experts")
for name, model in trained.items():
    view = views[name] = route_text(model, dataset.tokenizer, sample, layer=0, capacity_factor=1.0)
    per_character = view.experts_per_character + [0, 0, 0]  # characters with 0, 1, 2, ... experts
    print(f"{name:<15}{view.capacity:>9}{sum(view.processed):>10}   {per_character[:3] + [sum(per_character[3:])]}")
assert len(views["top-1"].experts_per_character) == 2  # top-1: one expert or none
assert len(views["top-2"].experts_per_character) <= 3  # top-2: at most two
assert views["expert choice"].experts_per_character[1] > 0 and len(views["expert choice"].experts_per_character) > 3
for name, view in views.items():
    fig = plot_routing(view, max_lines=2)
    fig.suptitle(f"{name}, capacity factor 1.0", x=0.01, ha="left", fontweight="bold")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# Top-1 gives every character one expert or none. Top-2 gives most characters two. Expert choice
# gives some characters one expert and others three or more: each expert fills its slots with the
# characters that score it highest, whoever they are.
#
# ## Summary
# - Top-2: renormalised gates, capacity per assignment, first choices first (exercise 1); GShard may
#   skip a weak second choice. The package balances first choices; Mixtral's loss counts all k.
# - With capacity, top-1 drops depend on earlier tokens and sequences; top-2 and expert choice
#   (exercise 2) depend on later tokens too. Generation is dropless: nothing leaks there.
# - The aux-loss-free bias chooses and never weighs (exercise 3); shared experts see every token.
# - The sweep: fine-grained + shared + bias beats dense at equal steps, not at equal time on a CPU.
#
# **Where the finalized code lives:** `moe_tutorial/router.py` (every routing variant), `moe.py`
# (shared experts, `dropless`), `sweep.py`, `viz.py` (the explorer), `benchmarks/moe_scaling.py`.
#
# ## Further reading
# - Lepikhin et al. 2020, *GShard*: [arXiv:2006.16668](https://arxiv.org/abs/2006.16668).
# - Fedus et al. 2021, *Switch Transformers*: [arXiv:2101.03961](https://arxiv.org/abs/2101.03961).
# - Zhou et al. 2022, *Expert Choice Routing*: [arXiv:2202.09368](https://arxiv.org/abs/2202.09368).
# - Raposo et al. 2024, *Mixture-of-Depths*: [arXiv:2404.02258](https://arxiv.org/abs/2404.02258).
# - Jiang et al. 2024, *Mixtral of Experts*: [arXiv:2401.04088](https://arxiv.org/abs/2401.04088).
# - Roller et al. 2021, *Hash Layers*: [arXiv:2106.04426](https://arxiv.org/abs/2106.04426).
# - Rajbhandari et al. 2022, *DeepSpeed-MoE*: [arXiv:2201.05596](https://arxiv.org/abs/2201.05596).
# - Dai et al. 2024, *DeepSeekMoE*: [arXiv:2401.06066](https://arxiv.org/abs/2401.06066).
# - Wang et al. 2024, *Auxiliary-Loss-Free Load Balancing*: [arXiv:2408.15664](https://arxiv.org/abs/2408.15664);
#   DeepSeek-V3, §2.1.2: [arXiv:2412.19437](https://arxiv.org/abs/2412.19437).
# - `transformers`' `modeling_mixtral.py` (`load_balancing_loss_func`).
