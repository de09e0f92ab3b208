"""What a Mixture of Experts buys on the char recipe: the experts sweep, with seeds.

    python benchmarks/moe_scaling.py             # the full sweep (resumable: skips runs already in the JSON)
    python benchmarks/moe_scaling.py --report    # table and plots from the JSON alone, no training
    python benchmarks/moe_scaling.py --quick --out /tmp/q.json   # a ~2-minute subset (tests use it)

The variants are `moe_tutorial.sweep.VARIANTS`: every one keeps the dense `char` model's *active*
compute per token (notebook 04 reads the results back with the same names).

Phases, in order (--phases picks some); every training comparison over 3 seeds:
  steps    equal steps: every variant at the recipe's 1800 steps
  derived  the best variant with MoE in every other block, and with aux-loss-free balancing
  speed    seconds per training step of every variant, measured interleaved in one process on an
           otherwise idle machine (a "step_time" record each): the step-cost table
  long     equal steps at 2x the budget, for dense and the best MoE
  time     equal wall time: dense and the best MoE (alternating), each for as many steps as fit in
           120 s and in 300 s at the seconds per step measured in the same process just before the
           run (PROBE_STEPS steps after a warm-up); the run records that probe and its own seconds
  routing  the variants whose seeds spread most (DIAGNOSED), trained again with the same seeds to
           record what their routers did: each MoE layer's busiest expert and drops over the last
           100 steps, and the loss and busiest share through training ("routing" records)

Each finished run is appended to benchmarks/results/moe_scaling.json at once (one record per
run, with the machine and the command), so an interrupted sweep continues where it stopped. A
run's `seconds` is its own wall time (training plus one final evaluation): run the time phase on an
otherwise idle machine, since a shared one changes both the probe and the run.
Mean +- sd over seeds; a difference under 2 sd of the difference (sqrt(sd_a^2 + sd_b^2)) is a tie.
"""

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from statistics import mean

import torch

from moe_tutorial.costs import model_info
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.downloads import atomic_path
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.seeds import combined_sd, verdict
from moe_tutorial.sweep import (
    AUX_FREE,
    EVERY_OTHER,
    RESULTS,
    VARIANTS,
    format_table,
    load_runs,
    moe_config,
    plot_results,
    routing_table,
    step_times,
    summary,
    val_losses,
)
from moe_tutorial.train import train

SEEDS = (1337, 1338, 1339)
STEPS = 1800  # the char recipe
LONG_STEPS = 2 * STEPS
TIME_BUDGETS = (120.0, 300.0)  # seconds of training per run in the equal-time comparison
PROBE_STEPS = 40  # timed steps that set an equal-time run's step count, measured just before it

QUICK_VARIANTS = ("dense", "top-1 E=8", "E=32 k=4 (C)")
QUICK_STEPS, QUICK_BUDGET = 60, 3.0  # --quick: equal steps, and one equal-time run of dense and its best MoE
PHASES = ("steps", "derived", "speed", "long", "time", "routing")
DIAGNOSED = ("top-1 E=16",)  # its 3 seeds spread over 0.24 of val loss, the others' over at most 0.04


def build(name, dataset, seed, steps):
    model_cfg, train_cfg = preset("char", dataset.tokenizer.vocab_size, progress=False, seed=seed,
                                  max_iters=steps, eval_interval=steps)
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(model_cfg, moe=moe_config(name))), train_cfg


def machine(threads) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, threads=threads, torch=torch.__version__)


def run_one(comparison, name, seed, steps, dataset, eval_sets, threads, **extra) -> dict:
    model, cfg = build(name, dataset, seed, steps)
    t0 = time.perf_counter()
    history = train(model, dataset, cfg)
    seconds = time.perf_counter() - t0
    info, moe = model_info(model.config), model.config.moe
    return dict(
        comparison=comparison, variant=name, seed=seed, steps=steps,
        val_loss=round(estimate_loss(model, eval_sets["val"], cfg), 5),
        train_loss=round(estimate_loss(model, eval_sets["train"], cfg), 5),
        seconds=round(seconds, 2), final_step_loss=round(history.loss[-1], 5),
        active_params=info.active_params, total_params=info.total_params,
        n_experts=moe.n_experts if moe else 0, top_k=moe.top_k if moe else 0,
        expert_hidden=(moe.expert_hidden or 4 * model.config.n_embd) if moe else 4 * model.config.n_embd,
        moe_every=moe.every if moe else 0, n_shared_experts=moe.n_shared_experts if moe else 0,
        aux_loss_free=bool(moe and moe.bias_update_rate > 0),
        machine=machine(threads), command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
        **extra,
    )


def run_routing(name, seed, steps, dataset, eval_sets, threads, window=100, every=300) -> dict:
    """Train one run again (same seed, same recipe) and record what its routers did."""
    model, cfg = build(name, dataset, seed, steps)
    history = train(model, dataset, cfg)
    share = torch.tensor(history.expert_load)  # (steps, layers, E): each router's first choices
    dropped = torch.tensor(history.dropped)  # (steps, layers)
    busiest = share.amax(dim=-1)  # (steps, layers)
    return dict(
        comparison="routing", variant=name, seed=seed, steps=steps,
        val_loss=round(estimate_loss(model, eval_sets["val"], cfg), 5),
        max_share=[round(v, 4) for v in busiest[-window:].mean(0).tolist()],  # per layer, last `window` steps
        dropped_pct=[round(100 * v, 2) for v in dropped[-window:].mean(0).tolist()],
        loss_through_training=[round(sum(history.loss[i:i + every]) / len(history.loss[i:i + every]), 4)
                               for i in range(0, steps, every)],  # mean loss of each `every` steps
        max_share_through_training=[round(busiest[i:i + every].max(dim=1).values.mean().item(), 4)
                                    for i in range(0, steps, every)],  # the busiest layer's, per `every` steps
        machine=machine(threads), command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
    )


def append(path: Path, record: dict):
    runs = load_runs(path) + [record]
    with atomic_path(path) as tmp:  # an interrupted write never corrupts earlier runs
        tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def key(r):
    return (r["comparison"], r["variant"], r["seed"], r.get("budget_seconds") or r["steps"])


def ranking(runs, steps=STEPS) -> list:
    """MoE variants by mean val loss at `steps`, best first."""
    losses = {v: x for v, x in val_losses(runs, "equal_steps", steps).items() if v != "dense"}
    return sorted(losses, key=lambda v: statistics.mean(losses[v]))


def seconds_per_step(names, dataset, steps=30, rounds=3):
    """Median seconds per training step of each variant, measured interleaved in this process
    (A, B, C, A, B, C, ...) so that drifts in machine speed hit every variant alike."""
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            model, cfg = build(n, dataset, SEEDS[0], steps)
            cfg = dataclasses.replace(cfg, eval_iters=1)
            train(model, dataset, dataclasses.replace(cfg, max_iters=3, eval_interval=3))  # warm-up, untimed
            t0 = time.perf_counter()
            train(model, dataset, cfg)
            times[n].append((time.perf_counter() - t0) / steps)
    return {n: statistics.median(t) for n, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON of runs (appended to)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a ~2-minute subset: 3 variants x 2 seeds x 60 steps, then 3 s of equal time")
    parser.add_argument("--report", action="store_true", help="only print the table and draw the plots")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                        help="train only these variants in the steps and long phases (to finish the seeds that "
                             "matter first; e.g. --phases long --variants dense)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        sweep(args)
    report(load_runs(args.out), args.out)


def sweep(args):
    dataset = shakespeare_dataset(progress=False)
    n_batches = 10 if args.quick else 100  # the quick subset checks the machinery, not the losses
    eval_sets = {split: fixed_batches(dataset.split(split), n_batches, 16, 64, seed=0) for split in ("train", "val")}
    done = {key(r) for r in load_runs(args.out)}
    command = " ".join(["python"] + [shlex.quote(a) for a in sys.argv])

    def run(comparison, variant, seed, steps, **extra):
        k = (comparison, variant, seed, extra.get("budget_seconds") or steps)
        if k in done:
            return
        record = run_one(comparison, variant, seed, steps, dataset, eval_sets, args.threads, **extra)
        append(args.out, record)
        done.add(k)
        print(f"{comparison:<12}{variant:<46}seed {seed}  {steps:>5} steps  val {record['val_loss']:.4f}  "
              f"{record['seconds']:.0f} s", flush=True)

    def measure_speed(names, **kw):
        for name, sec in seconds_per_step(names, dataset, **kw).items():
            append(args.out, dict(comparison="step_time", variant=name, seed=0, steps=0, seconds_per_step=sec,
                                  machine=machine(args.threads), command=command))

    def equal_time(budgets, seeds, best, probe_steps=PROBE_STEPS):
        for budget in budgets:
            for seed in seeds:
                for variant in ["dense"] + best:  # alternating, so that a drifting machine hits both
                    if ("equal_time", variant, seed, budget) in done:
                        continue  # before probing: a finished run costs nothing
                    per_step = seconds_per_step([variant], dataset, steps=probe_steps, rounds=1)[variant]
                    run("equal_time", variant, seed, max(1, int(budget / per_step)),
                        budget_seconds=budget, seconds_per_step=per_step)

    if args.quick:
        for seed in SEEDS[:2]:
            for variant in QUICK_VARIANTS:
                run("equal_steps", variant, seed, QUICK_STEPS)
        if not step_times(load_runs(args.out)):
            measure_speed(QUICK_VARIANTS, steps=5, rounds=1)
        equal_time([QUICK_BUDGET], SEEDS[:1], ranking(load_runs(args.out), QUICK_STEPS)[:1], probe_steps=5)
        return
    if "steps" in args.phases:
        for seed in SEEDS:  # seed-major: a partial sweep already has one run of every variant
            for variant in args.variants or VARIANTS:
                run("equal_steps", variant, seed, STEPS)
    best = ranking(load_runs(args.out))[:1]
    if "derived" in args.phases and best:
        for seed in SEEDS:
            for variant in (best[0] + EVERY_OTHER, best[0] + AUX_FREE):
                run("equal_steps", variant, seed, STEPS)
    if "speed" in args.phases:
        trained = sorted({r["variant"] for r in load_runs(args.out) if r["comparison"] == "equal_steps"})
        if set(trained) - set(step_times(load_runs(args.out))):
            measure_speed(trained)  # all together, so that the ratios come from one sitting
    best = ranking(load_runs(args.out))[:1]
    if "long" in args.phases and best:
        for seed in SEEDS:
            for variant in ["dense"] + best:
                if args.variants is None or variant in args.variants:
                    run("equal_steps", variant, seed, LONG_STEPS)
    if "time" in args.phases and best:
        equal_time(TIME_BUDGETS, SEEDS, best)
    if "routing" in args.phases:
        for variant in DIAGNOSED:
            for seed in SEEDS:
                if ("routing", variant, seed, STEPS) not in done:
                    record = run_routing(variant, seed, STEPS, dataset, eval_sets, args.threads)
                    append(args.out, record)
                    done.add(key(record))
                    print(f"routing     {variant:<46}seed {seed}  val {record['val_loss']:.4f}  busiest expert "
                          f"{record['max_share']}", flush=True)


# The head-to-head comparisons the README quotes, each with its 2 sd (equal steps, the recipe's 1800).
HEAD_TO_HEAD = [
    ("top-1 E=8", "E=16 k=2 (2C)"), ("E=16 k=2 (2C)", "E=32 k=4 (C)"), ("top-1 E=4", "top-1 E=8"),
    ("E=64 k=8 (C/2)", "E=32 k=4 (C)"),  # splitting further without a shared expert
    ("E=64 k=7 (C/2) + shared", "E=64 k=8 (C/2)"), ("E=32 k=3 (C) + shared", "E=32 k=4 (C)"),
    ("E=16 k=1 (2C) + shared", "E=16 k=2 (2C)"),  # a shared expert against the same routed width
    ("E=64 k=7 (C/2) + shared", "E=32 k=3 (C) + shared"),
    ("E=32 k=3 (C) + shared" + EVERY_OTHER, "E=32 k=3 (C) + shared"),  # the derived variants, against their base
    ("E=32 k=3 (C) + shared" + AUX_FREE, "E=32 k=3 (C) + shared"),
]


def comparisons(runs) -> str:
    """The figures behind the README's prose: head-to-head differences with their 2 sd, how the best
    MoE's lead changes from 1800 to 3600 steps, and what the equal-time runs really took."""
    steps = val_losses(runs, "equal_steps", STEPS)
    lines = []

    def line(label, diff, sd, call):
        lines.append(f"{label}: {diff:+.4f} (2 sd {2 * sd:.4f}): {call}")

    for a, b in HEAD_TO_HEAD:
        if a in steps and b in steps and min(len(steps[a]), len(steps[b])) >= 2:
            line(f"{a} vs {b}", mean(steps[a]) - mean(steps[b]), combined_sd(steps[a], steps[b]),
                 verdict(steps[a], steps[b]))
    if all(v in steps for v in HEAD_TO_HEAD[4] + HEAD_TO_HEAD[5]):
        at_64 = mean(steps[HEAD_TO_HEAD[4][0]]) - mean(steps[HEAD_TO_HEAD[4][1]])
        at_32 = mean(steps[HEAD_TO_HEAD[5][0]]) - mean(steps[HEAD_TO_HEAD[5][1]])
        sd = combined_sd(*(steps[v] for v in HEAD_TO_HEAD[4] + HEAD_TO_HEAD[5]))
        line("a shared expert's effect at E=64 minus at E=32", at_64 - at_32, sd,
             "tie" if abs(at_64 - at_32) <= 2 * sd else "differs")
    best = ranking(runs)[:1]
    long = val_losses(runs, "equal_steps", LONG_STEPS)
    if best and best[0] in long and "dense" in long:
        b = best[0]
        lead = {STEPS: mean(steps["dense"]) - mean(steps[b]), LONG_STEPS: mean(long["dense"]) - mean(long[b])}
        change, sd = lead[LONG_STEPS] - lead[STEPS], combined_sd(steps["dense"], steps[b], long["dense"], long[b])
        line(f"{b}, lead over dense at {LONG_STEPS} minus at {STEPS} steps", change, sd,
             "tie" if abs(change) <= 2 * sd else "differs")
        doubling = mean(steps["dense"]) - mean(long["dense"])  # what twice the steps buys dense
        worth = 2 ** (lead[STEPS] / doubling)  # interpolating in log steps (an assumption)
        at_most = 2 ** ((lead[STEPS] + 2 * combined_sd(steps["dense"], steps[b]))
                        / (doubling - 2 * combined_sd(steps["dense"], long["dense"])))
        lines.append(f"dense from {STEPS} to {LONG_STEPS} steps gains {doubling:.4f}: the MoE's lead at {STEPS} "
                     f"steps is worth {worth:.2f}x dense's steps (at most {at_most:.2f}x allowing 2 sd)")
    for budget in sorted({r["budget_seconds"] for r in runs if r["comparison"] == "equal_time"}):
        timed = [r for r in runs if r["comparison"] == "equal_time" and r["budget_seconds"] == budget]
        real = {v: 1e3 * mean([r["seconds"] / r["steps"] for r in timed if r["variant"] == v])
                for v in dict.fromkeys(r["variant"] for r in timed)}
        miss = max(abs(r["seconds_per_step"] / (r["seconds"] / r["steps"]) - 1) for r in timed)
        lines.append(f"equal time {budget:g} s: real ms/step " + ", ".join(f"{v} {ms:.1f}" for v, ms in real.items())
                     + f"; the probes missed the runs' real speed by up to {miss:.0%}")
    return "\n".join(lines)


def report(runs, path):
    if not runs:
        print(f"no runs in {path}")
        return
    rows = summary(runs)
    print(format_table(rows))
    print("\n" + comparisons(runs))
    if any(r["comparison"] == "routing" for r in runs):
        print("\n" + routing_table(runs))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_results(rows, STEPS)
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    print(f"plot: {path.with_suffix('.png').name} beside the JSON")


if __name__ == "__main__":
    main()
