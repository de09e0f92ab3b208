"""Dense vs MoE variants on the char model at equal compute per token and equal wall time.

    python benchmarks/moe_vs_dense.py --seconds 100

After a warm-up, every variant's step time is measured (30 steps after 5 untimed ones); then
each trains for as many steps as fit in the budget
(cosine schedule over that many steps, the `char` recipe otherwise). Val loss over 100 fixed
validation batches. Variants: moe_tutorial.presets.MOE_VARIANTS (notebook 04 trains the same).
"""

import argparse
import time

import torch

from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import MOE_VARIANTS, preset
from moe_tutorial.train import train


def build(name, dataset, **train_overrides):
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, variant=name, progress=False,
                                  **train_overrides)
    torch.manual_seed(train_cfg.seed)
    return GPT(model_cfg), train_cfg


def seconds_per_step(name, dataset, steps=30):
    warmup, _ = build(name, dataset, max_iters=5, eval_interval=5, eval_iters=1)
    train(warmup, dataset, _)  # untimed: thread pools and allocator warm up on the first steps
    model, cfg = build(name, dataset, max_iters=steps, eval_interval=steps, eval_iters=1)
    start = time.perf_counter()
    train(model, dataset, cfg)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=100.0, help="training budget per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(MOE_VARIANTS), choices=list(MOE_VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = shakespeare_dataset(progress=False)
    seconds_per_step("dense", dataset, steps=50)  # warm the process up before any estimate counts
    steps = {name: int(args.seconds / seconds_per_step(name, dataset)) for name in args.variants}
    val = None
    rows = []
    for name in args.variants:
        model, cfg = build(name, dataset, max_iters=steps[name], eval_interval=steps[name])
        history = train(model, dataset, cfg)
        val = val or fixed_batches(dataset.val, 100, 16, model.config.block_size, seed=0)
        total = sum(p.numel() for p in model.parameters())
        rows.append((name, total, steps[name], history.elapsed, estimate_loss(model, val, cfg)))
    dense_loss = next((r[4] for r in rows if r[0] == "dense"), None)
    print(f"equal wall time ~{args.seconds:.0f} s per variant, {args.threads} threads")
    print(f"{'variant':<21}{'params':>11}{'steps':>7}{'seconds':>9}{'val loss':>10}{'vs dense':>10}")
    for name, total, steps, seconds, loss in rows:
        delta = f"{loss - dense_loss:+.4f}" if dense_loss is not None else ""
        print(f"{name:<21}{total:>11,}{steps:>7}{seconds:>9.1f}{loss:>10.4f}{delta:>10}")


if __name__ == "__main__":
    main()
