"""Does torch.compile speed up training of the char model, dense and MoE, on this CPU?

    python benchmarks/compile_moe.py                       # float32, dense and two MoEs
    python benchmarks/compile_moe.py --dtypes float32 bfloat16

One optimizer step of the `char` recipe (batch 12 x 64, forward, backward, clipping, AdamW),
eager against `torch.compile(model)`, for the dense model and MoE variants of the experts sweep
(`benchmarks/moe_scaling.py`'s definitions). Compilation happens in untimed warm-up steps and is
reported apart. Under torch.compile the experts take the grouped matmul in bfloat16 and one matmul
per expert in float32 (grouped_mm's traced form accepts bfloat16 only; moe_tutorial/experts.py).
Steps are timed interleaved (eager, compiled, eager, compiled, ...) and the median is kept, so
that drifts in machine speed hit both alike; ratios are within this run.
"""

import argparse
import dataclasses
import itertools
import statistics
import time

import torch
from moe_scaling import build  # the sweep's variants, built exactly as it trains them

from moe_tutorial.data import get_batch, shakespeare_dataset
from moe_tutorial.train import learning_rate_at, make_optimizer, train_step

VARIANTS = ("dense", "top-1 E=8", "E=32 k=3 (C) + shared")


def stepper(name, dataset, dtype, compiled):
    """A function that runs one training step of a fresh model, and the seconds its first
    (compiling) steps took."""
    model, cfg = build(name, dataset, seed=1337, steps=1800)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if compiled else model
    rng = torch.Generator().manual_seed(0)
    step = itertools.count()

    def one_step():
        batch = [get_batch(dataset.train, cfg.batch_size, model.config.block_size, rng)]
        train_step(net, model, optimizer, batch, cfg, learning_rate_at(next(step), cfg))

    model.train()
    t0 = time.perf_counter()
    for _ in range(3):  # compiles here (the forward and the backward graph), and warms up
        one_step()
    return one_step, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = shakespeare_dataset(progress=False)
    print(f"char recipe, one training step, median of {args.steps} interleaved steps, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'variant':<26}{'dtype':<10}{'eager ms':>9}{'compiled ms':>12}{'compiled/eager':>15}{'compile s':>10}")
    for dtype in args.dtypes:
        for name in args.variants:
            torch._dynamo.reset()
            eager, _ = stepper(name, dataset, dtype, compiled=False)
            compiled, compile_seconds = stepper(name, dataset, dtype, compiled=True)
            samples = {"eager": [], "compiled": []}
            for _ in range(args.steps):
                for label, run in (("eager", eager), ("compiled", compiled)):
                    t0 = time.perf_counter()
                    run()
                    samples[label].append(time.perf_counter() - t0)
            e, c = (1e3 * statistics.median(samples[k]) for k in ("eager", "compiled"))
            print(f"{name:<26}{dtype:<10}{e:>9.1f}{c:>12.1f}{c / e:>15.2f}{compile_seconds:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
