"""A modern MoE against the modern dense model (notebook 07): the char-modern recipe, 3 seeds.

    python benchmarks/modern_moe.py                          # every phase (resumable: skips runs in the JSON)
    python benchmarks/modern_moe.py --phases race --budgets 120
    python benchmarks/modern_moe.py --report                 # the tables from the JSON alone
    python benchmarks/modern_moe.py --quick --out /tmp/q.json   # seconds: checks the machinery (tests)

Every model is the `char-modern` preset: the modern block (RMSNorm, RoPE, SwiGLU, per-head QK-norm),
Muon for the blocks' 2-D matrices, AdamW for the rest. The MoE is the experts sweep's best variant
(`moe_tutorial.sweep`: 32 experts, 3 routed + 1 shared, aux-loss-free balancing) at the dense model's
*active* compute: SwiGLU's dense MLP is 336 wide, so each expert is 336 / 4 = 84 wide. It trains at
capacity factor 1.25 and is evaluated dropless, as generation runs it. The one change under test is
what updates the experts' stacked (E, C, 2H) and (E, H, C) weights: AdamW, or Muon on each expert's
matrix (optimizers.ExpertMuon, as Moonlight and Kimi K2 train their experts).

Phases (--phases picks some); each over 3 seeds, mean +- sd, a difference under 2 sd is a tie:
  steps   equal steps: the recipe's 1150 steps
  long    equal steps at 2x (2300)
  race    equal wall time: dense and the Muon-experts MoE alternate, each trains until its budget
          (--budgets, seconds of training) is spent; the learning rate follows the elapsed
          fraction of the budget (warmup, then cosine, the recipe's shape), so no run's schedule
          rests on a guess of its speed. Run it on an otherwise idle machine.

Val and train loss: 100 fixed batches of 16 x 64 characters (the experts sweep's), dropless.
Each finished run is appended to benchmarks/results/modern_moe.json (one record per run, with the
machine and the command).
"""

import argparse
import dataclasses
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_tutorial.config import MoEConfig
from moe_tutorial.costs import model_info
from moe_tutorial.data import get_batch, shakespeare_dataset
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.moe import dropless
from moe_tutorial.optimizers import make_optimizer
from moe_tutorial.presets import MODERN_STEPS, preset
from moe_tutorial.sweep import budget_of, load_runs, summaries, verdict_of_summaries
from moe_tutorial.train import learning_rate_at, train, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_scaling import SEEDS, append, key, machine

RESULTS = Path(__file__).resolve().parent / "results" / "modern_moe.json"
PHASES = ("steps", "long", "race")
BUDGETS = (120.0, 300.0, 600.0)  # seconds of training per race run

# The sweep's "E=32 k=3 (C) + shared, aux-loss-free" at SwiGLU's widths: 4 active experts of 84 = 336.
FINE_GRAINED = dict(n_experts=32, top_k=3, n_shared_experts=1, expert_hidden=84, aux_loss_coef=0.0,
                    bias_update_rate=1e-3)
VARIANTS = {  # name: (MoEConfig fields or None, TrainConfig fields)
    "dense": (None, dict(muon_experts=False)),  # no experts: the flag changes nothing, and the record says so
    "fine-grained + shared, AdamW experts": (FINE_GRAINED, dict(muon_experts=False)),
    "fine-grained + shared, Muon experts": (FINE_GRAINED, dict(muon_experts=True)),
}
DENSE, BEST = "dense", "fine-grained + shared, Muon experts"  # the race's two runners
QUICK_STEPS, QUICK_BUDGET, QUICK_SEEDS = 8, 2.0, SEEDS[:2]  # --quick: two seeds, no long phase


def build(name, vocab_size, seed, steps):
    moe, train_fields = VARIANTS[name]
    model_cfg, train_cfg = preset("char-modern", vocab_size, progress=False, seed=seed, max_iters=steps,
                                  eval_interval=steps, eval_iters=1, **train_fields)
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(model_cfg, moe=MoEConfig(**moe) if moe else None)), train_cfg


def train_for_seconds(model, dataset, cfg, budget: float) -> int:
    """Train until `budget` seconds are spent; returns the steps taken. The learning rate at elapsed
    fraction f of the budget is the recipe's at step f * max_iters (warmup, then cosine), so a slow
    model gets the whole schedule in fewer steps instead of being cut off mid-decay."""
    optimizer = make_optimizer(model, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    model.train()
    steps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget:
        lr = learning_rate_at(math.floor(elapsed / budget * cfg.max_iters), cfg)
        batch = get_batch(dataset.train, cfg.batch_size, model.config.block_size, rng)
        train_step(model, model, optimizer, [batch], cfg, lr)
        steps += 1
    return steps


def run_one(comparison, name, seed, steps, dataset, eval_sets, threads, budget=None) -> dict:
    model, cfg = build(name, dataset.tokenizer.vocab_size, seed, steps)
    t0 = time.perf_counter()
    if budget is None:
        train(model, dataset, cfg)
    else:
        steps = train_for_seconds(model, dataset, cfg, budget)
    seconds = time.perf_counter() - t0
    with dropless(model):  # what generation does: every token reaches its experts
        val_loss, train_loss = (estimate_loss(model, eval_sets[s], cfg) for s in ("val", "train"))
    info, moe = model_info(model.config), model.config.moe
    return dict(
        comparison=comparison, block="modern", variant=name, seed=seed,
        steps=steps, **({"budget_seconds": budget} if budget is not None else {}),
        val_loss=round(val_loss, 5), train_loss=round(train_loss, 5), evaluated="dropless",
        seconds=round(seconds, 2), seconds_per_step=round(seconds / steps, 4),
        active_params=info.active_params, total_params=info.total_params,
        n_experts=moe.n_experts if moe else 0, top_k=moe.top_k if moe else 0,
        expert_hidden=model.config.expert_width if moe else model.config.mlp_width,
        n_shared_experts=moe.n_shared_experts if moe else 0, aux_loss_free=bool(moe and moe.bias_update_rate > 0),
        capacity_factor_train=moe.capacity_factor_train if moe else None,
        optimizer=cfg.optimizer, muon_experts=cfg.muon_experts,
        machine=machine(threads), command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON of runs (appended to)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="race budgets, seconds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help="train only these in the steps and long phases (e.g. --phases long --variants dense)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps and {QUICK_BUDGET:g} s races, 2 seeds: the machinery only")
    parser.add_argument("--report", action="store_true", help="only print the tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        sweep(args)
    print(report(load_runs(args.out)))


def sweep(args):
    dataset = shakespeare_dataset(progress=False)
    n_batches = 2 if args.quick else 100
    eval_sets = {split: fixed_batches(dataset.split(split), n_batches, 16, 64, seed=0) for split in ("train", "val")}
    done = {key(r) for r in load_runs(args.out)}
    steps = QUICK_STEPS if args.quick else MODERN_STEPS
    budgets = [QUICK_BUDGET] if args.quick else args.budgets
    seeds = QUICK_SEEDS if args.quick else SEEDS
    phases = [p for p in args.phases if not (args.quick and p == "long")]

    def run(comparison, name, seed, n_steps, budget=None):
        if (comparison, name, seed, budget or n_steps) in done:
            return
        record = run_one(comparison, name, seed, n_steps, dataset, eval_sets, args.threads, budget)
        append(args.out, record)
        print(f"{comparison:<12}{name:<40}seed {seed}  {record['steps']:>5} steps  val {record['val_loss']:.4f}  "
              f"{record['seconds']:.0f} s", flush=True)

    for phase, n_steps in (("steps", steps), ("long", 2 * steps)):
        if phase in phases:
            for seed in seeds:
                for name in args.variants:
                    run("equal_steps", name, seed, n_steps)
    if "race" in phases:
        for budget in budgets:
            for seed in seeds:
                for name in (DENSE, BEST):  # alternating, so a drift in machine speed hits both
                    run("equal_time", name, seed, steps, budget)


def report(runs) -> str:
    """One table per comparison and budget: each variant's val loss over seeds against the modern
    dense model's (modern block), its seconds per step relative to dense's, and its parameters."""
    lines = []
    budgets = sorted({(r["comparison"], budget_of(r)) for r in runs})
    for comparison, budget in budgets:
        rows = summaries(runs, comparison, budget)
        unit = "steps" if comparison == "equal_steps" else "s of training"
        lines.append(f"\n{comparison} at {budget:g} {unit} (val loss, dropless; mean ± sd over seeds)")
        lines.append(f"{'variant':<40}{'n':>2}{'val loss':>18}{'vs dense':>10}  {'verdict':<7}{'steps':>7}"
                     f"{'s/step':>8}{'x dense':>8}{'total':>10}{'active':>9}")
        per_step = {n: mean_of(runs, "seconds_per_step", comparison, budget, n) for n in rows}
        for name in [n for n in VARIANTS if n in rows]:
            mean, sd, n = rows[name]
            mine = [r for r in runs if r["variant"] == name]
            steps = mean_of(runs, "steps", comparison, budget, name)
            diff = call = ""
            if name != DENSE and DENSE in rows:
                diff, call = f"{mean - rows[DENSE][0]:+.4f}", verdict_of_summaries(rows[name], rows[DENSE])
            ratio = per_step[name] / per_step[DENSE] if DENSE in per_step else float("nan")
            sd_text = f"{sd:.4f}" if n > 1 else "  -   "
            lines.append(f"{name:<40}{n:>2}{mean:>10.4f} ± {sd_text}{diff:>10}  {call:<7}{steps:>7.0f}"
                         f"{per_step[name]:>8.3f}{ratio:>8.2f}{mine[0]['total_params']:>10,}{mine[0]['active_params']:>9,}")
    return "\n".join(lines)


def mean_of(runs, field, comparison, budget, variant) -> float:
    """One field of a variant's runs at one comparison and budget, averaged over its seeds."""
    return statistics.mean(r[field] for r in runs if r["comparison"] == comparison and r["variant"] == variant
                           and budget_of(r) == budget)


if __name__ == "__main__":
    main()
