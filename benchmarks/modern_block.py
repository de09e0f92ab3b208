"""GPT-2's block vs the modern block (notebook 07), dense and MoE, three routers, and what each
piece of the modern block buys (the dense modern block with one piece put back to GPT-2's), on the
char recipe: equal steps (1800), 3 seeds, mean +- sd; a difference under 2 sd is a tie.

    python benchmarks/modern_block.py            # resumable: skips runs already in the JSON
    python benchmarks/modern_block.py --report   # the table from the JSON alone

The modern block is RMSNorm + rotary positions + SwiGLU + per-head QK-norm with all 4 heads for keys
and values (grouped-query attention saves cache memory, not quality, and would change the
parameter count). Its SwiGLU widths keep the GPT-2 block's parameters within 2%: 8C/3 ~ 336 for the
dense MLP, 172 for experts that GELU makes 2C = 256 wide; it has no position table (RoPE learns
nothing). The table prints every variant's total and active parameters.

The GPT-2-block runs are the experts sweep's (benchmarks/moe_scaling.py, same recipe and seeds:
"dense" and "E=16 k=2 (2C)"): training is deterministic on CPU, so they are read from its JSON
rather than trained twice.
"""

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

from moe_tutorial.config import MoEConfig
from moe_tutorial.costs import model_info
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import MODERN_BLOCK, preset
from moe_tutorial.sweep import RESULTS as SWEEP_RESULTS
from moe_tutorial.sweep import load_runs, summaries
from moe_tutorial.sweep import verdict_of_summaries as verdict  # notebook 07 calls modern_block.verdict
from moe_tutorial.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_scaling import SEEDS, STEPS, append, machine

RESULTS = Path(__file__).resolve().parent / "results" / "modern_block.json"
MODERN = MODERN_BLOCK  # RMSNorm, RoPE, SwiGLU, per-head QK-norm
TOP2 = dict(n_experts=16, top_k=2)  # the sweep's "E=16 k=2 (2C)": 2 of 16 experts, each 2C wide
DEEPSEEK = dict(scoring="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=1e-4, bias_update_rate=1e-3)
VARIANTS = {  # name: (GPTConfig fields, MoEConfig fields or None)
    "modern dense": (MODERN, None),
    "modern MoE, softmax top-2": (MODERN, dict(TOP2, expert_hidden=172)),
    "modern MoE, sigmoid + bias": (MODERN, dict(TOP2, expert_hidden=172, **DEEPSEEK)),
    "modern MoE, sigmoid + bias, 2 of 4 groups": (MODERN, dict(TOP2, expert_hidden=172, n_group=4, topk_group=2,
                                                               **DEEPSEEK)),
}
# Leave one out: the modern dense block with one piece as GPT-2 has it (at equal parameters: a GELU
# MLP of 4C has the parameters of a SwiGLU of 8C/3; a learned position table adds block_size * C).
# QK-norm is an RMSNorm, so LayerNorm is put back in the block without it, and compared with that block.
ABLATIONS = {
    "modern dense, learned positions for RoPE": dict(MODERN, position="learned"),
    "modern dense, GELU for SwiGLU": dict(MODERN, activation="gelu"),
    "modern dense, no QK-norm": dict(MODERN, qk_norm="none"),
    "modern dense, no QK-norm, LayerNorm": dict(MODERN, qk_norm="none", norm="layernorm"),
}
VARIANTS |= {name: (block, None) for name, block in ABLATIONS.items()}
FROM_SWEEP = {"GPT-2 dense": "dense", "GPT-2 MoE, softmax top-2": "E=16 k=2 (2C)"}
BASELINE = {"modern dense": "GPT-2 dense", "modern MoE, softmax top-2": "GPT-2 MoE, softmax top-2",
            "modern MoE, sigmoid + bias": "modern MoE, softmax top-2",
            "modern MoE, sigmoid + bias, 2 of 4 groups": "modern MoE, sigmoid + bias"}
BASELINE |= {name: "modern dense" for name in ABLATIONS}
BASELINE["modern dense, no QK-norm, LayerNorm"] = "modern dense, no QK-norm"


def build(name, vocab_size, seed):
    block, moe = VARIANTS[name]
    model_cfg, train_cfg = preset("char", vocab_size, progress=False, seed=seed, eval_interval=STEPS)
    model_cfg = dataclasses.replace(model_cfg, **block, moe=MoEConfig(**moe) if moe else None)
    torch.manual_seed(seed)
    return GPT(model_cfg), train_cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        sweep(args)
    report(load_runs(args.out), load_runs(SWEEP_RESULTS))


def sweep(args):
    dataset = shakespeare_dataset(progress=False)
    eval_sets = {split: fixed_batches(dataset.split(split), 100, 16, 64, seed=0) for split in ("train", "val")}
    done = {(r["variant"], r["seed"]) for r in load_runs(args.out)}
    for seed in SEEDS:
        for name in VARIANTS:
            if (name, seed) in done:
                continue
            model, cfg = build(name, dataset.tokenizer.vocab_size, seed)
            t0 = time.perf_counter()
            train(model, dataset, cfg)
            seconds = time.perf_counter() - t0
            info = model_info(model.config)
            record = dict(comparison="equal_steps", variant=name, seed=seed, steps=cfg.max_iters,
                          val_loss=round(estimate_loss(model, eval_sets["val"], cfg), 5),
                          train_loss=round(estimate_loss(model, eval_sets["train"], cfg), 5),
                          seconds=round(seconds, 2), total_params=info.total_params,
                          active_params=info.active_params, config=model.config.to_dict(),
                          machine=machine(args.threads),
                          command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
            append(args.out, record)
            print(f"{name:<44}seed {seed}  val {record['val_loss']:.4f}  {seconds:.0f} s", flush=True)


def table(runs, sweep_runs) -> dict:
    """{variant: (mean, sd, n, total params, active params)} for this benchmark's variants and
    the GPT-2-block runs it borrows from the experts sweep."""
    ours = summaries(runs, "equal_steps", STEPS)
    borrowed = summaries(sweep_runs, "equal_steps", STEPS)
    params = {r["variant"]: (r["total_params"], r["active_params"]) for r in runs}
    params |= {name: next((r["total_params"], r["active_params"]) for r in sweep_runs if r["variant"] == v)
               for name, v in FROM_SWEEP.items() if v in borrowed}
    rows = {name: borrowed[v] for name, v in FROM_SWEEP.items() if v in borrowed}
    rows |= ours
    return {name: (*s, *params[name]) for name, s in rows.items()}


def report(runs, sweep_runs):
    rows = table(runs, sweep_runs)
    print(f"{'variant':<44}{'n':>2}{'val loss':>18}  {'vs':<26}{'diff':>8}  {'verdict':<7}{'total':>10}{'active':>9}")
    for name in list(FROM_SWEEP) + list(VARIANTS):
        if name not in rows:
            continue
        mean, sd, n, total, active = rows[name]
        base = BASELINE.get(name)
        diff, call = "", ""
        if base in rows:
            diff, call = f"{mean - rows[base][0]:+.4f}", verdict(rows[name], rows[base])
        print(f"{name:<44}{n:>2}{mean:>10.4f} ± {sd:.4f}  {base or '':<26}{diff:>8}  {call:<7}{total:>10,}{active:>9,}")


if __name__ == "__main__":
    main()
