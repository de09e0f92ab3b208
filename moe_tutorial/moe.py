"""The Mixture-of-Experts layer: route, group tokens by expert, run the experts, combine
(notebook 03; shared experts: notebook 04).

It replaces the dense MLP in a transformer block: (B, T, C) in; the output (B, T, C) and the
router's weighted auxiliary losses out (the model adds them up and returns them beside the task
loss). Each call also leaves its routing in `self.last_routing` (which expert each token chose,
weights, drops) for logs and plots only. `override_capacity(model, factor)` routes with another
capacity factor for a while; `dropless(model)` lifts the limit, for generation.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import GPTConfig
from .dispatch import DISPATCH
from .experts import Experts
from .router import Router

DROPLESS = "dropless"  # a capacity override: every token fits, whatever the others do


class MoE(nn.Module):
    def __init__(self, config: GPTConfig, dispatch: str = "sort"):
        super().__init__()
        moe = config.moe
        hidden = config.expert_width
        self.router = Router(config.n_embd, moe)
        self.experts = Experts(moe.n_experts, config.n_embd, hidden, config.bias, config.gelu_approximate,
                               config.activation)
        # DeepSeek-style shared experts: always on for every token, next to the routed ones.
        self.shared = (Experts(1, config.n_embd, moe.n_shared_experts * hidden, config.bias, config.gelu_approximate,
                               config.activation)
                       if moe.n_shared_experts else None)
        self.dispatch = DISPATCH[dispatch]  # a Kernels.dispatch name: how, not what
        self.capacity_factor_train = moe.capacity_factor_train
        self.capacity_factor_eval = moe.capacity_factor_eval
        self.capacity_override = None  # see override_capacity(): a factor, DROPLESS, or None
        self.last_routing = None  # the last forward's routing, for inspection and plots

    @property
    def capacity_factor(self):
        if self.capacity_override == DROPLESS and not self.router.expert_choice:
            # capacity = ceil(cf * k * N / E) = N: even if every token picks one expert, all fit.
            return self.router.n_experts / self.router.top_k
        if self.capacity_override not in (None, DROPLESS):
            return self.capacity_override
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def forward(self, x):
        """x (B, T, C) -> (output (B, T, C), auxiliary loss: the router's weighted balancing losses)."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # routing sees every token of the batch at once
        routing = self.router(flat, self.capacity_factor, seq_len=T, bounded=self.capacity_override is None)
        self.last_routing = routing
        out = self.dispatch(flat, routing, self.experts)
        if self.shared is not None:
            out = out + self.shared(flat, torch.tensor([flat.size(0)], device=flat.device))
        aux_loss = routing.aux_loss + routing.z_loss
        if routing.seq_aux_loss is not None:
            aux_loss = aux_loss + routing.seq_aux_loss
        return out.view(B, T, C), aux_loss


@contextmanager
def override_capacity(module: nn.Module, capacity_factor):
    """Route every MoE layer in `module` with this capacity factor (or DROPLESS), then restore."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    saved = [m.capacity_override for m in layers]
    for m in layers:
        m.capacity_override = capacity_factor
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.capacity_override = value


def dropless(model: nn.Module):
    """Run every MoE layer of `model` without dropping tokens, then restore its capacity.

    With a capacity limit, whether a token is processed depends on the other tokens in its
    batch, so the same prefix could give different next-token logits in a batch of 1 (a KV-cache
    decoding step) and in a full forward pass. Generation therefore never drops tokens.
    """
    return override_capacity(model, DROPLESS)
