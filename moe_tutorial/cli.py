"""The command line: train a preset, print val loss and a sample (notebook 01; torchrun: 06).

    python -m moe_tutorial.train --preset char --max-iters 2000 --sample 300
    python -m moe_tutorial.train --data my_text.txt --tokenizer char --out-dir out-mine
    python -m moe_tutorial.train --preset gpt2-mini-moe            # GPT-2's BPE, minutes on a CPU
    torchrun --nproc_per_node=2 -m moe_tutorial.train --variant "Switch top-1" --expert-parallel

Then `python -m moe_tutorial.sample --out-dir out` generates from the run (moe_tutorial.sample).

Everything a user can get wrong on the command line (a device the machine lacks, a count below 1,
an out-dir that cannot be written or that another run is using, a fresh run over a trained one, a
resume that would train nothing, a batch larger than the data) is refused before training, in one
line on stderr with exit status 2. So are a full disk and a loss that turns nan during training.
"""

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from . import distributed
from .costs import model_info, peak_tflops
from .data import TOKENIZERS, shakespeare_dataset, shakespeare_path, text_dataset
from .downloads import DiskFullError, directory_lock, ensure_writable_dir
from .model import GPT
from .presets import BPE_PRESETS, MOE_VARIANTS, PRESETS, preset
from .tokenizers import start_of_text
from .train import DTYPES, TrainingDiverged, train


def at_least(minimum):
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


# Errors caused by what the user asked for, or met on the way (a full disk, a diverging run): one
# line on stderr, no traceback (exit status 2).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, TimeoutError, DiskFullError, TrainingDiverged)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (the problem) instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv=None):
    parser = OneLineParser(
        prog="python -m moe_tutorial.train",
        description="Train a GPT or an MoE on tiny Shakespeare or your own text, print val loss and a sample. "
                    "Runs data parallel under torchrun (--nproc_per_node=N).",
    )
    parser.add_argument("--preset", default="char", choices=sorted(PRESETS), help="model + recipe")
    parser.add_argument("--variant", choices=sorted(MOE_VARIANTS),
                        help="MoE layers of the course's sweep for the preset's model (dense: none)")
    parser.add_argument("--data", metavar="PATH",
                        help="your own text: a UTF-8 file or a folder of .txt files (default: tiny Shakespeare)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS,
                        help="char: a vocabulary of the text's characters; gpt2: GPT-2's BPE (default: the preset's)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: shard each MoE layer's experts over the ranks "
                             "(its checkpoint: the folder OUT_DIR/ckpt-sharded)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard every parameter over the ranks (FSDP2), for models too big to "
                             "replicate (its checkpoint: the folder OUT_DIR/ckpt-sharded)")
    parser.add_argument("--max-iters", type=at_least(1), help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=at_least(1), help="sequences per rank per step (default: the preset's)")
    parser.add_argument("--grad-accum", type=at_least(1),
                        help="micro-batches per optimizer step (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (for long runs on a GPU)")
    parser.add_argument("--muon-experts", action=argparse.BooleanOptionalAction,
                        help="with a Muon preset: orthogonalise each expert's matrices too (char-modern's default), "
                             "or with --no-muon-experts give the stacked experts AdamW")
    parser.add_argument("--out-dir", default="out", help="where ckpt.pt is written (default: out)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--overwrite", action="store_true", help="start afresh and replace OUT_DIR/ckpt.pt")
    parser.add_argument("--sample", type=at_least(0), default=300, metavar="N",
                        help="tokens to generate after training (0: none)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="float32 or bfloat16 autocast")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--threads", type=at_least(1), help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other: continue the run or replace it, not both")
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
    """Where the checkpoint goes, checked before training: nothing trained is lost by a typo.
    Expert-parallel and FSDP runs write a sharded checkpoint, a folder (moe_tutorial.sharded_checkpoint)."""
    ckpt = Path(args.out_dir) / ("ckpt-sharded" if args.expert_parallel or args.fsdp else "ckpt.pt")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    for flag, wanted in (("--expert-parallel", args.expert_parallel), ("--fsdp", args.fsdp)):
        if wanted and ranks.world_size == 1:
            raise ValueError(f"{flag} needs several ranks: torchrun --nproc_per_node=2 -m moe_tutorial.train ...")
    if args.expert_parallel and args.fsdp:
        raise ValueError("--expert-parallel and --fsdp shard the model in two different ways: choose one")
    if args.expert_parallel and not MOE_VARIANTS.get(args.variant):
        raise ValueError(f"--expert-parallel shards the experts of MoE layers, and --variant {args.variant or 'dense'} "
                         f"has none: choose an MoE --variant, e.g. \"Switch top-1\"")
    with ExitStack() as held:
        error = ckpt = None
        try:  # checked on every rank; under torchrun one rank's error ends all of them
            if args.device:
                check_device(args.device)
            ckpt = check_out_dir(args, ranks)
            if ckpt and ranks.is_main:
                held.enter_context(directory_lock(ckpt.parent))  # one run per out-dir, until this one ends
        except USER_ERRORS as err:
            error = err
        if ranks.world_size > 1:
            distributed.raise_on_every_rank(error)
        elif error is not None:
            raise error
        _train_and_sample(args, ranks, ckpt)


def tokenizer_name(args) -> str:
    """--tokenizer, by default the preset's: GPT-2's BPE for the GPT-2 presets, characters otherwise."""
    return args.tokenizer or ("gpt2" if args.preset in BPE_PRESETS else "char")


def load_dataset(args, ranks):
    """Tiny Shakespeare or --data, in the tokenizer's tokens."""
    tokenizer = tokenizer_name(args)
    progress = not args.no_progress and ranks.is_main
    if args.data:
        return text_dataset(args.data, tokenizer, progress)
    if tokenizer == "char":
        return shakespeare_dataset(progress)
    dataset = text_dataset(shakespeare_path(progress), tokenizer, progress)
    dataset.source = "tiny Shakespeare"  # not the cache's path
    return dataset


def tokenizer_record(dataset, tokenizer: str) -> dict:
    """What the checkpoint stores to read and write text as this run does (moe_tutorial.sample)."""
    record = {"tokenizer": tokenizer, "data": dataset.source}
    if tokenizer == "char":
        record["chars"] = dataset.tokenizer.chars
    return record


def speed_line(model, history, ranks, device: str) -> str:
    """Training tokens per second (over all ranks, evaluations included) and, on a GPU whose peak
    bf16 FLOP/s is known, the model-FLOPs utilisation (moe_tutorial.costs)."""
    tokens_per_s = history.tokens * ranks.world_size / max(history.elapsed, 1e-9)
    line = f"{tokens_per_s:,.0f} tokens/s"
    if device.startswith("cuda") and (peak := peak_tflops(torch.cuda.get_device_name())):
        mfu = model_info(model.config).train_flops_per_token * tokens_per_s / (peak * 1e12 * ranks.world_size)
        line += f", MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s per GPU"
    return line


def _train_and_sample(args, ranks, ckpt):
    overrides = {k: v for k, v in dict(max_iters=args.max_iters, seed=args.seed, batch_size=args.batch_size,
                                         grad_accum_steps=args.grad_accum, dtype=args.dtype,
                                         device=args.device).items() if v is not None}
    if args.device and args.device.startswith("cuda") and ranks.world_size > 1:
        overrides["device"] = f"cuda:{ranks.local_rank}"
    if args.no_progress:
        overrides["progress"] = False
    if args.compile:
        overrides["compile"] = True
    if args.muon_experts is not None:  # else the preset's
        overrides["muon_experts"] = args.muon_experts
    dataset = load_dataset(args, ranks)
    tokenizer = tokenizer_name(args)
    model_cfg, train_cfg = preset(args.preset, dataset.tokenizer.vocab_size, variant=args.variant, **overrides)
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg)
    if args.expert_parallel:
        distributed.shard_experts(model)
    if args.fsdp:
        if train_cfg.optimizer == "muon":
            raise ValueError(f"--fsdp shards every matrix over the ranks, and Muon (the {args.preset} preset's "
                             f"optimizer) orthogonalises whole matrices: train this preset without --fsdp")
        distributed.shard_parameters(model)
    history = train(model, dataset, train_cfg, checkpoint_path=ckpt, resume=args.resume,
                    extra={**tokenizer_record(dataset, tokenizer), "preset": args.preset})
    log = print if ranks.is_main else (lambda *a, **k: None)
    params = f"{model.num_params():,} parameters" + (" on rank 0" if args.expert_parallel else "")  # its experts
    log(f"preset {args.preset}{' + ' + args.variant if args.variant else ''} on {dataset.source} ({tokenizer} tokens): "
        f"{params}, {ranks.world_size} rank(s), {train_cfg.max_iters} iters, {history.elapsed:.1f} s, "
        f"{speed_line(model, history, ranks, train_cfg.device)}")
    log(f"val loss {history.final_val_loss:.4f} (train {history.train_loss[-1]:.4f})")
    if args.expert_parallel or args.fsdp:
        log(f"checkpoint: {ckpt}, sharded over {ranks.world_size} ranks; resume it with the same --nproc_per_node, "
            f"or make one ckpt.pt of it: python -m moe_tutorial.sharded_checkpoint {ckpt.parent}")
    else:
        log(f"checkpoint: {ckpt}; sample from it: python -m moe_tutorial.sample --out-dir {ckpt.parent}")
    if args.sample > 0:  # every rank samples: expert-parallel layers need all of them in each forward
        model.eval()
        start = torch.tensor([start_of_text(dataset.tokenizer)], device=train_cfg.device)
        out = model.generate(start, args.sample, temperature=0.8, top_k=40,
                             generator=torch.Generator(device=train_cfg.device).manual_seed(0))
        log("-" * 40)
        log(dataset.tokenizer.decode(out[0, start.size(1):].tolist()))


if __name__ == "__main__":
    main()

