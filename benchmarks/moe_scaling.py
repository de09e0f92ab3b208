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

Each finished run is appended to benchmarks/results/moe_scaling.json at once (one record per
run, with the machine and the command), so an interrupted sweep continues where it stopped. A
run's `seconds` is its own wall time (training plus one final evaluation): run the time phase on an
otherwise idle machine, since a shared one changes both the probe and the run.
Mean +- sd over seeds; a difference under 2 sd of the difference (sqrt(sd_a^2 + sd_b^2)) is a tie.
"""

import argparse
import dataclasses
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_tutorial.costs import model_info
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.downloads import atomic_path
from moe_tutorial.evaluate import estimate_loss, fixed_batches
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.seeds import verdict_of_stats
from moe_tutorial.sweep import AUX_FREE, EVERY_OTHER, FAMILIES, VARIANTS, moe_config
from moe_tutorial.train import train

RESULTS = Path(__file__).resolve().parent / "results" / "moe_scaling.json"
SEEDS = (1337, 1338, 1339)
STEPS = 1800  # the char recipe
LONG_STEPS = 2 * STEPS
TIME_BUDGETS = (120.0, 300.0)  # seconds of training per run in the equal-time comparison
PROBE_STEPS = 40  # timed steps that set an equal-time run's step count, measured just before it

QUICK_VARIANTS = ("dense", "top-1 E=8", "E=32 k=4 (C)")
QUICK_STEPS, QUICK_BUDGET = 60, 3.0  # --quick: equal steps, and one equal-time run of dense and its best MoE
PHASES = ("steps", "derived", "speed", "long", "time")


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


def load(path: Path) -> list:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def append(path: Path, record: dict):
    runs = load(path) + [record]
    with atomic_path(path) as tmp:  # an interrupted write never corrupts earlier runs
        tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def key(r):
    return (r["comparison"], r["variant"], r["seed"], r.get("budget_seconds") or r["steps"])


def stats(runs, comparison, budget):
    """{variant: (mean, sd, n)} of val loss for one comparison and budget (steps, or seconds)."""
    groups = {}
    for r in runs:
        if r["comparison"] == comparison and (r.get("budget_seconds") or r["steps"]) == budget:
            groups.setdefault(r["variant"], []).append(r["val_loss"])
    return {v: (statistics.mean(x), statistics.stdev(x) if len(x) > 1 else float("nan"), len(x))
            for v, x in groups.items()}


def timed_runs(runs, budget) -> dict:
    """{variant: equal-time runs at this budget (seconds), by seed}."""
    timed = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["comparison"] == "equal_time" and r["budget_seconds"] == budget:
            timed.setdefault(r["variant"], []).append(r)
    return timed


def step_times(runs) -> dict:
    """{variant: seconds per step}, from the latest speed measurement of each variant."""
    return {r["variant"]: r["seconds_per_step"] for r in runs if r["comparison"] == "step_time"}


def verdict(a, b) -> str:
    """a vs b (mean, sd, ...): 'better' / 'worse' when lower / higher by more than 2 sd, else 'tie'
    (the rule of moe_tutorial.seeds, in this report's words)."""
    if math.isnan(a[1]) or math.isnan(b[1]):
        return "n<2"  # one seed says nothing about noise: no verdict
    return {"lower": "better", "higher": "worse", "tie": "tie"}[verdict_of_stats(a[0], a[1], b[0], b[1])]


def ranking(runs, steps=STEPS) -> list:
    """MoE variants by mean val loss at `steps`, best first."""
    table = {v: s for v, s in stats(runs, "equal_steps", steps).items() if v != "dense"}
    return sorted(table, key=lambda v: table[v][0])


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
    report(load(args.out), args.out)


def sweep(args):
    dataset = shakespeare_dataset(progress=False)
    n_batches = 10 if args.quick else 100  # the quick subset checks the machinery, not the losses
    eval_sets = {split: fixed_batches(dataset.split(split), n_batches, 16, 64, seed=0) for split in ("train", "val")}
    done = {key(r) for r in load(args.out)}
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
        if not step_times(load(args.out)):
            measure_speed(QUICK_VARIANTS, steps=5, rounds=1)
        equal_time([QUICK_BUDGET], SEEDS[:1], ranking(load(args.out), QUICK_STEPS)[:1], probe_steps=5)
        return
    if "steps" in args.phases:
        for seed in SEEDS:  # seed-major: a partial sweep already has one run of every variant
            for variant in args.variants or VARIANTS:
                run("equal_steps", variant, seed, STEPS)
    best = ranking(load(args.out))[:1]
    if "derived" in args.phases and best:
        for seed in SEEDS:
            for variant in (best[0] + EVERY_OTHER, best[0] + AUX_FREE):
                run("equal_steps", variant, seed, STEPS)
    if "speed" in args.phases:
        trained = sorted({r["variant"] for r in load(args.out) if r["comparison"] == "equal_steps"})
        if set(trained) - set(step_times(load(args.out))):
            measure_speed(trained)  # all together, so that the ratios come from one sitting
    best = ranking(load(args.out))[:1]
    if "long" in args.phases and best:
        for seed in SEEDS:
            for variant in ["dense"] + best:
                if args.variants is None or variant in args.variants:
                    run("equal_steps", variant, seed, LONG_STEPS)
    if "time" in args.phases and best:
        equal_time(TIME_BUDGETS, SEEDS, best)


def report(runs, path):
    if not runs:
        print(f"no runs in {path}")
        return
    per_step = step_times(runs)  # speed phase; an equal-time row shows its runs' own probes instead
    budgets = sorted({("equal_steps", r["steps"]) for r in runs if r["comparison"] == "equal_steps"}
                     | {("equal_time", r["budget_seconds"]) for r in runs if r["comparison"] == "equal_time"})
    meta = {r["variant"]: r for r in runs if "total_params" in r}
    print(f"{'comparison':<12}{'budget':<12} {'variant':<46}{'n':>2}{'val loss':>18}{'vs dense':>10}  {'verdict':<8}"
          f"{'total':>10}{'active':>9}{'ms/step':>8}{'x dense':>8}  equal time: steps, own seconds")
    for comparison, budget in budgets:
        table = stats(runs, comparison, budget)
        dense = table.get("dense")
        unit = "steps" if comparison == "equal_steps" else "s"
        timed = timed_runs(runs, budget) if comparison == "equal_time" else {}
        speed = {v: statistics.mean(r["seconds_per_step"] for r in rs) for v, rs in timed.items()} or per_step
        for v, s in sorted(table.items(), key=lambda kv: kv[1][0]):
            delta = f"{s[0] - dense[0]:+.4f}" if dense else ""
            call = verdict(s, dense) if dense and v != "dense" else ""
            ms = f"{1e3 * speed[v]:.1f}" if v in speed else "-"
            ratio = f"{speed[v] / speed['dense']:.2f}" if v in speed and "dense" in speed else "-"
            own = "  " + ", ".join(f"{r['steps']} in {r['seconds']:.0f} s" for r in timed[v]) if v in timed else ""
            print(f"{comparison:<12}{budget:>5g} {unit:<6}{v:<46}{s[2]:>2}{s[0]:>10.4f} ± {s[1]:.4f}{delta:>10}  "
                  f"{call:<8}{meta[v]['total_params']:>10,}{meta[v]['active_params']:>9,}{ms:>8}{ratio:>8}{own}")
    plot(runs, path.with_suffix(".png"))


def plot(runs, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = stats(runs, "equal_steps", STEPS)
    for label, members in FAMILIES.items():
        points = [(moe_config(v).n_experts, table[v]) for v in members if v in table]
        if points:
            ax1.errorbar([e for e, _ in points], [s[0] for _, s in points], yerr=[s[1] for _, s in points],
                         marker="o", capsize=3, label=label)
    if "dense" in table:
        mean, sd = table["dense"][:2]
        ax1.axhspan(mean - sd, mean + sd, color="grey", alpha=0.25)
        ax1.axhline(mean, color="grey", label="dense (mean ± sd)")
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="routed experts per MoE layer", ylabel=f"validation loss after {STEPS} steps",
            title="Equal steps, equal active compute per token")
    ax1.legend(fontsize=8)
    budgets = sorted({r["budget_seconds"] for r in runs if r["comparison"] == "equal_time"})
    curves = {}  # variant: [(budget, val losses, steps)], from the equal-time runs alone
    for budget in budgets:
        for variant, rs in timed_runs(runs, budget).items():
            steps = sorted(r["steps"] for r in rs)  # each run's own probe sets its steps
            curves.setdefault(variant, []).append((budget, [r["val_loss"] for r in rs], f"{steps[0]}–{steps[-1]}"))
    for variant, points in curves.items():
        ax2.errorbar([b for b, _, _ in points], [statistics.mean(v) for _, v, _ in points],
                     yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v, _ in points],
                     marker="o", capsize=3, label=variant)
        for b, v, n in points:
            ax2.annotate(f"{n} steps", (b, statistics.mean(v)), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax2.set(xlabel="training budget (seconds on this machine)", ylabel="validation loss",
            title="Equal wall time: as many steps as fit")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"plot: {png.name} beside the JSON")


if __name__ == "__main__":
    main()
