"""The router: which expert(s) each token goes to, with what weight, and what it costs
(notebook 03; the variants below: notebook 04).

Token-choice routing (Switch top-1, GShard/Mixtral top-k): each token picks its k highest-
scoring experts. Every expert has a fixed capacity, ceil(capacity_factor * k * N / E) slots
for N tokens; assignments beyond it are dropped, in priority order (all first choices before any
second choice, earlier tokens before later ones). A dropped assignment contributes nothing:
the residual connection carries the token past the layer.

Variants (notebook 04): noisy top-k gating (Shazeer et al. 2017: learned softplus noise on
the logits, training only), GShard's random routing of the second expert, auxiliary-loss-free
balancing (DeepSeek-V3: a per-expert bias added to the scores for *selecting* experts only,
nudged toward even load after every step), and expert choice (Zhou et al. 2022: each expert
picks its top-C tokens). Expert choice looks at the whole batch at once, so in a causal
language model a token's routing depends on later tokens: it leaks the future and cannot
route one token at a time during generation.

Modern routers (notebook 07), all options of MoEConfig: sigmoid affinity scoring with normalised
top-k weights and a routed scaling factor (DeepSeek-V3), where the aux-loss-free bias replaces most
of the balancing loss and a small sequence-wise loss remains; weights left unnormalised (OLMoE;
Qwen3-MoE per its norm_topk_prob, true in the released checkpoints); group-limited routing
(DeepSeek-V2/V3: experts live in groups, one per node in V3, and a token may use only its best
`topk_group` groups, which bounds how many nodes its hidden state is sent to); a warm-up ramp of the
balancing losses; and bounds on expert capacity.
"""

from dataclasses import dataclass, replace
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig


@dataclass
class Routing:
    """One layer's routing of N tokens; tensors indexed by token (and choice, for top-k)."""

    logits: torch.Tensor  # (N, E) fp32 router logits
    probs: torch.Tensor  # (N, E) affinities: softmax over all experts, or sigmoid per expert
    expert: torch.Tensor  # (N, k) chosen experts, best first
    weights: torch.Tensor  # (N, k) weight of each chosen expert's output in the sum (differentiable)
    kept: torch.Tensor  # (N, k) bool: the assignment fits in its expert's capacity
    position: torch.Tensor  # (N, k) arrival order of the assignment at its expert (its slot if kept)
    capacity: int  # slots per expert
    aux_loss: torch.Tensor  # load-balancing loss, already scaled by its coefficient
    z_loss: torch.Tensor  # router z-loss, already scaled by its coefficient
    expert_choice: bool = False  # columns are experts (k = E), not a token's ranked choices
    seq_aux_loss: torch.Tensor | None = None  # DeepSeek-V3's sequence-wise balance loss, scaled; None: off

    # Three different "loads", named apart: what the router asked for (first_choice_share), what
    # each expert actually computed (tokens_processed), and every choice (analysis.assignment_share).

    @property
    def dropped(self) -> torch.Tensor:
        """(N,) bool: no expert processes the token; it skips the layer on the residual."""
        return ~self.kept.any(dim=1)

    def last_positions(self, batch_size: int) -> "Routing":
        """The routing of the last token of each of `batch_size` sequences (tokens are numbered
        row by row, N = batch_size * T): what generation reads after each step."""
        rows = torch.arange(1, batch_size + 1, device=self.expert.device) * (self.expert.size(0) // batch_size) - 1
        return replace(self, logits=self.logits[rows], probs=self.probs[rows], expert=self.expert[rows],
                       weights=self.weights[rows], kept=self.kept[rows], position=self.position[rows])

    @property
    def first_choice_share(self) -> torch.Tensor:
        """(E,) fraction of tokens whose first choice is each expert: the router's demand,
        before capacity cuts it (f_i of the load-balancing loss). For expert choice, the
        share of processed assignments."""
        if self.expert_choice:
            return self.tokens_processed.float() / self.tokens_processed.sum().clamp(min=1)
        return torch.bincount(self.expert[:, 0], minlength=self.probs.size(1)).float() / self.expert.size(0)

    @property
    def tokens_processed(self) -> torch.Tensor:
        """(E,) tokens each expert processes: its kept assignments, after capacity."""
        return torch.bincount(self.expert[self.kept], minlength=self.probs.size(1))


def capacity(n_tokens: int, n_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """Slots per expert: ceil(capacity_factor * top_k * tokens / experts), computed exactly.

    In floating point 1.1 * 50 is 55.000000000000007 and its ceiling 56: one slot too many.
    The factor is read as the decimal the user wrote (Fraction("1.1") = 11/10) and the
    ceiling taken in integers.
    """
    factor = Fraction(str(capacity_factor))
    slots = factor * top_k * n_tokens / n_experts
    return -(-slots.numerator // slots.denominator)  # ceil for a non-negative fraction


def positions_in_expert(expert: torch.Tensor, n_experts: int, active=None) -> torch.Tensor:
    """For assignments (N, k), each one's arrival order at its expert, first choices first.

    Priority: choice rank, then token order. Flattening choice-major gives exactly that order;
    a cumulative count per expert then numbers the arrivals 0, 1, 2, ... Assignments where
    `active` (N, k) is False take no slot.
    """
    N, k = expert.shape
    flat = expert.t().reshape(-1)  # (k*N,) all first choices, then all second choices
    one_hot = F.one_hot(flat, n_experts)  # (k*N, E)
    if active is not None:
        one_hot = one_hot * active.t().reshape(-1, 1)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, flat[:, None]).squeeze(1)  # (k*N,)
    return position.view(k, N).t()  # (N, k)


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's E * sum_i f_i * P_i (without the coefficient alpha).

    f_i: fraction of tokens whose top choice is expert i (a count: no gradient).
    P_i: mean router probability of expert i over all tokens (differentiable).
    It is 1 when both are uniform and E when every token picks one expert with probability 1.
    Its value alone does not diagnose balance (f = (1, 0, ...) with uniform P also gives 1, and
    f = (.6, .4), P = (.3, .7) gives 0.92): what balances is its gradient, which lowers P_i most
    for the experts that receive the most tokens. Watch f itself to see the load.
    """
    n_experts = probs.size(1)
    f = torch.bincount(top1, minlength=n_experts).float() / top1.numel()  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * P)


def sequence_balance_loss(affinity: torch.Tensor, expert: torch.Tensor, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without its coefficient alpha).

    For each sequence of T tokens: f_i = E / (k T) * (number of its tokens that chose expert i),
    P_i = mean over its tokens of the affinity normalised over all experts, s_i / sum_j s_j; the
    loss is sum_i f_i P_i, averaged over sequences. Balancing each sequence, not only the batch,
    keeps one long document from piling onto a few experts.
    affinity (N, E) with N = B * seq_len tokens in sequence order, expert (N, k) the choices.
    """
    N, E = affinity.shape
    k = expert.size(1)
    B = N // seq_len
    counts = torch.zeros(B, E, device=affinity.device).scatter_add_(
        1, expert.reshape(B, seq_len * k), torch.ones(B, seq_len * k, device=affinity.device))  # (B, E)
    f = counts * E / (k * seq_len)
    normalised = affinity / affinity.sum(dim=-1, keepdim=True)
    P = normalised.view(B, seq_len, E).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=1).mean()


def limit_to_groups(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Group-limited routing: scores (N, E) with every expert outside a token's `topk_group` best
    groups set to -inf. A group's score is the sum of its two best experts' scores (DeepSeek-V3;
    its best one if groups hold a single expert)."""
    N, E = scores.shape
    grouped = scores.view(N, n_group, E // n_group)  # (N, G, E/G)
    group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # (N, G)
    best_groups = group_score.topk(topk_group, dim=-1).indices  # (N, topk_group)
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)  # (N, G)
    return grouped.masked_fill(~allowed[:, :, None], float("-inf")).view(N, E)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean(logsumexp(logits)^2) keeps logits small and stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def load_cv(share: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of expert load over the last dim: std / mean, the population std
    (E experts are the whole population, not a sample). 0 = perfectly even; sqrt(E - 1) = one
    expert takes everything. share (..., E) -> (...)."""
    return share.std(dim=-1, unbiased=False) / share.mean(dim=-1)


def balance_metrics(routing: Routing) -> dict:
    """How evenly the router spreads work: load CV, max/mean load, dropped %, router entropy."""
    load = routing.first_choice_share  # (E,)
    probs = routing.probs / routing.probs.sum(dim=-1, keepdim=True)  # sigmoid scores: as a distribution
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1).mean()
    return {
        "load_cv": load_cv(load).item(),
        "max_over_mean": (load.max() / load.mean()).item(),
        "dropped_pct": 100.0 * routing.dropped.float().mean().item(),
        "router_entropy": entropy.item(),  # ln(E) when every token is unsure, 0 when sure
    }


class Router(nn.Module):
    """A linear gate over the token's features, computed in fp32 even under autocast.

    Reads everything it does from one MoEConfig: token choice (top-k) or expert choice,
    jitter, noisy gating, GShard's random second expert, the loss weights and aux-loss-free
    balancing, and the modern options (softmax or sigmoid scoring, weight normalisation and
    scaling, group-limited routing, the sequence-wise loss, the warm-up, capacity bounds).
    """

    def __init__(self, n_embd: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.expert_choice = config.expert_choice
        self.gate = nn.Linear(n_embd, config.n_experts, bias=False)  # Mixtral's name for it
        # Noisy top-k gating: a second linear map sets each expert's noise scale per token.
        self.noise = nn.Linear(n_embd, config.n_experts, bias=False) if config.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)  # start at softplus(0) = 0.69 noise; learned from there
        # Aux-loss-free balancing: added to the scores when selecting experts, never to gates.
        self.register_buffer("selection_bias", torch.zeros(config.n_experts))
        # Assignments per expert since the last bias update: every micro-batch of an optimizer
        # step counts, not only the last one (gradient accumulation).
        self.register_buffer("load_since_update", torch.zeros(config.n_experts), persistent=False)
        if config.aux_loss_warmup_steps > 0:
            # Optimizer steps taken so far, for the balancing losses' ramp; saved with the model so
            # that a resumed run continues the ramp where it stopped.
            self.register_buffer("warmup_step", torch.zeros((), dtype=torch.long))

    def logits(self, x):  # (N, C) -> (N, E) fp32
        if self.training and self.config.jitter > 0:
            # Switch: multiplicative noise on the router input explores routings (train only).
            x = x * torch.empty_like(x).uniform_(1.0 - self.config.jitter, 1.0 + self.config.jitter)
        # "Selective precision": the softmax over experts is sensitive to rounding, so the
        # router runs in fp32 whatever autocast does to the rest of the model. Checkpoints whose
        # router multiplied in the model's dtype (Mixtral, Qwen3-MoE, OLMoE in transformers) set
        # router_precision="model" to reproduce their choices exactly; the softmax is fp32 either way.
        if self.config.router_precision == "model" and not torch.is_autocast_enabled(x.device.type):
            logits = F.linear(x, self.gate.weight).float()
            noise_scale = F.softplus(F.linear(x, self.noise.weight).float()) if self.noise is not None else None
        elif not torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
            logits = F.linear(x, self.gate.weight)  # already fp32: skip the context switch
            noise_scale = F.softplus(F.linear(x, self.noise.weight)) if self.noise is not None else None
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.linear(x.float(), self.gate.weight.float())
                noise_scale = (F.softplus(F.linear(x.float(), self.noise.weight.float()))
                               if self.noise is not None else None)
        if noise_scale is not None and self.training:
            logits = logits + torch.randn_like(logits) * noise_scale  # train only
        return logits

    def forward(self, x, capacity_factor, seq_len: int | None = None, bounded: bool = True, top_k: int | None = None,
                excluded=(), groups: tuple[int, int] | None = None, excluded_from_softmax: bool = False) -> Routing:
        """Route x (N, C): the token-choice core of notebook 03, each option a method below.
        `seq_len`: tokens per sequence (for the sequence-wise loss); `bounded`: apply
        min/max_capacity (capacity overrides such as dropless do not); `top_k`, `excluded`
        (experts no token may choose; `excluded_from_softmax`: as if their router rows were deleted) and
        `groups` ((n_group, topk_group)): inference-time changes (moe.RoutingOverride), which leave the
        router's own settings as they are."""
        k = top_k or self.top_k
        logits = self.logits(x)  # (N, E)
        if len(excluded) and excluded_from_softmax:
            # A checkpoint with these experts deleted: the softmax runs over the experts that remain.
            logits = logits.index_fill(1, torch.as_tensor(list(excluded), device=logits.device), float("-inf"))
        probs = self.affinity(logits)  # (N, E)
        if self.expert_choice:
            return self._expert_choice(logits, probs, capacity_factor, k)
        expert = self.select(probs, k, excluded, groups)  # (N, k) chosen experts, best first
        gate = self._weights(probs.gather(1, expert), k)  # (N, k)
        active = self.random_second_expert(gate) if self.config.second_expert == "random" else None
        if self.training:
            self.count_load(expert)
        cap = self.expert_capacity(x.size(0), capacity_factor, k, bounded)
        position = positions_in_expert(expert, self.n_experts, active)  # (N, k) arrival order per expert
        kept = position < cap if active is None else (position < cap) & active
        aux, z, seq_aux = self.losses(logits, probs, expert, seq_len)
        return Routing(logits=logits, probs=probs, expert=expert, weights=gate, kept=kept, position=position,
                       capacity=cap, aux_loss=aux, z_loss=z, seq_aux_loss=seq_aux)

    def affinity(self, logits):
        """How much each token wants each expert (N, E): a softmax over experts (Switch, Mixtral),
        or an independent sigmoid per expert (DeepSeek-V3)."""
        return torch.sigmoid(logits) if self.config.scoring == "sigmoid" else F.softmax(logits, dim=-1)

    def select(self, probs, k: int, excluded=(), groups: tuple[int, int] | None = None):
        """The k experts each token goes to (N, k), best first. The aux-loss-free bias (zero unless
        trained or loaded) shifts which experts are chosen, never their weights; group-limited routing
        keeps a token within its best groups (`groups` imposes them at inference); `excluded` experts (pruned
        at inference) are never chosen."""
        scores = probs + self.selection_bias
        n_group, topk_group = groups or (self.config.n_group, self.config.topk_group)
        if n_group > 1:
            scores = limit_to_groups(scores, n_group, topk_group)
        if len(excluded):
            scores = scores.index_fill(1, torch.as_tensor(list(excluded), device=scores.device), float("-inf"))
        if k == 1:
            return scores.argmax(dim=-1, keepdim=True)  # (N, 1); cheaper than topk
        return torch.topk(scores, k, dim=-1).indices  # (N, k)

    def random_second_expert(self, gate):
        """GShard: in training, send a token to its second expert only with probability 2 * gate_2, so
        weak second choices do not use up capacity. Returns (N, k) bool, the assignments that count."""
        active = torch.ones_like(gate, dtype=torch.bool)
        if self.training and gate.size(1) > 1:
            active[:, 1] = torch.rand_like(gate[:, 1]) < 2 * gate[:, 1].detach()
        return active

    def count_load(self, expert):
        """Aux-loss-free balancing: count this micro-batch's assignments toward the next bias update."""
        if self.config.bias_update_rate > 0:
            self.load_since_update += torch.bincount(expert.reshape(-1), minlength=self.n_experts)

    def expert_capacity(self, n_tokens: int, capacity_factor, k: int, bounded: bool) -> int:
        """Slots per expert, ceil(cf * k * N / E), within MoEConfig's min/max_capacity if `bounded`."""
        cap = capacity(n_tokens, self.n_experts, capacity_factor, k)
        if bounded:
            cap = max(cap, self.config.min_capacity)
            cap = min(cap, self.config.max_capacity) if self.config.max_capacity is not None else cap
        return cap

    def losses(self, logits, probs, expert, seq_len):
        """The weighted auxiliary losses: Switch's load balancing, ST-MoE's z-loss and DeepSeek-V3's
        sequence-wise balance (None when off), each scaled by its coefficient and the warm-up ramp."""
        cfg, ramp = self.config, self.warmup_ramp()
        # Sigmoid scores are not a distribution: the Switch loss reads them normalised.
        balance_probs = probs / probs.sum(dim=-1, keepdim=True) if cfg.scoring == "sigmoid" else probs
        aux = ramp * cfg.aux_loss_coef * load_balancing_loss(balance_probs, expert[:, 0])
        z = ramp * cfg.z_loss_coef * z_loss(logits)
        seq_aux = None
        if cfg.seq_aux_loss_coef > 0 and seq_len:
            seq_aux = ramp * cfg.seq_aux_loss_coef * sequence_balance_loss(probs, expert, seq_len)
        return aux, z, seq_aux

    def _weights(self, chosen, k: int):
        """How much each chosen expert's output counts, from its unbiased score (N, k)."""
        cfg = self.config
        if cfg.normalize_weights and (k > 1 or k < cfg.top_k):
            # Renormalise over the chosen experts (also when top-k is lowered to one at inference:
            # the lone expert then gets weight 1, as in transformers). For softmax scores this equals
            # Mixtral's softmax over the top-k logits: exp(l_i) / sum_chosen exp(l_j) either way.
            total = chosen.sum(dim=-1, keepdim=True)
            chosen = chosen / (total + 1e-20 if cfg.scoring == "sigmoid" else total)
        elif k == 1 and cfg.straight_through_gate:
            # Value 1, gradient of p: the expert's output passes unscaled (an upcycled MoE then
            # computes exactly its dense parent) while the router still learns from the task loss.
            chosen = chosen / chosen.detach()
        if cfg.routed_scaling_factor != 1.0:
            chosen = chosen * cfg.routed_scaling_factor  # DeepSeek-V3: keeps routed outputs from being too small
        return chosen

    def warmup_ramp(self):
        """The balancing losses' weight multiplier: (steps + 1) / warm-up steps, up to 1."""
        if self.config.aux_loss_warmup_steps <= 0:
            return 1.0
        return ((self.warmup_step + 1).float() / self.config.aux_loss_warmup_steps).clamp(max=1.0)

    def _expert_choice(self, logits, probs, capacity_factor, k: int):
        """Each expert takes the C tokens that score it highest; C = ceil(cf * k * N / E).

        Perfectly balanced by construction (no aux loss), but a token may get several experts
        or none, and the choice depends on every token in the batch, later ones included.
        """
        N, E = probs.shape
        cap = min(capacity(N, E, capacity_factor, k), N)
        chosen = torch.topk(probs, cap, dim=0).indices  # (C, E): each expert's tokens
        kept = torch.zeros(N, E, dtype=torch.bool, device=probs.device)
        kept[chosen, torch.arange(E, device=probs.device)] = True
        expert = torch.arange(E, device=probs.device).expand(N, E)  # column j is expert j
        position = positions_in_expert(expert, E, kept)  # token order within each expert
        zero = logits.new_zeros(())
        return Routing(logits=logits, probs=probs, expert=expert, weights=probs, kept=kept, position=position,
                       capacity=cap, aux_loss=zero, z_loss=self.config.z_loss_coef * z_loss(logits),
                       expert_choice=True)

    @torch.no_grad()
    def update_selection_bias(self):
        """Aux-loss-free balancing, once per optimizer step: raise the bias of the experts that
        got fewer assignments than average since the last update, lower the busier ones.

        In data-parallel training the training step sums the counts over ranks first
        (distributed.sum_router_loads), so the bias follows the global batch's load and is the same
        on every rank. Only the sign of (mean - load) matters, so a forward pass counted twice
        (activation checkpointing reruns it in backward, with the same routing) changes nothing.
        """
        if self.config.bias_update_rate <= 0:
            return
        load = self.load_since_update
        if load.sum() > 0:
            self.selection_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
