# %% [markdown]
# # 08 · Inside a real MoE: what the routers do on text
#
# **What you will build.** Nothing new in the model: the package's `GPT` loads Mixtral, Qwen3-MoE
# and OLMoE checkpoints (`moe_tutorial.hf_models`: in fp32 its logits equal `transformers`' to 1e-5
# on small random checkpoints of each architecture; in bf16 they agree to bf16 rounding). This
# notebook opens such a model and looks at its routing with a handful of measurements
# (`moe_tutorial/analysis.py`), two of which you write.
#
# **What you will measure.** Expert load per layer against an even split; which kinds of tokens each
# expert takes, against an untrained router; how consistent routing is across layers and for the same
# token; what validation loss does when top-k is lowered at inference, or when the least-used
# experts are pruned.
#
# **Which model.** Set the environment variable `MOE_TUTORIAL_REAL_MOE` to a Hub repository or a local
# checkpoint folder, e.g. `allenai/OLMoE-1B-7B-0924` (OLMoE: 64 experts, 8 per token, 6.9 B parameters,
# 1.3 B active; its weights take 12.9 GiB in bfloat16, so it needs a machine with ≥ 16 GiB *free*,
# and `pip install -e ".[real]"` for its tokenizer) — the first run downloads it once (sha256-checked)
# and reads it shard by shard. It runs on a GPU if there is one; on a CPU expect a long wait (not
# timed here: every measurement below is a forward pass over the same few thousand tokens, a few
# dozen passes in all). Without it (and in CI) the notebook looks at the
# course's own modern MoE: notebook 07's block with 32 fine-grained experts, 4 per token, trained on
# Shakespeare. The cell below says which one you are looking at; the committed outputs are the
# offline ones. (The loaders are tested on small random Mixtral, Qwen3-MoE and OLMoE checkpoints that
# `transformers` writes, in both weight layouts; the machine that built this notebook had no network,
# so the real OLMoE weights have not been through this notebook yet.)
#
# **Objectives**
# 1. Load a real MoE and generate with it.
# 2. Measure expert load and specialisation, and read them against the right baselines.
# 3. Measure how routing depends on the token and on the layer.
# 4. Know what top-k and the number of experts buy at inference.
#
# Solutions: `solutions/08_real_moe_solutions.ipynb`.

# %% solutions
import os

import matplotlib.pyplot as plt
import torch

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## 1 · The model and its text

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.cached_models import COURSE_MOE_STEPS, pretrained_modern_moe
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.measure import peak_rss_mib
from moe_tutorial.pretrained import from_pretrained

REAL = os.environ.get("MOE_TUTORIAL_REAL_MOE")
DEVICE = "cuda" if REAL and torch.cuda.is_available() else "cpu"
dataset = shakespeare_dataset()
if REAL:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError('the tokenizer needs the tokenizers package: pip install -e ".[real]"') from None
    from moe_tutorial.hf_models import hub_cache

    model = from_pretrained(REAL, block_size=1024).to(DEVICE)  # bfloat16, read shard by shard
    hf_tokenizer = Tokenizer.from_file(os.path.join(REAL if os.path.isdir(REAL) else hub_cache(REAL), "tokenizer.json"))
    encode = lambda s: hf_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    decode = hf_tokenizer.decode
    print(f"looking at {REAL} on {DEVICE}; peak memory so far {peak_rss_mib() / 1024:.1f} GiB")
else:
    model = pretrained_modern_moe(dataset)
    encode, decode = dataset.tokenizer.encode, dataset.tokenizer.decode
    print(f"looking at the course's modern MoE (offline): notebook 07's block, {COURSE_MOE_STEPS} steps on "
          f"Shakespeare; set MOE_TUTORIAL_REAL_MOE to look at a real one")
model.eval()
moe = model.config.moe
total = sum(p.numel() for p in model.parameters())
print(f"{model.config.n_layer} layers, {len(model.moe_layers())} of them MoE, {moe.n_experts} experts each, "
      f"top-{moe.top_k}, weights {'renormalised' if moe.normalize_weights else 'as softmax probabilities'}; "
      f"{total / 1e6:.1f} M parameters")

# %%
# NBVAL_IGNORE_OUTPUT
prompt = torch.tensor([encode("ROMEO:\n")], device=DEVICE)
print(decode(model.generate(prompt, 120, temperature=0.8, generator=torch.Generator().manual_seed(0))[0].tolist()))

# %% [markdown]
# ## 2 · Routing held-out text
# One forward pass over text, and every MoE layer's routing of it: which experts each token chose
# (`Routing.expert`, (N, k)), with what weights. Nothing is dropped (`analysis.collect_routing` runs
# the model as generation does). The text is Shakespeare's validation split: held out for the course's
# model — but a web-scale model has almost certainly read Shakespeare in pretraining. A second set of
# windows from the training split chooses the experts to prune in section 7, so that the evaluation
# text does not choose them.

# %%
from moe_tutorial.analysis import collect_routing

BATCH, LENGTH = 32, min(model.config.block_size, 128)


def windows(split):
    """(BATCH, LENGTH) evenly spaced windows of a split of the text, in the model's tokens."""
    ids = dataset.split(split)
    if REAL:
        ids = torch.tensor(encode(dataset.tokenizer.decode(ids[:200_000].tolist())))
    starts = torch.arange(BATCH) * ((len(ids) - LENGTH) // BATCH)
    return torch.stack([ids[s:s + LENGTH] for s in starts]).to(DEVICE)


idx = windows("val")  # (B, T)
routings = collect_routing(model, idx)
token_ids = idx.reshape(-1)  # (N,), the order routing sees them in
print(f"{idx.numel():,} tokens routed through {len(routings)} MoE layers")

# %% [markdown] solutions
# ### ✍️ Exercise 1 — expert load
# From the chosen experts `expert` (N, k) — row n holds the k experts token n was sent to — return
# each expert's share of all N·k assignments, a vector of `n_experts` shares that sums to 1.

# %% solutions
def expert_load_share(expert, n_experts):
    """expert (N, k) -> (E,) share of all assignments per expert (sums to 1)."""
    # BEGIN SOLUTION
    counts = torch.bincount(expert.reshape(-1), minlength=n_experts).float()
    return counts / counts.sum()
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch08 import check_expert_load

passed = check_expert_load(expert_load_share)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `bincount` over all N·k entries counts every assignment, first choice or k-th;
# `minlength=n_experts` keeps a zero for an expert nobody chose instead of returning a shorter vector;
# dividing by the total, N·k, turns counts into shares that sum to 1.
#
# **Wrong answers the check catches:** counting first choices only (`expert[:, 0]`); returning counts
# instead of shares; dividing by N instead of N·k (the shares then sum to k); forgetting `minlength`
# (in the first case expert 4 is never chosen, so the result is one element short).

# %% [markdown]
# ## 3 · Load per layer
# An even split gives every expert `1/E` of the assignments. The balancing loss (or bias) pushes
# toward it during training — on the *training* batches. On held-out text, how close is it? Under
# expert parallelism (notebook 06) the device that holds a layer's busiest expert sets that layer's
# time, so the busiest column is the one to read.

# %%
from moe_tutorial.analysis import assignment_share, routing_entropy_bits

loads = torch.stack([assignment_share(r) for r in routings])  # (L, E)
E = loads.size(1)
fig, ax = plt.subplots(figsize=(10, 0.5 + 0.35 * len(routings)))
image = ax.imshow((loads * E).clamp(min=2**-3).log2(), aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3)
ax.set(xlabel="expert", ylabel="MoE layer", yticks=range(len(routings)),
       title="load ÷ even share, log2 (0 = even; red: busier, 1 = twice the even share)")
fig.colorbar(image, ax=ax)
fig.tight_layout()
even_bits = torch.log2(torch.tensor(float(E))).item()
print(f"{'layer':<7}{'busiest ÷ even':>15}{'idlest ÷ even':>15}{'entropy bits':>14}  (even: {even_bits:.2f} bits)")
for layer, load in enumerate(loads):
    print(f"{layer:<7}{load.max() * E:>15.2f}{load.min() * E:>15.2f}{routing_entropy_bits(load):>14.2f}")
assert torch.allclose(loads.sum(1), torch.ones(len(routings)))

# %% [markdown]
# ## 4 · Specialisation: which tokens each expert takes
# Label every token with a category — for characters: lower-case letter, upper-case letter, space,
# newline, punctuation; for a BPE vocabulary the same test on each token's first visible character
# (so mostly lower-case word / capitalised word / punctuation) — and ask how much a token's
# first-choice expert tells about its category: the mutual information between the two divided by the
# category's entropy (0: every expert sees the text's mix; 1: the expert determines the category).
# Two baselines: the same routing with the categories **shuffled** (what a finite sample scores with no
# relation at all), and **untrained routers** — each MoE layer's router re-initialised — reading the
# model's features (how much of the sorting the features alone would give a router that never learned).

# %%
from moe_tutorial.analysis import category_shares, random_routers, specialisation

CATEGORIES = ("lower", "upper", "space", "newline", "punctuation / digit")


def category_of(token_text: str) -> int:
    s = token_text.strip(" ") or token_text
    if token_text.startswith("\n") or s == "\n":
        return 3
    if token_text.isspace():
        return 2
    if s[:1].isalpha():
        return 1 if s[:1].isupper() else 0
    return 4


vocab_categories = torch.tensor([category_of(decode([i])) for i in range(model.config.vocab_size)])
categories = vocab_categories[token_ids.cpu()]  # (N,)
shuffled_categories = categories[torch.randperm(len(categories), generator=torch.Generator().manual_seed(0))]
with random_routers(model, seed=0):  # restored afterwards, even if interrupted
    untrained = [specialisation(r, categories) for r in collect_routing(model, idx)]
trained = [specialisation(r, categories) for r in routings]
shuffled = [specialisation(r, shuffled_categories) for r in routings]
print(f"{'layer':<7}{'specialisation':>15}{'categories shuffled':>21}{'untrained routers':>19}")
for layer, (a, b, c) in enumerate(zip(trained, shuffled, untrained)):
    print(f"{layer:<7}{a:>15.3f}{b:>21.3f}{c:>19.3f}")
if not REAL:  # the claims below, for the course's model (a real model's numbers are printed, not asserted)
    assert min(a - c for a, c in zip(trained, untrained)) > 0.1 and max(shuffled) < 0.05

# %%
shares = category_shares(routings[-1], categories, len(CATEGORIES))  # (E, K)
text_mix = torch.bincount(categories, minlength=len(CATEGORIES)).float() / len(categories)
ratio = (shares / text_mix.clamp(min=1e-9)).clamp(min=2**-3)  # (E, K); categories absent from the text: no NaN
order = ratio.argmax(1).argsort(stable=True)  # experts grouped by the category they take most above its share
fig, ax = plt.subplots(figsize=(10, 2.6))
image = ax.imshow(ratio[order].T.log2(), aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3)
ax.set(yticks=range(len(CATEGORIES)), yticklabels=CATEGORIES, xticks=range(E), xticklabels=order.tolist(),
       xlabel="expert (grouped by the category it takes most above the text's share)",
       title="last MoE layer: category share ÷ the text's share (log2; 0 = the text's mix)")
fig.colorbar(image, ax=ax)
fig.tight_layout()

# %% [markdown]
# The same routing, character by character, in notebook 03's explorer (the course's model only: it
# colours characters, and a BPE model routes tokens). It opens on **show: every layer**, to follow a
# character through the layers; click an expert's number under its bar to see what it takes. Each
# character has four experts here. Its colour is the first expert that processed it, and hovering
# lists all four with their weights (softmax probabilities, not renormalised: they need not sum to
# 1). The capacity factor starts at the evaluation capacity. (Live kernel only; a saved notebook
# shows the static view.)

# %%
# NBVAL_IGNORE_OUTPUT
if not REAL:
    from IPython.display import display

    from moe_tutorial.viz import RoutingExplorer

    explorer = RoutingExplorer(model, dataset.tokenizer, dataset.tokenizer.decode(dataset.val[:256].tolist()),
                               capacity_factor=moe.capacity_factor_eval)
    explorer.view.value = "every layer"
    display(explorer)

# %% [markdown]
# ## 5 · Consistency: the same token elsewhere, and across layers
# OLMoE's authors report vocabulary specialisation: many token ids are sent mostly to one expert.
# Measure it within each layer: the share of tokens whose first choice is the expert their token id
# goes to most often (1.0: routing is a function of the token id alone). Unrelated routing does not
# score 1/E: the busiest expert's share and ids seen once push it up, so the baseline is the same
# routing with the ids shuffled.

# %% [markdown] solutions
# ### ✍️ Exercise 2 — token consistency
# From `token_ids` (N,) and first-choice experts `expert` (N,), return the share of the N tokens whose
# expert is the one their token id is sent to most often (a float; 1.0 when routing is a function of
# the token id alone).

# %% solutions
def consistency_of(token_ids, expert):
    """Share of tokens routed to their token id's most common expert."""
    # BEGIN SOLUTION
    n_experts = int(expert.max()) + 1
    joint = torch.zeros(int(token_ids.max()) + 1, n_experts)
    joint.index_put_((token_ids, expert), torch.ones(len(token_ids)), accumulate=True)
    return (joint.max(dim=1).values.sum() / len(token_ids)).item()
    # END SOLUTION


# %% solutions
# NBVAL_CHECK_OUTPUT
from moe_tutorial.exercises.ch08 import check_token_consistency

passed = check_token_consistency(consistency_of)
assert passed  # solutions-only

# %% [markdown] solutions-only
# **Why it works.** `joint[t, e]` counts how often token id t went to expert e, so the maximum of row t
# is the number of t's occurrences that went to t's most common expert (when two experts tie, either
# one: the count is the same). Summing those maxima over the ids and dividing by N weighs every token
# once, so frequent ids count in proportion to how often they occur.
#
# **Wrong answers the check catches:** skipping an id whose occurrences tie between experts (4/7 on the
# check's 7 tokens); one most common expert for all tokens, ignoring the ids (3/7); the mean over ids of
# each id's share (0.75), which weighs a rare id like a frequent one; and any other value that differs
# from `analysis.token_consistency` on random routing.

# %%
from moe_tutorial.analysis import layer_agreement, token_consistency, uncertainty_coefficient

token_ids = token_ids.cpu()
permutation = torch.randperm(len(token_ids), generator=torch.Generator().manual_seed(0))
by_token = [token_consistency(token_ids, r.expert[:, 0].cpu()) for r in routings]
by_chance = [token_consistency(token_ids[permutation], r.expert[:, 0].cpu()) for r in routings]  # ids unrelated
print(f"{'layer':<7}{'token consistency':>18}{'ids shuffled':>14}")
for layer, (a, b) in enumerate(zip(by_token, by_chance)):
    print(f"{layer:<7}{a:>18.3f}{b:>14.3f}")
if not REAL:
    assert min(a - b for a, b in zip(by_token, by_chance)) > 0.05

# %% [markdown]
# Across layers, expert numbers mean nothing; ask instead whether tokens that share an expert in one
# layer share one in another: the uncertainty coefficient of one layer's first choices given
# another's (the same ratio as above, mutual information over entropy), against the same with the
# tokens of one layer shuffled.

# %%
agreement = layer_agreement(routings)  # (L, L)
fig, ax = plt.subplots(figsize=(4, 3.4))
image = ax.imshow(agreement, cmap="viridis", vmin=0, vmax=1)
ax.set(xlabel="layer", ylabel="layer", title="routing agreement between layers\n(uncertainty coefficient)")
fig.colorbar(image, ax=ax)
fig.tight_layout()
neighbours = torch.stack([agreement[i, i + 1] for i in range(len(routings) - 1)])
unrelated = [uncertainty_coefficient(routings[i].expert[permutation, 0].cpu(), routings[i + 1].expert[:, 0].cpu())
             for i in range(len(routings) - 1)]
print(f"agreement of neighbouring layers: {neighbours.mean():.3f} on average, "
      f"{sum(unrelated) / len(unrelated):.3f} with one layer's tokens shuffled (a layer with itself: 1)")

# %% [markdown]
# ## 6 · Fewer experts per token at inference
# Each token used top-k experts in training. Run the same weights with fewer: compute falls with k,
# quality falls too — by how much? (`analysis.top_k_override`; a model that renormalises its weights
# keeps doing so. The course's model does not, nor does OLMoE — the first cell prints which kind is
# loaded — so for them fewer experts also means a smaller total weight on the MoE's output: part of
# the loss change is that change of scale.)

# %%
# NBVAL_IGNORE_OUTPUT
from moe_tutorial.analysis import pruned_experts, top_k_override
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.moe import dropless
from moe_tutorial.presets import preset

eval_cfg = preset("char", model.config.vocab_size, device=DEVICE)[1]
if REAL:
    eval_batches = [(idx[i:i + 4, :-1], idx[i:i + 4, 1:]) for i in range(0, BATCH, 4)]
else:
    eval_batches = fixed_batches(dataset.val, 20, 16, model.config.block_size, seed=0)


def val_loss():
    with dropless(model):
        return estimate_loss(model, eval_batches, eval_cfg)


by_k = {}
for k in range(moe.top_k, 0, -1):
    with top_k_override(model, k):
        by_k[k] = val_loss()
    print(f"top-{k}: validation loss {by_k[k]:.4f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(list(by_k), list(by_k.values()), marker="o")
ax.set(xlabel="experts per token at inference", ylabel="validation loss", title=f"trained with top-{moe.top_k}",
       xticks=list(by_k))
fig.tight_layout()
if not REAL:
    assert by_k[1] > by_k[moe.top_k] + 0.02  # one expert per token is clearly worse than the trained k
print(f"top-{moe.top_k} → top-{moe.top_k // 2}: {by_k[moe.top_k // 2] - by_k[moe.top_k]:+.4f}; "
      f"→ top-1: {by_k[1] - by_k[moe.top_k]:+.4f}")

# %% [markdown]
# ## 7 · Pruning the least-used experts
# If some experts take little traffic, can they go? Remove, in every layer, the experts with the
# smallest load — measured on windows of the *training* split, not on the evaluation text — so that
# no token may choose them (a token that would have takes its next choice), and measure; beside it,
# the same number of experts removed at random, three random draws (mean ± sd). The last column says
# whether removing the least-used experts costs more or less than the random draws' mean by over 2 sd
# of the draws, or neither ("tie"). With weights that are softmax probabilities, not renormalised
# over the chosen experts (the course's model, OLMoE), a token that takes its next choice gets that
# expert's smaller probability as its weight: pruning also shrinks the MoE's output, as lowering k did.

# %%
# NBVAL_IGNORE_OUTPUT
from statistics import mean, stdev

RANDOM_DRAWS = 3


def versus_random(n_pruned):
    """'more' / 'less' when pruning the least-used experts costs more / less than the random draws'
    mean by over 2 sd of the draws, else 'tie'."""
    diff, sd = by_pruned[n_pruned] - mean(by_random[n_pruned]), stdev(by_random[n_pruned])
    return "tie" if abs(diff) <= 2 * sd else ("more" if diff > 0 else "less")


train_loads = torch.stack([assignment_share(r) for r in collect_routing(model, windows("train"))])  # (L, E)
generator = torch.Generator().manual_seed(0)
unpruned = val_loss()
print(f"{'pruned per layer':<18}{'eval traffic':>13}{'least used':>12}{'random (mean ± sd)':>21}  least used vs random")
print(f"{'0 of ' + str(E):<18}{0:>13.1%}{unpruned:>12.4f}")
by_pruned, by_random = {}, {}  # n_pruned -> loss; n_pruned -> [loss per random draw]
for n_pruned in (E // 8, E // 4, E // 2):
    least_used = [load.argsort()[:n_pruned].tolist() for load in train_loads]
    with pruned_experts(model, least_used):
        by_pruned[n_pruned] = val_loss()
    by_random[n_pruned] = []
    for _ in range(RANDOM_DRAWS):
        at_random = [torch.randperm(E, generator=generator)[:n_pruned].tolist() for _ in train_loads]
        with pruned_experts(model, at_random):
            by_random[n_pruned].append(val_loss())
    traffic = sum(load[experts].sum().item() for load, experts in zip(loads, least_used)) / len(loads)
    randoms = f"{mean(by_random[n_pruned]):.4f} ± {stdev(by_random[n_pruned]):.4f}"
    print(f"{f'{n_pruned} of {E}':<18}{traffic:>13.1%}{by_pruned[n_pruned]:>12.4f}{randoms:>21}  "
          f"{versus_random(n_pruned)}")
assert val_loss() == unpruned  # every pruning was undone

# %% [markdown]
# ## Summary

# %%
half = E // 2
print(f"looking at {REAL or f'the course modern MoE (offline, {total / 1e6:.1f} M parameters, characters)'}")
print(f"{'measure (mean over layers)':<44}{'this model':>11}{'baseline':>12}  baseline is")
for label, value, baseline, what in (
    ("busiest expert's load / even share", loads.max(1).values.mean() * E, 1.0, "even load"),
    ("specialisation by token kind (U)", mean(trained), mean(shuffled), "categories shuffled"),
    ("", mean(trained), mean(untrained), "untrained routers"),
    ("tokens sent to their id's usual expert", mean(by_token), mean(by_chance), "ids shuffled"),
    ("neighbouring layers' agreement (U)", neighbours.mean().item(), mean(unrelated), "tokens shuffled"),
    (f"val loss change, top-{moe.top_k} -> top-1", by_k[1] - by_k[moe.top_k], 0.0, "trained k"),
    (f"val loss change, {half} of {E} pruned", by_pruned[half] - unpruned, mean(by_random[half]) - unpruned,
     "pruned at random"),
):
    print(f"{label:<44}{value:>11.3f}{baseline:>12.3f}  {what}")
print("least used vs random pruning: " + ", ".join(f"{n} of {E}: {versus_random(n)}" for n in by_pruned))
if not REAL:
    assert loads.max(1).values.mean() * E > 2  # the busiest expert takes over twice the even share
    assert mean(trained) > 2 * mean(untrained) and mean(trained) > 5 * mean(shuffled)
    assert mean(by_token) > 3 * mean(by_chance) and neighbours.mean() > 2 * mean(unrelated)
    assert versus_random(E // 8) == versus_random(E // 4) == "more"
    assert all(by_k[k] > by_k[k + 1] for k in range(1, moe.top_k))  # each expert taken away costs loss

# %% [markdown]
# On the course's model:
# - **Load** is uneven: on average over layers the busiest expert takes over twice the even share.
# - **Specialisation**: the expert says much about the kind of token, far more than with the
#   categories shuffled or with untrained routers.
# - **Token consistency**: a token goes to its id's usual expert far more often than with the ids
#   shuffled, and neighbouring layers' choices agree well above chance.
# - **Fewer experts at inference** cost loss, more with each expert taken away.
# - **Pruning** the least-used experts costs more than pruning as many at random when an eighth or a
#   quarter of the experts go, although they carry little of the traffic.
#
# The code: `moe_tutorial/analysis.py` (measurements), `moe_tutorial/hf_models.py` (loaders).

# %% [markdown]
# ## Further reading
# Papers (arXiv), each with what to read it for:
# - Muennighoff et al. 2024, *OLMoE: Open Mixture-of-Experts Language Models*,
#   [arXiv:2409.02060](https://arxiv.org/abs/2409.02060), its routing analysis: router saturation, expert
#   co-activation, domain and vocabulary specialisation — the measurements this notebook makes small.
# - Jiang et al. 2024, *Mixtral of Experts*, [arXiv:2401.04088](https://arxiv.org/abs/2401.04088), §5 (routing
#   analysis): no obvious specialisation by domain, some by syntax, consecutive tokens often sharing experts.
# - DeepSeek-AI 2024, *DeepSeek-V3 Technical Report*, [arXiv:2412.19437](https://arxiv.org/abs/2412.19437), the
#   discussion of batch-wise against sequence-wise balance: how the balancing scope changes expert specialisation.
# - Lu et al. 2024, *Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large
#   Language Models*, [arXiv:2402.14800](https://arxiv.org/abs/2402.14800): pruning experts chosen by their effect
#   on the layer's output over calibration data, not by their load (compare section 7).
#
# Code the chapter follows:
# - transformers' [`olmoe/modeling_olmoe.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/olmoe/modeling_olmoe.py),
#   [`mixtral/modeling_mixtral.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py)
#   and [`qwen3_moe/modeling_qwen3_moe.py`](https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py):
#   the routers (softmax top-k, renormalised or not) and weight names that `moe_tutorial/hf_models.py` maps.
# - [allenai/OLMoE](https://github.com/allenai/OLMoE) (`scripts/run_routing_analysis.py`): how the OLMoE paper
#   collected expert counts per domain, per layer and per token id.
# - [Lucky-Lance/Expert_Sparsity](https://github.com/Lucky-Lance/Expert_Sparsity) (`method/expert_pruning.py`):
#   the pruning method of Lu et al., on Mixtral.
