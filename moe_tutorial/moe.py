"""The Mixture-of-Experts layer: route, group tokens by expert, run the experts, combine.

It replaces the dense MLP in a transformer block: (B, T, C) in, (B, T, C) out. Each call
leaves its routing in `self.last_routing` (which expert each token chose, gates, drops,
losses) for the training loop's auxiliary losses, logs and the visualisations.
"""

import torch
import torch.nn as nn

from .experts import Experts
from .router import Router, Routing


def dispatch_and_combine(x, routing: Routing, experts: Experts):
    """Sort kept assignments by expert, run each expert on its slice, add gated outputs back.

    x (N, C) -> (N, C). Dropped assignments are left out, so their tokens get zero from this
    layer. Cost: one gather, one grouped matmul pair, one scatter-add; no loop over tokens.
    (index_select rather than x[idx]: on CPU its backward is ~10x faster.)
    """
    k = routing.expert.size(1)
    assignment = routing.kept.reshape(-1).nonzero().squeeze(1)  # (M,) kept, into the (N*k) grid
    expert = routing.expert.reshape(-1).index_select(0, assignment)
    order = torch.argsort(expert, stable=True)  # group by expert, token order within a group
    assignment, expert = assignment.index_select(0, order), expert.index_select(0, order)
    token = assignment // k  # (M,) which token each sorted row comes from
    gate = routing.gate.reshape(-1).index_select(0, assignment)  # (M,) differentiable
    counts = torch.bincount(expert, minlength=experts.n_experts)  # (E,)
    y = experts(x.index_select(0, token), counts)  # (M, C)
    weighted = (y.float() * gate[:, None]).to(x.dtype)  # the gate carries the router's gradient
    return torch.zeros_like(x).index_add(0, token, weighted)


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.expert_hidden or 4 * config.n_embd
        self.router = Router(config.n_embd, config.n_experts, config.top_k, config.router_jitter,
                             config.aux_loss_coef, config.z_loss_coef)
        self.experts = Experts(config.n_experts, config.n_embd, hidden, config.bias)
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.last_routing = None

    @property
    def capacity_factor(self):
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # routing sees every token of the batch at once
        routing = self.router(flat, self.capacity_factor)
        self.last_routing = routing
        return dispatch_and_combine(flat, routing, self.experts).view(B, T, C)
