"""The course's char recipes against nanoGPT's CPU recipe, trained in the same run.

    python benchmarks/char_gpt.py                      # the three presets, 2 threads, one seed
    python benchmarks/char_gpt.py --seeds 3            # each preset with seeds 1337, 1338, 1339
    python benchmarks/char_gpt.py --presets char       # only one

Presets: nanoGPT's CPU recipe (the reference), `char` (same model, the course's schedule) and
`char-modern` (notebook 07: the modern block, trained with Muon, for as many steps as fit the
reference's time). Prints val loss (mean over 100 fixed validation batches at each model's own
context length) and wall time of training, and the ratio of each time to the reference's; with
several seeds, mean +- sd, runs interleaved (seed-major) so that machine drift hits every preset.
"""

import argparse
import statistics
import time

import torch

from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.train import train

REFERENCE = "nanogpt-cpu"


def run(name, dataset, **overrides):
    model_cfg, train_cfg = preset(name, dataset.tokenizer.vocab_size, progress=False, **overrides)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    t0 = time.perf_counter()
    train(model, dataset, train_cfg)
    seconds = time.perf_counter() - t0
    val = fixed_batches(dataset.val, 100, 16, model_cfg.block_size, seed=0)
    return dict(preset=name, params=model.num_params(), iters=train_cfg.max_iters,
                seconds=seconds, val_loss=estimate_loss(model, val, train_cfg))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[REFERENCE, "char", "char-modern"])
    parser.add_argument("--seeds", type=int, default=1, help="seeds per preset (1337, 1338, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-iters", type=int, help="override every preset's iterations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = shakespeare_dataset(progress=False)
    overrides = {"max_iters": args.max_iters} if args.max_iters else {}
    runs = [run(name, dataset, seed=1337 + i, **overrides) for i in range(args.seeds) for name in args.presets]
    rows = [summarise([r for r in runs if r["preset"] == name]) for name in args.presets]
    ref = next((r for r in rows if r["preset"] == REFERENCE), rows[0])
    print(f"{'preset':<14}{'params':>10}{'iters':>7}{'seeds':>6}{'seconds':>9}{'x ref':>7}{'val loss':>18}")
    for r in rows:
        print(f"{r['preset']:<14}{r['params']:>10,}{r['iters']:>7}{r['n']:>6}{r['seconds']:>9.1f}"
              f"{r['seconds'] / ref['seconds']:>7.2f}{r['val_loss']:>10.4f} ± {r['val_sd']:.4f}")


def summarise(runs):
    """One preset's runs: mean seconds and val loss, and the val loss's sd over seeds (0 for one)."""
    vals = [r["val_loss"] for r in runs]
    return dict(runs[0], n=len(runs), seconds=statistics.mean(r["seconds"] for r in runs),
                val_loss=statistics.mean(vals), val_sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)

if __name__ == "__main__":
    main()
