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
# expert takes, against an untrained router and a router that reads only the token; whether the same
# token goes elsewhere in another kind of text; which experts fire together; what validation loss does
# when top-k is lowered at inference, or when experts are pruned, and why, in the course's model, the
# least-used ones are the wrong ones to prune.
#
# **Which model.** Set the environment variable `MOE_TUTORIAL_REAL_MOE` to a Hub repository or a local
# checkpoint folder, e.g. `allenai/OLMoE-1B-7B-0924` (OLMoE: 64 experts, 8 per token, 6.9 B parameters,
# 1.3 B active; its weights take 12.9 GiB in bfloat16, so it needs a machine with ≥ 16 GiB *free*,
# and `pip install -e ".[real]"` for its tokenizer) — the first run downloads it once (sha256-checked)
# and reads it shard by shard. It runs on a GPU if there is one. On a CPU expect a long wait: the
# measurements below take several hundred forward passes.
#
# Without it, and in CI, the notebook looks at the course's own MoE: notebook 07's block (RoPE,
# RMSNorm, SwiGLU) with 32 fine-grained experts, 4 per token, plain softmax routing with the balancing
# loss, no shared expert, trained on Shakespeare. The cell below says which one you are looking at.
# Every committed output, and every claim the text makes, is about that model. The loaders are tested
# on small random Mixtral, Qwen3-MoE and OLMoE checkpoints written by `transformers`, in both weight
# layouts; the real OLMoE weights have not been through this notebook.
#
# **Objectives**
# 1. Load a real MoE and generate with it.
# 2. Measure expert load and specialisation, and read them against the right baselines.
# 3. Measure how routing depends on the token, its context and the layer, and which experts work together.
# 4. Know what top-k and the number of experts buy at inference, and which experts can go.
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
# windows from the training split gives the usual-expert baseline of section 4 and chooses the experts
# to prune in section 8, so that the evaluation text does not choose them.

# %%
from moe_tutorial.analysis import collect_routing

BATCH, LENGTH = 32, min(model.config.block_size, 128)


def windows(split, n=BATCH):
    """(n, LENGTH) evenly spaced windows of a split of the text, in the model's tokens."""
    ids = dataset.split(split)
    if REAL:
        ids = torch.tensor(encode(dataset.tokenizer.decode(ids[:200_000].tolist())))
    starts = torch.arange(n) * ((len(ids) - LENGTH) // n)
    return torch.stack([ids[s:s + LENGTH] for s in starts]).to(DEVICE)


idx = windows("val")  # (B, T)
routings = collect_routing(model, idx)
token_ids = idx.reshape(-1).cpu()  # (N,), the order routing sees them in
train_idx = windows("train")
train_routings = collect_routing(model, train_idx)
print(f"{idx.numel():,} held-out tokens routed through {len(routings)} MoE layers "
      f"(and {train_idx.numel():,} training tokens)")

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
# time, so the busiest column is the one to read: with one expert per device, a layer whose busiest
# expert has twice the even share runs as long as it would with twice the tokens, evenly spread
# (notebook 06's straggler time). DeepSeek-V3 serves with extra copies of its busiest experts for
# this reason.

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
#
# Four baselines, from below and from above:
# - the same routing with the categories **shuffled**: what a finite sample scores with no relation at all;
# - **untrained routers** reading the model's features: how much sorting the features alone would give
#   a router that never learned (all routers are re-initialised at once, so later layers also see
#   features changed by the earlier random routing);
# - a **hash router** (Roller et al. 2021): each token id sent to one fixed, random expert. It never
#   learned anything, and never looks at the context;
# - the **token's usual expert**: each token id sent to the expert the trained router picks for it most
#   often on the training windows. It is the trained router with the context taken away.

# %%
from statistics import mean

from moe_tutorial.analysis import category_shares, random_routers, specialisation, uncertainty_coefficient

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

V = model.config.vocab_size
hash_expert = torch.randint(E, (V,), generator=torch.Generator().manual_seed(0))  # (V,) a fixed random expert per id
hashed = uncertainty_coefficient(hash_expert[token_ids], categories)  # one router for every layer


def usual_expert(token_ids, first_choice):
    """(V,) for each token id, the first-choice expert it gets most often (ids never seen: expert 0)."""
    counts = torch.zeros(V, E).index_put_((token_ids, first_choice), torch.ones(len(token_ids)), accumulate=True)
    return counts.argmax(dim=1)


usual = [uncertainty_coefficient(usual_expert(train_idx.reshape(-1).cpu(), r.expert[:, 0].cpu())[token_ids],
                                 categories) for r in train_routings]
print(f"{'layer':<7}{'trained':>9}{'categories shuffled':>21}{'untrained routers':>19}{'hash router':>13}"
      f"{'usual expert':>14}")
for layer, (a, b, c, d) in enumerate(zip(trained, shuffled, untrained, usual)):
    print(f"{layer:<7}{a:>9.3f}{b:>21.3f}{c:>19.3f}{hashed:>13.3f}{d:>14.3f}")
if not REAL:  # the claims below, for the course's model (a real model's numbers are printed, not asserted)
    assert min(a - c for a, c in zip(trained, untrained)) > 0.1 and max(shuffled) < 0.05
    assert hashed > mean(trained) + 0.05 and min(u - a for u, a in zip(usual, trained)) > 0.05

# %% [markdown]
# The trained routers sort by kind far above the two lower baselines. But the hash router, which
# learned nothing, sorts better than the trained routers do on average. With few token ids per expert
# (a character vocabulary), a random function of the id sorts them by kind for free: a high score is
# not evidence that a router learned anything. The token's usual expert scores above the trained
# router in every layer. The trained router differs from its usual expert only through the context
# (section 5 shows that this dependence is real); how much of the gap it explains is not measured here.

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
# character has k experts (the first cell prints k). Its colour is the first expert that processed it,
# and hovering lists all k with their weights (softmax probabilities, not renormalised: they need not
# sum to 1). The capacity factor starts at the evaluation capacity. (Live kernel only; a saved notebook
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
from moe_tutorial.analysis import layer_agreement, token_consistency

permutation = torch.randperm(len(token_ids), generator=torch.Generator().manual_seed(0))
by_token = [token_consistency(token_ids, r.expert[:, 0].cpu()) for r in routings]
by_chance = [token_consistency(token_ids[permutation], r.expert[:, 0].cpu()) for r in routings]  # ids unrelated
print(f"{'layer':<7}{'token consistency':>18}{'ids shuffled':>14}")
for layer, (a, b) in enumerate(zip(by_token, by_chance)):
    print(f"{layer:<7}{a:>18.3f}{b:>14.3f}")
if not REAL:
    assert min(a - b for a, b in zip(by_token, by_chance)) > 0.05

# %% [markdown]
# Consistency below 1 could mean that the router reads the context, or that it is noisy. Ask the
# question directly. Shakespeare's text has two kinds of line: a speaker's name (`ROMEO:`) and speech.
# Label each token with the kind of line it sits on, and measure how much the expert tells about the
# kind once the token is known: I(expert; kind | token) / H(kind | token)
# (`analysis.context_specialisation`). Any router that reads only the token scores 0, the hash router
# and the usual expert included. Capital letters occur in both kinds ("R" in `ROMEO:` and in "Romeo"),
# so for them the question has an answer. The baseline shuffles the kinds among each token's
# occurrences (five shuffles: their mean and the largest): what a finite sample scores when the
# context does not matter. That upward bias is large on a few thousand tokens, so read the gap.
#
# The nearest context is the token before. A capital on a name line usually follows a capital or a
# newline, one in speech a space. So the same measure is taken again with the pair (token before,
# token) in place of the token: what the expert tells about the kind of line beyond those two.

# %%
from moe_tutorial.analysis import context_specialisation


def line_kinds(window):
    """[T] 1 for each token on a speaker's-name line (a line that ends in ':'), else 0."""
    pieces = [decode([t]) for t in window.tolist()]
    is_name = [line.endswith(":") for line in "".join(pieces).split("\n")]  # one per line of the window
    kinds, line = [], 0
    for piece in pieces:
        kinds.append(int(is_name[line]))  # the line the token starts on; a newline ends its line
        line += piece.count("\n")
    return kinds


def shuffled_within_ids(ids, kinds, generator):
    """kinds permuted among the occurrences of each token id: each id keeps its mix of kinds."""
    out = kinds.clone()
    for token in ids.unique():
        where = (ids == token).nonzero().squeeze(1)
        out[where] = kinds[where[torch.randperm(len(where), generator=generator)]]
    return out


context_idx = windows("val", 128)
context_ids = context_idx.reshape(-1).cpu()
previous = torch.cat([torch.zeros_like(context_idx[:, :1]), context_idx[:, :-1]], dim=1).reshape(-1).cpu()
pair_ids = previous * model.config.vocab_size + context_ids  # (N,) one id per (token before, token)
kinds = torch.tensor([kind for window in context_idx for kind in line_kinds(window)])  # (N,)
generator = torch.Generator().manual_seed(0)
context = {}  # given -> [(score, shuffles' mean, shuffles' max) per layer]
for given, ids in (("the token", context_ids), ("the pair", pair_ids)):
    shuffles = [shuffled_within_ids(ids, kinds, generator) for _ in range(5)]
    context[given] = []
    for r in collect_routing(model, context_idx):
        first = r.expert[:, 0].cpu()
        chance = [context_specialisation(ids, first, k) for k in shuffles]
        context[given].append((context_specialisation(ids, first, kinds), mean(chance), max(chance)))
print(f"tokens on speakers' name lines: {kinds.float().mean():.1%} of {len(kinds):,}")
print(f"{'':<7}{'given the token':^31}{'given the token before and the token':^38}")
print(f"{'layer':<7}" + f"{'score':>9}{'shuffled: mean':>15}{'max':>7}" * 2)
for layer, (token, pair) in enumerate(zip(context["the token"], context["the pair"])):
    print(f"{layer:<7}" + "".join(f"{score:>9.3f}{chance:>15.3f}{top:>7.3f}" for score, chance, top in (token, pair)))
by_context = [score for score, _, _ in context["the token"]]
context_chance = [chance for _, chance, _ in context["the token"]]
if not REAL:
    assert all(score > top + 0.02 for score, _, top in context["the token"])
    for (score, chance, _), (pair_score, pair_chance, _) in zip(context["the token"], context["the pair"]):
        assert pair_score - pair_chance < (score - chance) / 2  # most of the signal goes with the token before

# %% [markdown]
# Given the token, the expert tells about the kind of line more than any shuffle does, in every layer,
# the first one included: attention runs before the first MoE layer, so even its router sees the
# characters before the token. Given the token before as well, most of that is gone, and what is left
# is near the shuffles' range (a pair occurs far fewer times than a token, so this test has little
# power). Most of what the routers know of the context here, they know from the character before.
#
# Across layers, expert numbers mean nothing; ask instead whether tokens that share an expert in one
# layer share one in another: the uncertainty coefficient of one layer's first choices given
# another's (the same ratio as above, mutual information over entropy), against the same with the
# tokens of one layer shuffled.

# %%
agreement = layer_agreement(routings)  # (L, L)
fig, ax = plt.subplots(figsize=(4, 3.4))
image = ax.imshow(agreement, cmap="viridis", vmin=0, vmax=1)
ax.set(xlabel="layer (predicts)", ylabel="layer (predicted)", xticks=range(len(routings)),
       yticks=range(len(routings)), title="routing agreement between layers\n(uncertainty coefficient)")
fig.colorbar(image, ax=ax)
fig.tight_layout()
neighbours = torch.stack([agreement[i, i + 1] for i in range(len(routings) - 1)])
unrelated = [uncertainty_coefficient(routings[i + 1].expert[permutation, 0].cpu(), routings[i].expert[:, 0].cpu())
             for i in range(len(routings) - 1)]  # as agreement[i, i + 1]: layer i predicted by layer i + 1
print(f"agreement of neighbouring layers: {neighbours.mean():.3f} on average, "
      f"{sum(unrelated) / len(unrelated):.3f} with one layer's tokens shuffled (a layer with itself: 1)")

# %% [markdown]
# ## 6 · Which experts fire together
# With k experts per token, every token picks a team. OLMoE's authors measure co-activation: of
# the tokens that chose expert i, the share that also chose expert j (`analysis.coactivation`). A pair
# that fires together far more often than chance acts as one wider expert for those tokens: a
# candidate for merging, and, under expert parallelism (notebook 06), for the same device, so that a
# token's rows travel to fewer places. The baseline shuffles all N·k choices across tokens, which keeps
# how often each expert is chosen (up to the few tokens that draw the same expert twice) and breaks
# the teams.

# %%
from moe_tutorial.analysis import coactivation

generator = torch.Generator().manual_seed(0)
together, together_chance = [], []
for r in routings:
    choices = r.expert.cpu()
    shuffled_choices = choices.reshape(-1)[torch.randperm(choices.numel(), generator=generator)].view_as(choices)
    together.append(coactivation(choices, E))
    together_chance.append(coactivation(shuffled_choices, E))
print(f"{'layer':<7}{'strongest pair':>15}{'shuffled':>10}{'pairs over 1/2':>16}{'shuffled':>10}")
for layer, (a, b) in enumerate(zip(together, together_chance)):
    print(f"{layer:<7}{a.max():>15.2f}{b.max():>10.2f}{int((a > 0.5).sum()):>16}{int((b > 0.5).sum()):>10}")
strongest = max(range(len(together)), key=lambda layer: together[layer].max())
fig, ax = plt.subplots(figsize=(5.2, 4.4))
image = ax.imshow(together[strongest], cmap="magma", vmin=0, vmax=1)
ax.set(xlabel="expert j", ylabel="expert i",
       title=f"layer {strongest}: share of expert i's tokens\nthat also chose expert j")
fig.colorbar(image, ax=ax)
fig.tight_layout()
if not REAL:
    assert all(a.max() > 1.5 * b.max() for a, b in zip(together, together_chance))

# %% [markdown]
# In every layer a few pairs fire together far more often than shuffled choices allow; most pairs do
# not. A row of the plot with one bright cell is an expert that rarely works without one partner.

# %% [markdown]
# ## 7 · Fewer experts per token at inference
# Each token used top-k experts in training. Run the same weights with fewer: compute falls with k,
# quality falls too — by how much? (`analysis.top_k_override`; a model that renormalises its weights
# keeps doing so. The course's model does not, nor does OLMoE — the first cell prints which kind is
# loaded — so for them fewer experts also means a smaller total weight on the MoE's output, and part of
# the loss change may come from that change of scale.)

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
# ## 8 · Which experts can go
# If some experts take little traffic, can they go? Remove experts in every layer so that no token may
# choose them (a token that would have takes its next choice), and measure. Four ways of choosing
# them, the first three read on the *training* windows so that the evaluation text does not choose:
# - the **least used**: the smallest share of all k choices (the load of section 3);
# - the **least weight**: the smallest sum of the weights tokens give the expert when they choose it, a
#   soft count after SEER-MoE (Muzio et al. 2024), in which a weak fourth choice counts for less than a
#   first;
# - the **rarely first**: the smallest share of first choices;
# - **at random**: twenty draws.
#
# Random draws vary widely and unevenly: a few cost far more than the rest (the range is printed), so
# their mean and sd describe them badly. Each criterion is placed among them
# instead: the verdict is "more" or "less" when it costs more, or less, than at least 19 of the 20
# draws, else "within" the random draws. Every loss is evaluated dropless, as generation
# runs. The router is left as trained. With weights that are softmax probabilities, not renormalised
# over the chosen experts (the course's model, OLMoE), a token that takes its next choice gets that
# expert's smaller probability as its weight, so pruning also shrinks the MoE's output, as lowering k
# did. The end of the section measures that part.

# %%
# NBVAL_IGNORE_OUTPUT
from statistics import median

RANDOM_DRAWS = 20
CRITERIA = ("least used", "least weight", "rarely first")


def draws_below(loss, random_losses):
    """How many random draws cost less than `loss`."""
    return sum(r < loss for r in random_losses)


def versus_random(loss, random_losses):
    """'more' / 'less' when `loss` is above / below at least 19 in 20 of the random draws, else 'within'."""
    below = draws_below(loss, random_losses) / len(random_losses)
    return "more" if below >= 0.95 else "less" if below <= 0.05 else "within"


def first_choice_share(routing):
    """(E,) share of the tokens whose first choice is each expert."""
    return torch.bincount(routing.expert[:, 0], minlength=E).float() / len(routing.expert)


def weight_share(routing):
    """(E,) each expert's sum of the weights tokens give it, as a share of all weights."""
    total = torch.zeros(E, device=routing.weights.device).index_add_(0, routing.expert.reshape(-1),
                                                                     routing.weights.reshape(-1).float())
    return total / total.sum()


scores = {"least used": [assignment_share(r) for r in train_routings],
          "least weight": [weight_share(r) for r in train_routings],
          "rarely first": [first_choice_share(r) for r in train_routings]}  # criterion -> (E,) per layer
SIZES = (E // 8, E // 4, E // 2)
generator = torch.Generator().manual_seed(0)
pruned_sets = {}  # (criterion, n) -> experts pruned in each layer
for n in SIZES:
    for name in CRITERIA:
        pruned_sets[name, n] = [score.argsort()[:n].tolist() for score in scores[name]]
    for draw in range(RANDOM_DRAWS):
        pruned_sets[f"random {draw}", n] = [torch.randperm(E, generator=generator)[:n].tolist()
                                            for _ in routings]


def losses_when_pruned(renormalise):
    """(criterion or random draw, n) -> validation loss with those experts pruned."""
    out = {}
    for key, experts in pruned_sets.items():
        with pruned_experts(model, experts, renormalise=renormalise):
            out[key] = val_loss()
    return out


def pruning_table(by_pruned):
    print(f"{'pruned per layer':<18}{'criterion':<15}{'val loss':>24}{'random draws below it':>23}  vs random")
    for n in SIZES:
        randoms = sorted(by_pruned[f"random {d}", n] for d in range(RANDOM_DRAWS))
        for name in CRITERIA:
            loss = by_pruned[name, n]
            print(f"{f'{n} of {E}':<18}{name:<15}{loss:>24.4f}{f'{draws_below(loss, randoms)} of {RANDOM_DRAWS}':>23}"
                  f"  {versus_random(loss, randoms)}")
        spread = f"median {median(randoms):.4f} ({randoms[0]:.3f}–{randoms[-1]:.3f})"
        print(f"{'':<18}{'random':<15}{spread:>24}")


unpruned = val_loss()
by_pruned = losses_when_pruned(renormalise=False)
by_random = {n: [by_pruned[f"random {d}", n] for d in range(RANDOM_DRAWS)] for n in SIZES}
print(f"validation loss, nothing pruned: {unpruned:.4f}")
pruning_table(by_pruned)
assert val_loss() == unpruned  # every pruning was undone


def check_pruning(losses, randoms):
    """The claims below, for the course's model: at an eighth and a quarter of the experts, the least-used
    cost more than most random draws, the rarely-first less than nearly all, the soft count in between."""
    for n in (E // 8, E // 4):
        assert draws_below(losses["least used", n], randoms[n]) >= 0.75 * RANDOM_DRAWS
        assert draws_below(losses["rarely first", n], randoms[n]) <= 0.1 * RANDOM_DRAWS
        assert losses["rarely first", n] < losses["least weight", n] < losses["least used", n]
    assert draws_below(losses["least weight", E // 8], randoms[E // 8]) >= 0.75 * RANDOM_DRAWS
    assert all(versus_random(losses[name, E // 2], randoms[E // 2]) == "within" for name in CRITERIA)


if not REAL:
    check_pruning(by_pruned, by_random)

# %% [markdown]
# Read the column of random draws below each criterion. When an eighth or a quarter of the experts go,
# the least-used experts cost more than most random draws, though they carry the least traffic. The
# soft count costs less than load, yet at an eighth still more than most random draws; the
# rarely-first experts cost less than nearly every random draw. When half go, every criterion falls
# within the random draws. Load counts a token's fourth choice like its
# first, and it hides what the experts with the smallest load are. Measure, on the
# evaluation tokens, for the experts each criterion prunes (an eighth of them): what share of their
# assignments are first choices (1/k for an average expert), the weight they get when chosen, how many
# tokens used one of them in some layer, and how much the loss rises on those tokens when they go.

# %%
import torch.nn.functional as F


@torch.no_grad()
def token_losses():
    """(N,) the loss of every evaluation token, dropless."""
    with dropless(model):
        return torch.cat([F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none")
                          for x, y in eval_batches])


batch_routings = [collect_routing(model, x) for x, _ in eval_batches]  # [batch][layer]
chosen = [torch.cat([b[layer].expert for b in batch_routings]).cpu() for layer in range(len(routings))]  # (N, k) each
gates = [torch.cat([b[layer].weights for b in batch_routings]).cpu() for layer in range(len(routings))]  # (N, k) each
unpruned_losses = token_losses()  # (N,)


def what_pruning_takes(experts_by_layer):
    """For experts pruned in each layer: their share of first choices among their assignments, their mean
    weight when chosen, the share of tokens that used one in some layer, and the loss rise on those
    tokens and on the others when they are pruned."""
    used = torch.zeros(len(unpruned_losses), dtype=torch.bool)
    firsts, weights = [], []
    for layer, experts in enumerate(experts_by_layer):
        hit = torch.isin(chosen[layer], torch.tensor(experts))  # (N, k)
        used |= hit.any(dim=1)
        firsts.append((hit[:, 0].sum() / hit.sum()).item())
        weights.append(gates[layer][hit].mean().item())
    with pruned_experts(model, experts_by_layer):
        rise = token_losses() - unpruned_losses
    return mean(firsts), mean(weights), used.float().mean().item(), rise[used].mean().item(), rise[~used].mean().item()


eighth = E // 8
taken = {name: what_pruning_takes(pruned_sets[name, eighth]) for name in CRITERIA}
taken["random"] = [mean(column) for column in zip(*(what_pruning_takes(pruned_sets[f"random {d}", eighth])
                                                    for d in range(RANDOM_DRAWS)))]
print(f"{eighth} of {E} experts pruned per layer; an average expert's share of first choices: "
      f"1/{moe.top_k} = {1 / moe.top_k:.2f}")
print(f"{'pruned':<14}{'first choices':>14}{'weight when chosen':>20}{'tokens that used one':>22}"
      f"{'loss rise on them':>19}{'on the others':>15}")
for name, (first, weight, used, rise_used, rise_others) in taken.items():
    print(f"{name:<14}{first:>14.2f}{weight:>20.3f}{used:>22.1%}{rise_used:>+19.3f}{rise_others:>+15.3f}")
if not REAL:
    assert taken["least used"][0] > 1 / moe.top_k + 0.1 and taken["rarely first"][0] < 1 / moe.top_k - 0.05
    assert taken["least used"][1] > taken["random"][1] > taken["rarely first"][1]
    assert taken["least used"][2] < taken["random"][2] - 0.2  # fewer tokens use them
    assert taken["least used"][3] > 2 * taken["random"][3] > 2 * taken["rarely first"][3]
    assert all(rise_others > 0 for *_, rise_others in taken.values())  # through attention

# %% [markdown]
# The least-used experts are specialists. Fewer tokens use them than use random experts, but a large
# share of their assignments are first choices, far above 1/k, and they get a larger weight than an
# average expert. The tokens that used one lose more than twice as much as the tokens that lose a
# random expert. The rarely-first experts are the opposite: about as many tokens use them as use random
# experts, mostly behind a better choice and with a small weight, and each loses little. Tokens that
# used no pruned expert lose a little too, through attention: the tokens before them changed. Load
# measures how often an expert is chosen; what pruning costs depends on how much the tokens that
# choose it rely on it. Lu et al. (2024) choose the experts to prune by their effect on the layer's
# output over calibration text instead.
#
# Part of the cost could be the lost probability. Prune again with `renormalise=True`: the softmax
# runs over the experts that remain, as in a checkpoint with the pruned experts and their router rows
# deleted. The remaining experts' probabilities grow to fill the pruned ones' share, so a token that
# lost a chosen expert gets weight back (and a token that lost none gets slightly larger weights than
# in training).

# %%
# NBVAL_IGNORE_OUTPUT
renormalised = losses_when_pruned(renormalise=True)
renormalised_random = {n: [renormalised[f"random {d}", n] for d in range(RANDOM_DRAWS)] for n in SIZES}
pruning_table(renormalised)
if not REAL:
    assert all(renormalised[name, n] < by_pruned[name, n] for name in CRITERIA for n in SIZES)
    check_pruning(renormalised, renormalised_random)

# %% [markdown]
# Renormalising lowers each criterion's loss a little and leaves the order as it was: the lost
# probability is not why the least-used experts cost most.
# For a model that renormalises over its chosen experts anyway (Mixtral, Qwen3-MoE) the two tables
# are the same.

# %% [markdown]
# ## Summary

# %%
print(f"looking at {REAL or f'the course modern MoE (offline, {total / 1e6:.1f} M parameters, characters)'}")
print(f"{'measure (mean over layers)':<44}{'this model':>11}{'baseline':>12}  baseline is")
for label, value, baseline, what in (
    ("busiest expert's load / even share", loads.max(1).values.mean() * E, 1.0, "even load"),
    ("specialisation by token kind (U)", mean(trained), mean(shuffled), "categories shuffled"),
    ("", mean(trained), mean(untrained), "untrained routers"),
    ("", mean(trained), hashed, "hash router"),
    ("tokens sent to their id's usual expert", mean(by_token), mean(by_chance), "ids shuffled"),
    ("kind of line, given the token (U)", mean(by_context), mean(context_chance), "kinds shuffled within ids"),
    ("neighbouring layers' agreement (U)", neighbours.mean().item(), mean(unrelated), "tokens shuffled"),
    ("strongest co-activated pair", mean(t.max().item() for t in together),
     mean(t.max().item() for t in together_chance), "choices shuffled"),
    (f"val loss change, top-{moe.top_k} -> top-1", by_k[1] - by_k[moe.top_k], 0.0, "trained k"),
    (f"val loss change, least used {eighth} of {E} pruned", by_pruned["least used", eighth] - unpruned,
     median(by_random[eighth]) - unpruned, "median random draw"),
    (f"val loss change, rarely first {eighth} of {E} pruned", by_pruned["rarely first", eighth] - unpruned,
     median(by_random[eighth]) - unpruned, "median random draw"),
):
    print(f"{label:<44}{value:>11.3f}{baseline:>12.3f}  {what}")
for name in CRITERIA:
    print(f"{name} vs random pruning: " + ", ".join(f"{n} of {E}: {versus_random(by_pruned[name, n], by_random[n])}"
                                                   for n in SIZES))
if not REAL:
    assert loads.max(1).values.mean() * E > 2  # the busiest expert takes over twice the even share
    assert mean(trained) > 2 * mean(untrained) and mean(trained) > 5 * mean(shuffled) and hashed > mean(trained)
    assert mean(by_token) > 3 * mean(by_chance) and neighbours.mean() > 2 * mean(unrelated)
    assert all(by_k[k] > by_k[k + 1] for k in range(1, moe.top_k))  # each expert taken away costs loss

# %% [markdown]
# On the course's model:
# - **Load** is uneven: on average over layers the busiest expert takes over twice the even share, and
#   under expert parallelism that expert's device sets the layer's time.
# - **Specialisation by kind of token** is far above the categories shuffled and untrained routers, and
#   below a hash router's: with few ids per expert, sorting by kind is free.
# - **Context**: the same token goes to another expert on a speaker's-name line than in speech, more
#   than chance, in every layer; most of that goes with the character before it. A token goes to its
#   id's usual expert far more often than with the ids shuffled, and neighbouring layers' choices agree
#   well above chance.
# - **Teams**: a few pairs of experts fire together far more often than shuffled choices allow.
# - **Fewer experts at inference** cost loss, more with each expert taken away.
# - **Pruning** the least-used experts costs more than most random draws when an eighth or a quarter of
#   the experts go: fewer tokens use them than use random experts, but often as their first choice.
#   Counting weights instead of choices costs less, yet at an eighth still more than most random draws;
#   pruning the experts that are rarely a first choice costs less than nearly every random draw.
#   Renormalising the router over the remaining experts helps a little and keeps the order.
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
#   on the layer's output over calibration data, not by their load (compare section 8).
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
