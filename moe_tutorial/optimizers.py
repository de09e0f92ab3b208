"""Optimizers: AdamW (notebook 01), and Muon for the hidden weight matrices (notebook 07).

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) takes SGD-momentum's
update for a weight matrix and replaces it by the nearest semi-orthogonal matrix (a few Newton-Schulz
iterations), so every direction of the matrix moves by the same amount instead of the few that
dominate the gradient. It applies to 2-D weights inside the blocks only: embeddings, the output
layer, norms, biases, routers and stacked expert tensors keep AdamW. With `adjust_lr_fn=
"match_rms_adamw"` its update has AdamW's RMS, so both share one learning rate and one schedule.
"""

import torch

OPTIMIZERS = ("adamw", "muon")


def make_optimizer(model: torch.nn.Module, cfg):
    """cfg.optimizer's optimizer for `model`: AdamW with weight decay on matrices (embeddings,
    linear weights) only, or Muon for the blocks' 2-D matrices and AdamW for the rest."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied weights once
    muon = [p for name, p in named if cfg.optimizer == "muon" and _is_hidden_matrix(name, p)]
    chosen = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in chosen]
    adamw = _adamw(rest, cfg)
    if not muon:
        return adamw
    return MuonWithAdamW(torch.optim.Muon(muon, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                          adjust_lr_fn="match_rms_adamw"), adamw)


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight of attention or a dense MLP inside a block (not a router, embedding or head)."""
    return p.dim() == 2 and name.startswith("transformer.h.") and ".router." not in name


def _adamw(params, cfg) -> torch.optim.AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one pass over all tensors: MoE's many
    # expert weights make the optimizer a large share of a CPU step, and fusing cuts it several-fold
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


class MuonWithAdamW:
    """Two optimizers stepped as one: what the training loop and checkpoints need of an optimizer
    (param_groups to set the learning rate, step, zero_grad, state_dict, load_state_dict)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list:
        return self.muon.param_groups + self.adamw.param_groups  # the same dicts: setting "lr" reaches both

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        if set(state) != {"muon", "adamw"}:
            raise ValueError("this checkpoint's optimizer state is not Muon + AdamW: it was trained with another "
                             "optimizer (TrainConfig.optimizer)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
