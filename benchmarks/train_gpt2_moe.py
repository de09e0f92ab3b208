"""GPU training throughput and model-FLOPs utilisation (MFU) of GPT-2 124M and a GPT-2 MoE.

    python benchmarks/train_gpt2_moe.py                     # needs CUDA; says why it skips otherwise
    python benchmarks/train_gpt2_moe.py --smoke             # the same code on CPU, tiny model, 2 steps

The course's own training step (moe_tutorial.train.train_step: bf16 autocast, auxiliary losses,
clipping, fused AdamW), SDPA attention, torch.compile, random tokens (throughput does not depend
on the data). MFU = model FLOPs per token (moe_tutorial.costs, active parameters only)
x tokens per second / the GPU's peak dense bf16 FLOP/s.
"""

import argparse
import sys
import time

import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.costs import model_info, peak_tflops
from moe_tutorial.model import GPT
from moe_tutorial.presets import gpt2_config
from moe_tutorial.train import TrainConfig, make_optimizer, train_step


def throughput(config: GPTConfig, batch_size, steps, device, compile_model):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    cfg = TrainConfig(batch_size=batch_size, learning_rate=1e-4, min_lr=0.0, dtype="bfloat16", device=device)
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if compile_model else model
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size), device=device)
    y = torch.roll(x, -1, dims=1)

    def step():  # the course's training step: bf16 autocast, aux losses, clipping, fused AdamW
        train_step(net, model, optimizer, [(x, y)], cfg, lr=cfg.learning_rate)

    for _ in range(3):  # compile and warm up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return batch_size * config.block_size / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-moe-16x"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak bf16 TFLOP/s, if not in the table")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, to test this script")
    args = parser.parse_args()

    if args.smoke:
        device, name, configs = "cpu", "CPU (smoke test)", {
            "tiny dense": GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True),
            "tiny MoE": GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=True,
                                  moe=MoEConfig(n_experts=4, every=2))}
        args.batch_size, args.steps, args.no_compile = 2, 2, True
    elif not torch.cuda.is_available():
        print("skipped: no CUDA device (this benchmark measures GPU training; --smoke runs it on CPU)")
        return 0
    else:
        device, name = "cuda", torch.cuda.get_device_name()
        configs = {m: gpt2_config(m) for m in args.models}
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = args.peak_tflops or peak_tflops(name)
    print(f"{name}; batch {args.batch_size} x block; bf16 autocast; compile={not args.no_compile}")
    print(f"{'model':<22}{'total M':>9}{'active M':>10}{'GFLOP/tok':>11}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}")
    for model_name, config in configs.items():
        info = model_info(config)
        tokens_per_s = throughput(config, args.batch_size, args.steps, device, not args.no_compile)
        achieved = info.train_flops_per_token * tokens_per_s / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        print(f"{model_name:<22}{info.total_params / 1e6:>9.1f}{info.active_params / 1e6:>10.1f}"
              f"{info.train_flops_per_token / 1e9:>11.3f}{tokens_per_s:>12,.0f}{achieved:>9.1f}{mfu:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
