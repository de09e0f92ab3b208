"""Sparse upcycling (Komatsuzaki et al. 2023): turn a trained dense model into an MoE (notebook 05).

Every expert of a new MoE layer starts as a copy of the dense MLP it replaces, and everything
else (attention, norms, embeddings) is copied as is. If no token is dropped, the upcycled model
then computes exactly the dense model's function: top-k gates sum to 1 over identical experts,
and top-1 uses a straight-through gate (value 1, gradient of p; see router.py). Training then
pulls the experts apart, starting from the dense model's quality instead of from scratch.
"""

from dataclasses import replace

import torch

from .config import MoEConfig
from .model import GPT
from .moe import MoE


def upcycle(model: GPT, n_experts: int, top_k: int = 1, moe_every: int = 2, noise_std: float = 0.0,
            router_std: float = 0.02, seed: int = 0, **moe_options) -> GPT:
    """A new MoE GPT initialised from the dense `model` (which is left unchanged).

    noise_std: relative noise added to each expert copy (std of noise / std of the weight),
    to break the experts' symmetry; 0 keeps the dense function exactly.
    moe_options: other MoEConfig fields (capacity factors, aux_loss_coef, ...).
    """
    if model.config.moe is not None:
        raise ValueError("upcycle() expects a dense model; this one already has MoE layers")
    for field in ("expert_hidden", "n_shared_experts"):
        if field in moe_options:
            raise ValueError(f"upcycle() copies the dense MLP into each expert, so {field} cannot be changed")
    if model.config.mlp_hidden is not None:
        moe_options["expert_hidden"] = model.config.mlp_hidden  # experts are copies of this MLP
    straight_through = top_k == 1 and moe_options.get("routing", "token_choice") == "token_choice"
    moe = MoEConfig(**{"n_experts": n_experts, "top_k": top_k, "every": moe_every,
                       "straight_through_gate": straight_through, **moe_options})
    moe_model = GPT(replace(model.config, moe=moe), model.kernels)
    moe_model.load_state_dict(model.state_dict(), strict=False)  # all but the MLPs we replace
    generator = torch.Generator().manual_seed(seed)
    for dense_block, block in zip(model.transformer.h, moe_model.transformer.h):
        if isinstance(block.mlp, MoE):
            copy_into_experts(dense_block.mlp, block.mlp, noise_std, generator)
            torch.nn.init.normal_(block.mlp.router.gate.weight, std=router_std, generator=generator)
        else:
            block.mlp.load_state_dict(dense_block.mlp.state_dict())
    return moe_model


@torch.no_grad()
def copy_into_experts(mlp, moe: MoE, noise_std: float = 0.0, generator=None):
    """Each expert <- the dense MLP (nn.Linear weights are (out, in); experts store (in, out))."""
    experts = moe.experts
    pairs = [(experts.c_fc, mlp.c_fc.weight.t()), (experts.c_proj, mlp.c_proj.weight.t())]
    if experts.b_fc is not None:
        pairs += [(experts.b_fc, mlp.c_fc.bias), (experts.b_proj, mlp.c_proj.bias)]
    for stacked, dense in pairs:  # stacked (E, ...) <- dense (...) for every expert
        stacked.copy_(dense.expand_as(stacked))
        if noise_std > 0:
            stacked.add_(noise_std * dense.std() * torch.randn(stacked.shape, generator=generator))
