"""Optimizers: AdamW (notebook 01), and Muon for the hidden weight matrices (notebook 07).

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) takes SGD-momentum's
update for a weight matrix and replaces it by the nearest semi-orthogonal matrix (a few Newton-Schulz
iterations), so every direction of the matrix moves by the same amount instead of the few that
dominate the gradient. It is meant for the hidden matrices that transform activations. With
`adjust_lr_fn="match_rms_adamw"` its update has AdamW's RMS, so both share one learning rate and one
schedule.

What gets what with optimizer="muon". torch.optim.Muon: the blocks' 2-D matrices (attention, the
dense MLP). AdamW: embeddings, the output layer, norms, biases (the experts' too) and routers; a
router is a small (E, C) classifier whose rows compete through a softmax, not a hidden matrix, so it
keeps AdamW as in Moonlight. The experts' stacked (E, C, H) and (E, H, C) weights keep AdamW by
default; with `TrainConfig.muon_experts` (on in the char-modern preset) they get `ExpertMuon`,
torch's Muon update applied to each expert's matrix on its own (as Moonlight and Kimi K2 do): an
expert is an MLP like the dense one, so its matrices are hidden matrices too. Shared experts are
`Experts` with E=1 and go with them.
"""

import math

import torch

from .experts import Experts

OPTIMIZERS = ("adamw", "muon")

# torch.optim.Muon's defaults (torch/optim/_muon.py: EPS, DEFAULT_A/B/C, DEFAULT_NS_STEPS), from
# Keller Jordan's Muon; tests/test_expert_muon.py checks that ExpertMuon with them matches torch's.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def make_optimizer(model: torch.nn.Module, cfg):
    """cfg.optimizer's optimizer for `model`: AdamW with weight decay on matrices (embeddings,
    linear weights) only, or Muon for the blocks' 2-D matrices (with cfg.muon_experts, ExpertMuon
    for the experts' stacked weights) and AdamW for the rest."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied weights once
    in_experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    is_muon = cfg.optimizer == "muon"
    muon = [p for name, p in named if is_muon and _is_hidden_matrix(name, p, in_experts)]
    # The experts' c_fc and c_proj (E, ., .); a dense model has none, so muon_experts changes nothing there.
    experts = [p for _, p in named if is_muon and cfg.muon_experts and id(p) in in_experts and p.dim() == 3]
    chosen = {id(p) for p in muon + experts}
    rest = [p for _, p in named if id(p) not in chosen]
    adamw = _adamw(rest, cfg)
    if not muon:
        return adamw
    hyper = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(torch.optim.Muon(muon, **hyper), adamw, ExpertMuon(experts, **hyper) if experts else None)


def _is_hidden_matrix(name: str, p: torch.Tensor, in_experts: set) -> bool:
    """A 2-D weight of attention or a dense MLP inside a block (not a router, embedding or head, nor
    an expert's (E, H) bias, which is E biases rather than one matrix)."""
    return p.dim() == 2 and name.startswith("transformer.h.") and ".router." not in name and id(p) not in in_experts


def _adamw(params, cfg) -> torch.optim.AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one pass over all tensors: MoE's many
    # expert weights make the optimizer a large share of a CPU step, and fusing cuts it several-fold
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def orthogonalize(update: torch.Tensor, coefficients=NS_COEFFICIENTS, steps=NS_STEPS, eps=NS_EPS) -> torch.Tensor:
    """Newton-Schulz's approximately semi-orthogonal matrix for each of E matrices at once:
    (E, A, B) -> (E, A, B) in bfloat16. Step for step torch.optim.Muon's `_zeropower_via_newtonschulz`,
    with each matmul batched over the experts (bmm / baddbmm instead of mm / addmm)."""
    a, b, c = coefficients
    x = update.bfloat16()  # as torch's: the iteration runs in bfloat16 whatever the weights' dtype
    tall = update.size(-2) > update.size(-1)
    if tall:
        x = x.mT  # (E, B, A): the Gram matrix x @ x^T is then the smaller, (E, B, B)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # each matrix's spectral norm <= its Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.mT  # (E, r, r), r = min(A, B)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + (b * gram + c * gram^2) @ x
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's `_adjust_lr` for one (rows, cols) matrix: "match_rms_adamw" scales the
    orthogonalised update (RMS ~ 1/sqrt(max(rows, cols))) to AdamW's typical RMS of ~0.2."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * (0.2 * math.sqrt(max(rows, cols)))


class ExpertMuon(torch.optim.Optimizer):
    """torch.optim.Muon for stacked expert weights (E, A, B): each expert's (A, B) matrix gets the
    update torch's Muon gives a lone 2-D matrix (momentum, Newton-Schulz, decoupled weight decay,
    learning rate adjusted for (A, B)), computed for all E experts at once.

    Under expert parallelism (distributed.shard_experts) a rank holds a slice of the experts, and
    their gradients are already averaged over ranks (distributed.average_expert_grads): every
    expert's update uses its own matrix only, so each rank updates its slice with nothing to exchange.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=NS_EPS, ns_steps=NS_STEPS, adjust_lr_fn=None):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"ExpertMuon's adjust_lr_fn must be None, 'original' or 'match_rms_adamw' (as "
                             f"torch.optim.Muon's), got {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        shapes = [tuple(p.shape) for group in self.param_groups for p in group["params"] if p.dim() != 3]
        if shapes:
            raise ValueError(f"ExpertMuon takes stacked expert weights (E, A, B), got shapes {shapes}: give 2-D "
                             f"matrices to torch.optim.Muon and the rest to AdamW")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad  # (E, A, B)
                state = self.state[p]
                if "momentum_buffer" not in state:  # torch's state key, so its state dicts read the same
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)  # an average of past gradients, as torch's Muon keeps it
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, at the unadjusted lr
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.size(-2), p.size(-1)))


class MuonWithAdamW:
    """Two optimizers stepped as one (three with Muon for the experts): what the training loop and
    checkpoints need of an optimizer (param_groups to set the learning rate, step, zero_grad,
    state_dict, load_state_dict)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer,
                 expert_muon: torch.optim.Optimizer | None = None):
        self.muon, self.adamw, self.expert_muon = muon, adamw, expert_muon

    @property
    def parts(self) -> dict:
        """The torch optimizers by name, the names their states have in a checkpoint."""
        parts = {"muon": self.muon, "adamw": self.adamw}
        if self.expert_muon is not None:
            parts["expert_muon"] = self.expert_muon
        return parts

    @property
    def param_groups(self) -> list:
        return [g for opt in self.parts.values() for g in opt.param_groups]  # the same dicts: setting "lr" reaches all

    def step(self):
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}  # no "expert_muon": as before it existed

    def load_state_dict(self, state: dict):
        if set(state) ^ set(self.parts) == {"expert_muon"}:
            saved = "expert_muon" in state
            raise ValueError(f"this checkpoint's optimizer state {'has' if saved else 'has no'} Muon for the experts' "
                             f"weights: it was trained with muon_experts={saved}; resume with "
                             f"TrainConfig.muon_experts={saved}")
        if set(state) != set(self.parts):
            raise ValueError("this checkpoint's optimizer state is not Muon + AdamW: it was trained with another "
                             "optimizer (TrainConfig.optimizer)")
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])
