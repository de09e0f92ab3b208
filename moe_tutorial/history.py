"""What happened during training, for plots and checkpoints (notebook 01; routing logs from 03)."""

from dataclasses import asdict, dataclass, field

import torch

from .router import load_cv


@dataclass
class History:
    """What happened during training, for plots: one row per step, one per evaluation."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent in train(), over all (resumed) runs
    tokens: int = 0
    # MoE models only, one row per step, one entry per MoE layer:
    moe_loss: list = field(default_factory=list)  # load-balancing + z-loss (already weighted)
    expert_load: list = field(default_factory=list)  # Routing.first_choice_share: the router's demand
    dropped: list = field(default_factory=list)  # fraction of tokens with every choice dropped

    def record_step(self, step: int, loss: float, lr: float, tokens: int, routings: list, aux_loss: float):
        """One optimizer step; `routings`: the MoE layers' routing of its last micro-batch (none: dense)."""
        self.step.append(step)
        self.loss.append(loss)
        self.lr.append(lr)
        self.tokens += tokens
        if routings:
            self.moe_loss.append(aux_loss)
            self.expert_load.append([r.first_choice_share.tolist() for r in routings])
            self.dropped.append([r.dropped.float().mean().item() for r in routings])

    def routing_summary(self, last: int = 100) -> dict:
        """Over the last steps and every MoE layer: load CV and busiest expert's share of top choices
        (the router's demand), and the % of tokens with every choice dropped. Empty for a dense model."""
        if not self.expert_load:
            return {}
        share = torch.tensor(self.expert_load[-last:])  # (steps, layers, E)
        return {"load_cv": load_cv(share).mean().item(), "max_share": share.amax(dim=-1).mean().item(),
                "dropped_pct": 100 * torch.tensor(self.dropped[-last:]).mean().item()}

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    def to_dict(self) -> dict:
        return asdict(self)
