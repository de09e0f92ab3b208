"""The Mixture-of-Experts layer: route, group tokens by expert, run the experts, combine
(notebook 03; shared experts: notebook 04).

It replaces the dense MLP in a transformer block: (B, T, C) in; out come the output (B, T, C),
the router's weighted auxiliary losses (the model adds them up and returns them beside the task
loss) and the routing itself (which expert each token chose, weights, drops: for logs, plots and
analysis), as transformers' Mixtral block returns its router logits. The dense MLP returns the
same triple, so a block does not care which one it holds.

`override_routing(model, ...)` routes differently for a while, at inference: another capacity
factor, another top-k, experts pruned; `dropless(model)` lifts the capacity limit, for generation.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn as nn

from .config import GPTConfig
from .dispatch import DISPATCH
from .experts import Experts
from .router import Router, Routing

DROPLESS = "dropless"  # a capacity override: every token fits, whatever the others do


class FeedForwardOutput(NamedTuple):
    out: torch.Tensor  # (B, T, C)
    aux_loss: torch.Tensor  # () the router's weighted auxiliary losses; 0 for a dense MLP
    routing: Routing | None  # this call's routing of its B * T tokens; None for a dense MLP


@dataclass
class RoutingOverride:
    """Inference-time changes to how an MoE layer routes; None / empty: as trained. The router's
    own settings (top_k, selection_bias) are never modified: these travel as arguments."""

    capacity_factor: float | str | None = None  # a factor, or DROPLESS
    top_k: int | None = None  # experts per token
    excluded: tuple = field(default_factory=tuple)  # experts no token may choose (pruned)
    # True: the excluded experts' router rows count as deleted, so the softmax runs over the experts that
    # remain and they share the excluded ones' probability; False: masked after the softmax, probability lost.
    excluded_from_softmax: bool = False
    groups: tuple[int, int] | None = None  # (n_group, topk_group): group-limited routing imposed on a router


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
        self.override = RoutingOverride()  # set for a while by override_routing()

    @property
    def capacity_factor(self):
        override = self.override.capacity_factor
        if override == DROPLESS and not self.router.expert_choice:
            # capacity = ceil(cf * k * N / E) = N: even if every token picks one expert, all fit.
            return self.router.n_experts / (self.override.top_k or self.router.top_k)
        if override not in (None, DROPLESS):
            return override
        return self.capacity_factor_train if self.training else self.capacity_factor_eval

    def forward(self, x) -> FeedForwardOutput:
        """x (B, T, C) -> (output (B, T, C), the router's weighted auxiliary losses, the routing)."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # routing sees every token of the batch at once
        routing = self.router(flat, self.capacity_factor, seq_len=T, bounded=self.override.capacity_factor is None,
                              top_k=self.override.top_k, excluded=self.override.excluded, groups=self.override.groups,
                              excluded_from_softmax=self.override.excluded_from_softmax)
        out = self.dispatch(flat, routing, self.experts)
        if self.shared is not None:
            out = out + self.shared(flat, torch.tensor([flat.size(0)], device=flat.device))
        aux_loss = routing.aux_loss + routing.z_loss
        if routing.seq_aux_loss is not None:
            aux_loss = aux_loss + routing.seq_aux_loss
        return FeedForwardOutput(out.view(B, T, C), aux_loss, routing)


@contextmanager
def override_routing(layers, **changes):
    """Route each MoE layer of `layers` (a model, a module, or a list of MoE layers) with the
    RoutingOverride fields in `changes` (capacity_factor, top_k, excluded, excluded_from_softmax,
    groups), then restore."""
    if isinstance(layers, nn.Module):
        layers = [m for m in layers.modules() if isinstance(m, MoE)]
    if changes.get("groups") is not None:
        n_group, topk_group = changes["groups"]
        for layer in layers:  # MoEConfig's own checks: the groups must split this router's experts
            replace(layer.router.config, n_group=n_group, topk_group=topk_group)
    saved = [layer.override for layer in layers]
    for layer in layers:
        layer.override = RoutingOverride(**{**vars(layer.override), **changes})
    try:
        yield
    finally:
        for layer, override in zip(layers, saved):
            layer.override = override


def override_capacity(module: nn.Module, capacity_factor):
    """Route every MoE layer in `module` with this capacity factor (or DROPLESS), then restore."""
    return override_routing(module, capacity_factor=capacity_factor)


def dropless(model: nn.Module):
    """Run every MoE layer of `model` without dropping tokens, then restore its capacity.

    With a capacity limit, whether a token is processed depends on the other tokens in its
    batch, so the same prefix could give different next-token logits in a batch of 1 (a KV-cache
    decoding step) and in a full forward pass. Generation therefore never drops tokens.
    """
    return override_capacity(model, DROPLESS)
