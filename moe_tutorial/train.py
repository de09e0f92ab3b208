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
import os
import pickle
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import atomic_path, ensure_writable_dir, get_batch, shakespeare_dataset
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
    # The fused kernel updates every tensor in one pass: on a CPU several times faster than the default
    # for MoE models, whose many expert weights make the optimizer step a large share of a step.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


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


CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "history", "rng")


def load_checkpoint(path) -> dict:
    """A checkpoint written by save_checkpoint, loaded weights-only (tensors and plain values:
    no code can run). Anything else is refused with the reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}; train first or check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message would suggest weights_only=False: never do that here
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # a torch.save archive
            raise ValueError(f"{path} holds Python objects other than tensors and plain values, so it was not "
                             f"written by moe_tutorial and is refused (loading it could run code)") from None
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: truncated, corrupt or not "
                         f"a PyTorch file); delete it and retrain") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is a PyTorch file but not a moe_tutorial training checkpoint "
                         f"(no {', '.join(missing)}); use a ckpt.pt written by moe_tutorial.train")
    return state


def model_from_checkpoint(state: dict) -> GPT:
    model = GPT(config_from_checkpoint(state))
    model.load_state_dict(state["model"])
    return model


def config_from_checkpoint(state: dict, source="checkpoint") -> GPTConfig:
    fields = state["model_config"]
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise ValueError(f"{source} was saved by a version of moe_tutorial with model options this one lacks "
                         f"({', '.join(unknown)}); load it with the version that wrote it")
    return GPTConfig(**fields)


def check_compatible(model, state, path="checkpoint"):
    """Refuse to resume a model from a checkpoint made for another configuration. Options
    added since the checkpoint was written count at their defaults."""
    saved, current = config_from_checkpoint(state, path).to_dict(), model.config.to_dict()
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
        if state["step"] >= cfg.max_iters:
            raise ValueError(f"{checkpoint_path} has already trained {state['step']} steps, so max_iters="
                             f"{cfg.max_iters} leaves nothing to train; ask for more (e.g. --max-iters "
                             f"{state['step'] + cfg.eval_interval})")
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
        model.after_optimizer_step()  # aux-loss-free balancing, from the whole step's load

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


def _count(minimum):
    """An argparse type: an integer >= minimum, with a one-line error otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


# Errors caused by what the user asked for: one line on stderr, no traceback (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, TimeoutError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (the problem) instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv=None):
    from .presets import MOE_VARIANTS, PRESETS  # presets imports this module: import here, not on top

    parser = OneLineParser(
        prog="python -m moe_tutorial.train",
        description="Train a character-level GPT on tiny Shakespeare, print val loss and a sample. "
                    "Runs data parallel under torchrun (--nproc_per_node=N).",
    )
    parser.add_argument("--preset", default="char", choices=sorted(PRESETS), help="model + recipe")
    parser.add_argument("--variant", choices=sorted(MOE_VARIANTS), help="MoE fields added to the preset's model")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: shard each MoE layer's experts over the ranks (writes no checkpoint)")
    parser.add_argument("--max-iters", type=_count(1), help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=_count(1), help="sequences per rank per step (default: the preset's)")
    parser.add_argument("--out-dir", default="out", help="where ckpt.pt is written (default: out)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--overwrite", action="store_true", help="start afresh and replace OUT_DIR/ckpt.pt")
    parser.add_argument("--sample", type=_count(0), default=300, metavar="N",
                        help="characters to generate after training (0: none)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 or bfloat16 autocast")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--threads", type=_count(1), help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: continue the run or replace it, not both")
    if args.expert_parallel and args.resume:
        parser.error("--expert-parallel runs write no checkpoint (each rank holds different experts; saving them "
                     "is not implemented), so there is nothing to --resume")
    try:
        ranks = distributed.setup()
        try:
            _run(args, ranks)
        finally:
            distributed.cleanup()  # also on errors: leave no process group behind
    except USER_ERRORS as err:
        if os.environ.get("MOE_TUTORIAL_TRACEBACK"):
            raise
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def check_device(name: str) -> str:
    """Refuse a device this machine does not have, before any work is done."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device PyTorch knows: use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch sees no CUDA GPU on this machine "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: the training loop supports cpu and cuda")
    return name


def check_out_dir(args, ranks) -> Path | None:
    """Where the checkpoint goes, checked before training: nothing trained is lost by a typo."""
    if args.expert_parallel:
        return None
    ckpt = Path(args.out_dir) / "ckpt.pt"
    if args.resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume: there is no checkpoint at {ckpt}; drop --resume to start a fresh run "
                                f"there, or point --out-dir to the run to continue")
    if not args.resume and ckpt.exists() and not args.overwrite:
        raise ValueError(f"{ckpt} already holds a trained run: add --resume to continue it, --overwrite to "
                         f"replace it, or choose another --out-dir")
    if ranks.is_main:
        ensure_writable_dir(Path(args.out_dir), "--out-dir")
    return ckpt


def _run(args, ranks):
    from .presets import MOE_VARIANTS, preset

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expert_parallel and ranks.world_size == 1:
        raise ValueError("--expert-parallel needs several ranks: torchrun --nproc_per_node=2 -m moe_tutorial.train ...")
    if args.device:
        check_device(args.device)
    ckpt = check_out_dir(args, ranks)
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
    history = train(model, dataset, train_cfg, checkpoint_path=ckpt, resume=args.resume,
                    extra={"chars": dataset.tokenizer.chars, "preset": args.preset})
    log = print if ranks.is_main else (lambda *a, **k: None)
    log(f"preset {args.preset}{' + ' + args.variant if args.variant else ''}: {model.num_params():,} parameters "
        f"on rank 0, {ranks.world_size} rank(s), {train_cfg.max_iters} iters, {history.elapsed:.1f} s")
    log(f"val loss {history.final_val_loss:.4f} (train {history.train_loss[-1]:.4f})")
    log(f"checkpoint: {ckpt}" if ckpt else "no checkpoint written: expert-parallel checkpoints are not implemented")
    if args.sample > 0:  # every rank samples: expert-parallel layers need all of them in each forward
        model.eval()
        start = torch.tensor([dataset.tokenizer.encode("\n")], device=train_cfg.device)
        out = model.generate(start, args.sample, temperature=0.8, top_k=40,
                             generator=torch.Generator(device=train_cfg.device).manual_seed(0))
        log("-" * 40)
        log(dataset.tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()

