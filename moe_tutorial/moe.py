"""The Mixture-of-Experts layer: route, group tokens by expert, run the experts, combine.

It replaces the dense MLP in a transformer block: (B, T, C) in, (B, T, C) out. Each call
leaves its routing in `self.last_routing` (which expert each token chose, gates, drops,
losses) for the training loop's auxiliary losses, logs and the visualisations.
`dropless(model)` lifts the capacity limit for generation.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from .dispatch import DISPATCH
from .experts import Experts
from .router import Router


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.expert_hidden or 4 * config.n_embd
        self.router = Router(config.n_embd, config.n_experts, config.top_k, config.router_jitter,
                             config.aux_loss_coef, config.z_loss_coef, noisy=config.noisy_gating,
                             second_expert_policy=config.second_expert_policy,
                             bias_update_rate=config.bias_update_rate,
                             expert_choice=config.router_type == "expert_choice",
                             straight_through=config.straight_through_gate)
        self.experts = Experts(config.n_experts, config.n_embd, hidden, config.bias, config.gelu_approximate)
        # DeepSeek-style shared experts: always on for every token, next to the routed ones.
        self.shared = (Experts(1, config.n_embd, config.n_shared_experts * hidden, config.bias,
                               config.gelu_approximate)
                       if config.n_shared_experts else None)
        self.dispatch = DISPATCH[config.dispatch]
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.dropless = False  # see dropless(): no capacity limit, for generation
        self.last_routing = None

    @property
    def capacity_factor(self):
        if self.dropless and not self.router.expert_choice:
            # capacity = ceil(cf * k * N / E) = N: even if every token picks one expert, all fit.
            return self.router.n_experts / self.router.top_k
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # routing sees every token of the batch at once
        routing = self.router(flat, self.capacity_factor)
        self.last_routing = routing
        out = self.dispatch(flat, routing, self.experts)
        if self.shared is not None:
            out = out + self.shared(flat, torch.tensor([flat.size(0)], device=flat.device))
        return out.view(B, T, C)


@contextmanager
def dropless(model: nn.Module):
    """Run every MoE layer of `model` without dropping tokens, then restore its capacity.

    With a capacity limit, whether a token is processed depends on the other tokens in its
    batch, so the same prefix could give different next-token logits in a batch of 1 (a KV-cache
    decoding step) and in a full forward pass. Generation therefore never drops tokens.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.dropless for m in layers]
    for m in layers:
        m.dropless = True
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.dropless = flag
