"""Training: AdamW or Muon (optimizers), warmup + cosine schedule, clipping, gradient accumulation (notebook 01).

`train_step` is one optimizer step, readable on its own: forward and backward under the run's
autocast, gradients clipped, the optimizer step, the routers' per-step updates. `train()` is the
loop around it, deterministic for a seed (batches have their own generator; checkpoints store every
random state, so a resume continues exactly). Under torchrun (notebook 06) every rank draws the
same global batch and keeps its slice; rank 0 logs and saves. Command line: `moe_tutorial.cli`."""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import check_same_tokenizer, load_checkpoint, restore, save_checkpoint
from .data import get_batch
from .downloads import directory_lock
from .evaluate import estimate_loss, fixed_batches
from .history import History
from .model import GPT
from .optimizers import OPTIMIZERS, make_optimizer
from .sharded_checkpoint import load_sharded, save_sharded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    batch_size: int = 32
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here
    warmup_iters: int = 100  # linear warmup from 0
    lr_decay_iters: int | None = None  # None: decay over the whole run
    weight_decay: float = 0.1  # on 2-D weights only; biases and norms are not decayed
    optimizer: str = "adamw"  # "muon": Muon for the blocks' 2-D matrices, AdamW for the rest (notebook 07)
    muon_experts: bool = False  # with "muon": Muon for each expert's matrices too (Moonlight, Kimi K2), not AdamW
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    eval_interval: int = 250
    eval_iters: int = 20  # fixed validation batches per evaluation
    seed: int = 1337
    dtype: str = "float32"  # "bfloat16" runs forward and backward under torch.autocast
    activation_checkpointing: bool = False  # trade compute for activation memory
    compile: bool = False  # torch.compile the forward and backward (worth it on a GPU, for long runs)
    device: str = "cpu"
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        for name in ("batch_size", "max_iters", "grad_accum_steps", "eval_interval", "eval_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0 or not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"TrainConfig needs learning_rate > 0 and 0 <= min_lr <= learning_rate, "
                             f"got learning_rate={self.learning_rate}, min_lr={self.min_lr}")
        if min(self.warmup_iters, self.grad_clip, self.weight_decay) < 0:
            raise ValueError("TrainConfig.warmup_iters, grad_clip and weight_decay must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"TrainConfig.optimizer='muon' needs torch.optim.Muon (PyTorch >= 2.9); this is "
                             f"PyTorch {torch.__version__}: use optimizer='adamw'")
        if not isinstance(self.muon_experts, bool):
            raise ValueError(f"TrainConfig.muon_experts must be True or False, got {self.muon_experts!r}")
        if self.muon_experts and self.optimizer != "muon":
            raise ValueError(f"TrainConfig.muon_experts=True gives the experts' weights Muon, which needs "
                             f"optimizer='muon' (got {self.optimizer!r}): set optimizer='muon' or muon_experts=False")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    def autocast(self):
        """torch.autocast for this run's device and dtype (float32: a context that does nothing)."""
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type, dtype=DTYPES[self.dtype], enabled=self.dtype != "float32")


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at decay_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(net, model: GPT, optimizer, batches, cfg: TrainConfig, lr: float):
    """One optimizer step at learning rate `lr` over `batches` (cfg.grad_accum_steps micro-batches
    of (x, y)); `net` runs forward and backward (DDP's wrapper under torchrun, else the model).
    Returns the mean task loss and the mean auxiliary loss of the micro-batches, and the MoE
    layers' routing of the last micro-batch (for the history's logs; empty for a dense model)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = aux_sum = 0.0
    for x, y in batches:
        with cfg.autocast():
            _, loss, aux_loss, routing = net(x.to(cfg.device), y.to(cfg.device), return_routing=True)
        ((loss + aux_loss) / cfg.grad_accum_steps).backward()
        loss_sum, aux_sum = loss_sum + loss.item(), aux_sum + aux_loss.item()
    if distributed.has_sharded_experts(model):
        distributed.average_expert_grads(model)  # each rank's experts saw every rank's tokens: summed
    if cfg.grad_clip > 0:
        clip_gradients(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    distributed.sum_router_loads(model)  # under torchrun: every rank moves the same aux-loss-free bias
    model.after_optimizer_step()  # aux-loss-free balancing, from the whole step's load
    return loss_sum / cfg.grad_accum_steps, aux_sum / cfg.grad_accum_steps, routing


def clip_gradients(model: GPT, max_norm: float):
    """Scale all gradients down together when their global norm exceeds `max_norm`. With experts
    sharded over ranks (notebook 06) the norm must count every rank's experts: one all-reduce."""
    if distributed.has_sharded_experts(model):
        distributed.clip_grad_norm_(model, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class TrainingDiverged(FloatingPointError):
    """A loss became nan or inf: training stops, and no checkpoint is written over the last good one."""


def check_finite(value: float, what: str, step: int, checkpoint_path):
    if math.isfinite(value):
        return
    kept = f"the last good checkpoint, {checkpoint_path}, is untouched" if checkpoint_path and Path(
        checkpoint_path).exists() else "no checkpoint was written"
    raise TrainingDiverged(f"training diverged: the {what} is {value} at step {step}; stopped, and {kept} "
                           f"(try a lower learning rate, or a smaller grad_clip)")



def evaluation_batches(dataset, split: str, cfg: TrainConfig, block_size: int):
    """The batches train() evaluates a split on: the same ones at every evaluation of a run, drawn from
    the run's seed (to compare a run's curve with a model evaluated outside it, use these)."""
    return fixed_batches(dataset.split(split), cfg.eval_iters, cfg.batch_size, block_size, cfg.seed + 1)


def train(model: GPT, dataset, cfg: TrainConfig, checkpoint_path=None, resume=False, extra=None):
    """Train `model` on `dataset.train`, evaluating on `dataset.val`; returns a History. With
    `checkpoint_path`, a checkpoint is written at every evaluation and at the end, and the folder
    is locked against other runs meanwhile; with `resume=True` training continues from it (same
    batches, same random numbers). With experts or parameters sharded over ranks (notebook 06) the
    checkpoint is a folder every rank writes its shards into (moe_tutorial.sharded_checkpoint). A nan or inf
    loss stops the run (TrainingDiverged)."""
    ranks = distributed.info()
    dataset.check_batches_fit(cfg.batch_size * ranks.world_size, model.config.block_size)
    writing = checkpoint_path and ranks.is_main
    with directory_lock(Path(checkpoint_path).parent, "checkpoint folder") if writing else nullcontext():
        return _train(model, dataset, cfg, checkpoint_path, resume, extra, ranks)


def _train(model, dataset, cfg, checkpoint_path, resume, extra, ranks):
    T = model.config.block_size
    model.to(cfg.device).gradient_checkpointing = cfg.activation_checkpointing
    net = distributed.wrap_for_training(model, cfg.device)  # DDP under torchrun, else the model
    if cfg.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, cfg)
    batch_rng = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, History()
    sharded = distributed.has_sharded_experts(model) or distributed.is_fully_sharded(model)  # a folder per run
    if resume:
        state = load_sharded(checkpoint_path, model, optimizer) if sharded else load_checkpoint(checkpoint_path)
        check_same_tokenizer(state.get("extra", {}), extra or {}, checkpoint_path)
        start, history = restore(state, model, optimizer, batch_rng, checkpoint_path, cfg)
    else:
        torch.manual_seed(cfg.seed)  # dropout and any other randomness inside the model
    eval_sets = {name: evaluation_batches(dataset, name, cfg, T) for name in ("train", "val")}
    mine = slice(ranks.rank * cfg.batch_size, (ranks.rank + 1) * cfg.batch_size)  # this rank's rows

    def micro_batches():  # the global batch, split over ranks (all of it on one process)
        for _ in range(cfg.grad_accum_steps):
            x, y = get_batch(dataset.train, cfg.batch_size * ranks.world_size, T, batch_rng)
            yield x[mine], y[mine]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters,
               disable=not cfg.progress or not ranks.is_main, desc="train")
    for step in bar:
        lr = learning_rate_at(step, cfg)
        loss, aux_loss, routing = train_step(net, model, optimizer, micro_batches(), cfg, lr)
        check_finite(loss + aux_loss, "training loss", step, checkpoint_path)
        history.record_step(step, loss, lr, cfg.batch_size * T * cfg.grad_accum_steps, routing, aux_loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (done := step + 1) % cfg.eval_interval == 0 or done == cfg.max_iters:
            history.eval_step.append(done)
            history.train_loss.append(estimate_loss(model, eval_sets["train"], cfg))
            history.val_loss.append(estimate_loss(model, eval_sets["val"], cfg))
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{history.val_loss[-1]:.3f}")
            check_finite(history.val_loss[-1], "validation loss", done, checkpoint_path)
            if checkpoint_path:
                history.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                if sharded:  # every rank writes its own shards
                    save_sharded(checkpoint_path, model, optimizer, done, cfg, history, batch_rng, extra)
                elif ranks.is_main:
                    save_checkpoint(checkpoint_path, model, optimizer, done, cfg, history, batch_rng, extra)
    bar.close()
    history.elapsed += time.perf_counter() - t0
    return history


if __name__ == "__main__":  # python -m moe_tutorial.train: run the command line (moe_tutorial.cli)
    import runpy

    runpy.run_module("moe_tutorial.cli", run_name="__main__")
