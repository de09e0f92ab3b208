"""What a trained MoE's routers do on real text (notebook 08): load per layer, which kinds of tokens
each expert takes, how consistent routing is across layers, and what lowering top-k or pruning
experts at inference costs.

Everything works on any of the package's MoE models, whether trained by the course (notebook 07)
or loaded from a Mixtral / Qwen3-MoE / OLMoE checkpoint (`hf_models`). Routing is what the model's
forward pass returns (`return_routing=True`) in eval mode without token dropping, so it is the
routing generation would use.
"""

from contextlib import ExitStack, contextmanager

import torch

from .evaluate import evaluating
from .moe import dropless, override_routing
from .router import Routing


@torch.no_grad()
def collect_routing(model, idx: torch.Tensor) -> list[Routing]:
    """Each MoE layer's routing of the tokens idx (B, T), in eval mode, dropping nothing."""
    with evaluating(model), dropless(model):
        return model(idx, return_routing=True).routing


def assignment_share(routing: Routing) -> torch.Tensor:
    """(E,) share of all assignments (every token's k choices) that each expert receives: unlike
    Routing.first_choice_share it counts second choices too, and unlike tokens_processed it is
    read before capacity."""
    counts = torch.bincount(routing.expert.reshape(-1), minlength=routing.probs.size(1)).float()
    return counts / counts.sum()


def category_shares(routing: Routing, categories: torch.Tensor, n_categories: int) -> torch.Tensor:
    """(E, K): for each expert, the share of its assignments that are tokens of each category.
    categories (N,) in [0, K) labels every routed token (e.g. letter, space, punctuation)."""
    E, k = routing.probs.size(1), routing.expert.size(1)
    pairs = routing.expert * n_categories + categories[:, None].expand(-1, k)  # (N, k) joint index
    joint = torch.bincount(pairs.reshape(-1), minlength=E * n_categories).float().view(E, n_categories)
    return joint / joint.sum(dim=1, keepdim=True).clamp(min=1)


def specialisation(routing: Routing, categories: torch.Tensor) -> float:
    """How much a token's first-choice expert tells about its category: the mutual information
    I(expert; category) over the category's entropy, in [0, 1]. 0: every expert sees the text's
    mix of categories; 1: the expert determines the category. A finite sample scores above 0 even
    for unrelated labels (compare with shuffled categories)."""
    return uncertainty_coefficient(routing.expert[:, 0], categories)


def uncertainty_coefficient(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(a; b) / H(b) (Theil's U of b given a): the share of b's entropy that knowing a removes, for
    two labellings of the same tokens, from their joint counts. Not symmetric; the plug-in estimate is
    biased upwards by about (|a| - 1)(|b| - 1) / (2 N H(b)) for unrelated labels."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * nb + b, minlength=na * nb).double().view(na, nb)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nonzero = p > 0
    mutual = (p[nonzero] * (p[nonzero] / (pa @ pb)[nonzero]).log()).sum().item()
    entropy_b = -(pb[pb > 0] * pb[pb > 0].log()).sum().item()
    return mutual / entropy_b if entropy_b > 0 else 0.0


def context_specialisation(token_ids: torch.Tensor, expert: torch.Tensor, kinds: torch.Tensor) -> float:
    """How much the expert tells about the kind of text a token sits in once the token itself is known:
    I(expert; kind | token id) / H(kind | token id), in [0, 1]. A router that reads only the token id
    scores 0, however strongly it sorts tokens; above 0, the same token is routed by its context. Biased
    upwards on a finite sample, like uncertainty_coefficient: compare with kinds shuffled within each id."""
    mutual = entropy = 0.0
    n = len(token_ids)
    for token in token_ids.unique():
        here = token_ids == token
        a, b = expert[here], kinds[here]
        if b.unique().numel() < 2:
            continue  # one kind of context only: nothing to tell apart
        weight = here.sum().item() / n
        entropy_b = _entropy(torch.bincount(b).double())
        mutual += weight * uncertainty_coefficient(a, b) * entropy_b
        entropy += weight * entropy_b
    return mutual / entropy if entropy > 0 else 0.0


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def coactivation(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E, E) from the chosen experts (N, k): row i, column j is the share of the tokens that chose
    expert i that also chose expert j; the diagonal is 0 (OLMoE's co-activation, section 5 of its
    paper). Experts that fire together this often act as one wider expert; top-1 gives all zeros."""
    chosen = torch.zeros(expert.size(0), n_experts, device=expert.device).scatter_(1, expert, 1.0)  # (N, E) 0/1
    together = chosen.T @ chosen  # (E, E): tokens that chose both; the diagonal counts each expert's tokens
    return (together / together.diagonal().clamp(min=1)[:, None]).fill_diagonal_(0.0)


def layer_agreement(routings: list[Routing]) -> torch.Tensor:
    """(L, L): uncertainty coefficient between the first-choice experts of every pair of MoE layers
    (row: the layer predicted, column: the layer that predicts it). Expert numbers mean nothing across
    layers; this measures whether tokens that share an expert in one layer also share one in another."""
    firsts = [r.expert[:, 0] for r in routings]
    return torch.tensor([[uncertainty_coefficient(a, b) for a in firsts] for b in firsts])


def token_consistency(token_ids: torch.Tensor, expert: torch.Tensor) -> float:
    """The share of tokens routed (first choice) to the expert their token id goes to most often.
    1.0 when routing is a function of the token id alone; for routing unrelated to the id it is still
    well above 1/E (the busiest expert's share, plus rare ids counting as consistent): compare with
    the same routing and shuffled ids."""
    n_tokens, n_experts = int(token_ids.max()) + 1, int(expert.max()) + 1
    joint = torch.bincount(token_ids * n_experts + expert, minlength=n_tokens * n_experts).view(n_tokens, n_experts)
    return (joint.max(dim=1).values.sum() / joint.sum()).item()


def routing_entropy_bits(load: torch.Tensor) -> float:
    """Entropy of a load distribution in bits: log2(E) when every expert gets the same share."""
    nonzero = load[load > 0]
    return -(nonzero * nonzero.log2()).sum().item()


@contextmanager
def random_routers(model, seed: int = 0, std: float = 0.02):
    """Every MoE layer's router re-initialised (normal, std 0.02, as GPT initialises it) for a while,
    then the trained weights restored, even if interrupted: a router that never learned, reading the
    model's features."""
    layers = model.moe_layers()
    saved = [layer.router.gate.weight.detach().clone() for layer in layers]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.router.gate.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.router.gate.weight.copy_(weight)


def top_k_override(model, top_k: int):
    """Route every MoE layer with `top_k` experts per token (weights of the chosen experts as the
    router computes them: renormalised if the model renormalises), then as trained again."""
    for layer in model.moe_layers():
        if not 1 <= top_k <= layer.router.n_experts:
            raise ValueError(f"top_k must be in [1, {layer.router.n_experts}], got {top_k}")
    return override_routing(model, top_k=top_k)


@contextmanager
def pruned_experts(model, experts_by_layer: list, renormalise: bool = False):
    """Route without the given experts (one list per MoE layer): no token chooses them, and a token
    that would have moves on to its next choice. renormalise=False: the router is unchanged, so with
    unnormalised softmax weights the pruned experts' probability is lost; renormalise=True: the softmax
    runs over the remaining experts only, as in a checkpoint with the experts (and their router rows)
    deleted, so the remaining experts share that probability."""
    layers = model.moe_layers()
    if len(experts_by_layer) != len(layers):
        raise ValueError(f"give one list of experts per MoE layer ({len(layers)}), got {len(experts_by_layer)}")
    for layer, experts in zip(layers, experts_by_layer):
        if len(experts) > layer.router.n_experts - layer.router.top_k:
            raise ValueError(f"pruning {len(experts)} of {layer.router.n_experts} experts leaves fewer than "
                             f"top_k={layer.router.top_k}")
    with ExitStack() as stack:
        for layer, experts in zip(layers, experts_by_layer):
            stack.enter_context(override_routing([layer], excluded=tuple(int(e) for e in experts),
                                                 excluded_from_softmax=renormalise))
        yield
