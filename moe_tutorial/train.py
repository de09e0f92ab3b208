"""Training: AdamW, warmup + cosine schedule, clipping, accumulation, eval, checkpoints, CLI.

`train(model, dataset, config)` is deterministic for a given seed: batches come from a
generator of its own, and a checkpoint stores every random state, so a resumed run
continues exactly as an uninterrupted one would.

Command line:  python -m moe_tutorial.train --preset char --max-iters 2000 --sample 300

Under torchrun (notebook 06) the same function trains data parallel with DDP: every rank draws
the same global batch and keeps its own slice, only rank 0 logs and saves.
"""

import argparse
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import atomic_path, get_batch, shakespeare_dataset
from .model import GPT, GPTConfig

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
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    eval_interval: int = 250
    eval_iters: int = 20  # fixed validation batches per evaluation
    seed: int = 1337
    dtype: str = "float32"  # "bfloat16" runs forward and backward under torch.autocast
    activation_checkpointing: bool = False  # trade compute for activation memory
    device: str = "cpu"
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        positive = ("batch_size", "max_iters", "grad_accum_steps", "eval_interval", "eval_iters")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.warmup_iters < 0:
            raise ValueError(f"TrainConfig.warmup_iters must be >= 0, got {self.warmup_iters}")
        if not self.learning_rate > 0 or not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(
                f"TrainConfig needs learning_rate > 0 and 0 <= min_lr <= learning_rate, "
                f"got learning_rate={self.learning_rate}, min_lr={self.min_lr}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at decay_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, linear weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


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
    expert_load: list = field(default_factory=list)  # share of tokens whose top choice is each expert
    dropped: list = field(default_factory=list)  # fraction of tokens whose first choice was dropped

    def record_routing(self, model, moe_loss):
        """Log what the routers did in the last micro-batch."""
        routings = [layer.last_routing for layer in model.moe_layers()]
        if not routings:
            return
        self.moe_loss.append(moe_loss)
        self.expert_load.append([r.top_choice_share.tolist() for r in routings])
        self.dropped.append([r.dropped.float().mean().item() for r in routings])

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def fixed_batches(tokens, n, batch_size, block_size, seed):
    """The same `n` batches every time: evaluations are comparable across steps and runs."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(tokens, batch_size, block_size, generator) for _ in range(n)]


@torch.no_grad()
def estimate_loss(model, batches, cfg: TrainConfig) -> float:
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(cfg):
            _, loss = model(x.to(cfg.device), y.to(cfg.device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def autocast(cfg: TrainConfig):
    device_type = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "float32")


def save_checkpoint(path, model, optimizer, step, cfg, history, batch_rng, extra=None):
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_config": model.config.to_dict(),
        "train_config": asdict(cfg),
        "history": history.to_dict(),
        "rng": {"torch": torch.get_rng_state(), "batches": batch_rng.get_state()},
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}; train first or check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({err}); delete it and retrain") from err


def model_from_checkpoint(state: dict) -> GPT:
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def check_compatible(model, state, path="checkpoint"):
    """Refuse to resume a model from a checkpoint made for another configuration."""
    saved, current = state["model_config"], model.config.to_dict()
    diff = {k: (saved.get(k), current.get(k)) for k in current if saved.get(k) != current.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path} was saved for a different model config ({detail}). Build the model with "
            f"GPTConfig(**state['model_config']) or start a fresh run in another out_dir."
        )


def train(model: GPT, dataset, cfg: TrainConfig, checkpoint_path=None, resume=False, extra=None):
    """Train `model` on `dataset.train`, evaluating on `dataset.val`; returns a History.

    With `checkpoint_path`, a checkpoint is written at every evaluation and at the end;
    with `resume=True` training continues from it (same batches, same random numbers).
    """
    block_size = model.config.block_size
    model.to(cfg.device)
    model.gradient_checkpointing = cfg.activation_checkpointing
    ranks = distributed.info()
    expert_parallel = any(distributed.is_expert_parallel(p) for p in model.parameters())
    if expert_parallel and checkpoint_path:
        raise ValueError("Checkpoints of expert-parallel runs are not implemented (each rank holds a different "
                         "slice of the experts); train without checkpoint_path or without --expert-parallel")
    net = model  # what runs forward and backward: DDP's wrapper when there are several ranks
    if ranks.world_size > 1:
        net = distributed.ddp(model, [ranks.local_rank] if str(cfg.device).startswith("cuda") else None)
    optimizer = make_optimizer(model, cfg)
    batch_rng = torch.Generator().manual_seed(cfg.seed)
    history, start = History(), 0
    if resume:
        state = load_checkpoint(checkpoint_path)
        check_compatible(model, state, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        batch_rng.set_state(state["rng"]["batches"])
        history, start = History(**state["history"]), state["step"]
    else:
        torch.manual_seed(cfg.seed)  # dropout and any other randomness inside the model
    eval_sets = {
        name: fixed_batches(dataset.split(name), cfg.eval_iters, cfg.batch_size, block_size, cfg.seed + 1)
        for name in ("train", "val")
    }
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters,
               disable=not cfg.progress or not ranks.is_main, desc="train")
    mine = slice(ranks.rank * cfg.batch_size, (ranks.rank + 1) * cfg.batch_size)  # this rank's rows
    for step in bar:
        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum_steps):
            x, y = get_batch(dataset.train, cfg.batch_size * ranks.world_size, block_size, batch_rng)
            x, y = x[mine], y[mine]  # the global batch, split over ranks (all of it on one process)
            with autocast(cfg):
                _, loss = net(x.to(cfg.device), y.to(cfg.device))
                moe_loss = model.moe_loss()  # zero for a dense model
            ((loss + moe_loss) / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
        if expert_parallel:
            distributed.average_expert_grads(model, ranks.world_size)
        if cfg.grad_clip > 0 and expert_parallel:
            distributed.clip_grad_norm_(model, cfg.grad_clip)  # expert grads differ per rank
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for layer in model.moe_layers():  # aux-loss-free balancing (a no-op unless enabled)
            layer.router.update_selection_bias(layer.last_routing)

        history.step.append(step)
        history.loss.append(loss_sum / cfg.grad_accum_steps)
        history.lr.append(lr)
        history.record_routing(model, moe_loss.item())
        history.tokens += cfg.batch_size * block_size * cfg.grad_accum_steps
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            history.eval_step.append(done)
            history.train_loss.append(estimate_loss(model, eval_sets["train"], cfg))
            history.val_loss.append(estimate_loss(model, eval_sets["val"], cfg))
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}")
            if checkpoint_path and ranks.is_main:
                history.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint(checkpoint_path, model, optimizer, done, cfg, history, batch_rng, extra)
    bar.close()
    history.elapsed += time.perf_counter() - t0
    return history


def main(argv=None):
    from .presets import MOE_VARIANTS, PRESETS  # presets imports this module: import here, not on top

    parser = argparse.ArgumentParser(
        prog="python -m moe_tutorial.train",
        description="Train a character-level GPT on tiny Shakespeare, print val loss and a sample. "
                    "Runs data parallel under torchrun (--nproc_per_node=N).",
    )
    parser.add_argument("--preset", default="char", choices=sorted(PRESETS), help="model + recipe")
    parser.add_argument("--variant", choices=sorted(MOE_VARIANTS), help="MoE fields added to the preset's model")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: shard each MoE layer's experts over the ranks")
    parser.add_argument("--max-iters", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per rank per step (default: the preset's)")
    parser.add_argument("--out-dir", default="out", help="where ckpt.pt is written (default: out)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--sample", type=int, default=300, metavar="N",
                        help="characters to generate after training (0: none)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 or bfloat16 autocast")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    ranks = distributed.setup()
    try:
        _run(args, ranks)
    finally:
        distributed.cleanup()  # also on errors: leave no process group behind


def _run(args, ranks):
    from .presets import MOE_VARIANTS, preset

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expert_parallel and ranks.world_size == 1:
        raise SystemExit("--expert-parallel needs several ranks: torchrun --nproc_per_node=2 -m moe_tutorial.train ...")
    overrides = {k: v for k, v in dict(max_iters=args.max_iters, seed=args.seed, batch_size=args.batch_size,
                                         dtype=args.dtype, device=args.device).items() if v is not None}
    if args.device and args.device.startswith("cuda") and ranks.world_size > 1:
        overrides["device"] = f"cuda:{ranks.local_rank}"
    if args.no_progress:
        overrides["progress"] = False
    dataset = shakespeare_dataset(progress=not args.no_progress and ranks.is_main)
    model_cfg, train_cfg = preset(args.preset, vocab_size=dataset.tokenizer.vocab_size, **overrides)
    if args.variant:
        model_cfg = dataclasses.replace(model_cfg, **MOE_VARIANTS[args.variant])
    if ranks.world_size > 1:
        distributed.check_same_config(model_cfg)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg)
    if args.expert_parallel:
        distributed.shard_experts(model)
    ckpt = None if args.expert_parallel else Path(args.out_dir) / "ckpt.pt"
    history = train(model, dataset, train_cfg, checkpoint_path=ckpt, resume=args.resume,
                    extra={"chars": dataset.tokenizer.chars, "preset": args.preset})
    log = print if ranks.is_main else (lambda *a, **k: None)
    log(f"preset {args.preset}{' + ' + args.variant if args.variant else ''}: {model.num_params():,} parameters "
        f"on rank 0, {ranks.world_size} rank(s), {train_cfg.max_iters} iters, {history.elapsed:.1f} s")
    log(f"val loss {history.final_val_loss:.4f} (train {history.train_loss[-1]:.4f})")
    if ckpt:
        log(f"checkpoint: {ckpt}")
    if args.sample > 0:  # every rank samples: expert-parallel layers need all of them in each forward
        model.eval()
        start = torch.tensor([dataset.tokenizer.encode("\n")], device=train_cfg.device)
        out = model.generate(start, args.sample, temperature=0.8, top_k=40,
                             generator=torch.Generator(device=train_cfg.device).manual_seed(0))
        log("-" * 40)
        log(dataset.tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()

