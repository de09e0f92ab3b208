"""The router: which expert(s) each token goes to, with what gate, and what it costs.

Token-choice routing (Switch top-1, GShard/Mixtral top-k): each token picks its k highest-
scoring experts. Every expert has a fixed capacity, ceil(capacity_factor * k * N / E) slots
for N tokens; assignments beyond it are dropped, in priority order (all first choices before any
second choice, earlier tokens before later ones). A dropped assignment contributes nothing:
the residual connection carries the token past the layer.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """One layer's routing of N tokens; tensors indexed by token (and choice, for top-k)."""

    logits: torch.Tensor  # (N, E) fp32 router logits
    probs: torch.Tensor  # (N, E) softmax over all experts
    expert: torch.Tensor  # (N, k) chosen experts, best first
    gate: torch.Tensor  # (N, k) weight of each chosen expert's output (differentiable)
    kept: torch.Tensor  # (N, k) bool: the assignment fits in its expert's capacity
    capacity: int  # slots per expert
    aux_loss: torch.Tensor  # load-balancing loss, already scaled by its coefficient
    z_loss: torch.Tensor  # router z-loss, already scaled by its coefficient

    @property
    def dropped(self) -> torch.Tensor:
        """(N,) bool: the token's first choice was dropped (top-1: it skipped the layer)."""
        return ~self.kept[:, 0]

    @property
    def top_choice_share(self) -> torch.Tensor:
        """(E,) fraction of tokens whose first choice is each expert: the router's demand,
        before capacity cuts it (f_i of the load-balancing loss)."""
        return torch.bincount(self.expert[:, 0], minlength=self.probs.size(1)).float() / self.expert.size(0)

    @property
    def counts(self) -> torch.Tensor:
        """(E,) tokens each expert processes (kept assignments only)."""
        return torch.bincount(self.expert[self.kept], minlength=self.probs.size(1))


def capacity(n_tokens: int, n_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """Slots per expert: ceil(capacity_factor * top_k * tokens / experts)."""
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def positions_in_expert(expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """For assignments (N, k), each one's arrival order at its expert, first choices first.

    Priority: choice rank, then token order. Flattening choice-major gives exactly that order;
    a cumulative count per expert then numbers the arrivals 0, 1, 2, ...
    """
    N, k = expert.shape
    flat = expert.t().reshape(-1)  # (k*N,) all first choices, then all second choices
    one_hot = F.one_hot(flat, n_experts)  # (k*N, E)
    position = (one_hot.cumsum(dim=0) - 1).gather(1, flat[:, None]).squeeze(1)  # (k*N,)
    return position.view(k, N).t()  # (N, k)


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's N * sum_i f_i * P_i (without the coefficient alpha).

    f_i: fraction of tokens whose top choice is expert i (a count: no gradient).
    P_i: mean router probability of expert i over all tokens (differentiable).
    Minimised (= 1) by a uniform split; equals E when every token picks one expert.
    """
    n_experts = probs.size(1)
    f = torch.bincount(top1, minlength=n_experts).float() / top1.numel()  # (E,)
    P = probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * P)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean(logsumexp(logits)^2) keeps logits small and stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    """A linear gate over the token's features, computed in fp32 even under autocast."""

    def __init__(self, n_embd, n_experts, top_k=1, jitter=0.0, aux_loss_coef=1e-2, z_loss_coef=1e-3):
        super().__init__()
        self.gate = nn.Linear(n_embd, n_experts, bias=False)
        self.n_experts, self.top_k, self.jitter = n_experts, top_k, jitter
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    def logits(self, x):  # (N, C) -> (N, E) fp32
        if self.training and self.jitter > 0:
            # Switch: multiplicative noise on the router input explores routings (train only).
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        # "Selective precision": the softmax over experts is sensitive to rounding, so the
        # router runs in fp32 whatever autocast does to the rest of the model.
        if not torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
            return F.linear(x, self.gate.weight)  # already fp32: skip the context switch
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x, capacity_factor):
        logits = self.logits(x)  # (N, E)
        probs = F.softmax(logits, dim=-1)
        if self.top_k == 1:
            gate, expert = probs.max(dim=-1, keepdim=True)  # (N, 1) each; cheaper than topk
        else:
            gate, expert = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)  # renormalise over the chosen experts
        cap = capacity(x.size(0), self.n_experts, capacity_factor, self.top_k)
        kept = positions_in_expert(expert, self.n_experts) < cap
        return Routing(
            logits=logits, probs=probs, expert=expert, gate=gate, kept=kept, capacity=cap,
            aux_loss=self.aux_loss_coef * load_balancing_loss(probs, expert[:, 0]),
            z_loss=self.z_loss_coef * z_loss(logits),
        )
