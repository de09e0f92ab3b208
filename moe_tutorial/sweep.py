"""The experts sweep: the MoE variants `benchmarks/moe_scaling.py` trains on the char recipe, one
name for each, and its results read back as one table (the benchmark's --report and notebook 04).

Every variant keeps the dense `char` model's *active* compute per token: a token passes through
experts whose hidden widths add up to the dense MLP's 4C (C = 128). Top-1 variants use full-width
experts; fine-grained ones (DeepSeekMoE) split each expert into m narrower ones and route to m x
more; shared-expert variants turn one of the k active experts into an always-on one.
"""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .config import MoEConfig
from .seeds import verdict_of_stats

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "moe_scaling.json"

# MoEConfig fields of the char model's MoE layers (dense hidden 4C = 512), in every block.
VARIANTS = {
    "dense": {},
    "top-1 E=4": dict(n_experts=4, top_k=1),
    "top-1 E=8": dict(n_experts=8, top_k=1),
    "top-1 E=16": dict(n_experts=16, top_k=1),
    "top-1 E=32": dict(n_experts=32, top_k=1),
    "E=16 k=2 (2C)": dict(n_experts=16, top_k=2, expert_hidden=256),
    "E=32 k=4 (C)": dict(n_experts=32, top_k=4, expert_hidden=128),
    "E=64 k=8 (C/2)": dict(n_experts=64, top_k=8, expert_hidden=64),
    "E=16 k=1 (2C) + shared": dict(n_experts=16, top_k=1, expert_hidden=256, n_shared_experts=1),
    "E=32 k=3 (C) + shared": dict(n_experts=32, top_k=3, expert_hidden=128, n_shared_experts=1),
    "E=64 k=7 (C/2) + shared": dict(n_experts=64, top_k=7, expert_hidden=64, n_shared_experts=1),
}
# A derived variant is a grid variant's name plus one of these suffixes (one change to it).
EVERY_OTHER = ", every other block"
AUX_FREE = ", aux-loss-free"

# The grid's three lines through expert count (the plot's x axis), same compute per token.
FAMILIES = {
    "top-1, full-width experts": ["top-1 E=4", "top-1 E=8", "top-1 E=16", "top-1 E=32"],
    "fine-grained top-k (width 4C/k)": ["E=16 k=2 (2C)", "E=32 k=4 (C)", "E=64 k=8 (C/2)"],
    "fine-grained + 1 shared": ["E=16 k=1 (2C) + shared", "E=32 k=3 (C) + shared", "E=64 k=7 (C/2) + shared"],
}


def base_variant(name: str) -> str:
    """The grid variant a name starts from: "<variant>, every other block" -> "<variant>"."""
    base = name.removesuffix(EVERY_OTHER).removesuffix(AUX_FREE)
    if base not in VARIANTS:
        raise ValueError(f"Unknown sweep variant {name!r}: use one of {sorted(VARIANTS)}, optionally followed by "
                         f"{EVERY_OTHER!r} or {AUX_FREE!r}")
    return base


def moe_config(name: str) -> MoEConfig | None:
    """A variant's MoE layers (None: dense)."""
    fields = dict(VARIANTS[base_variant(name)])
    if not fields:
        if name != "dense":
            raise ValueError(f"{name!r}: dense has no MoE layers to change; use 'dense'")
        return None
    if name.endswith(EVERY_OTHER):
        fields["every"] = 2
    if name.endswith(AUX_FREE):
        fields.update(aux_loss_coef=0.0, bias_update_rate=1e-3)  # DeepSeek-V3's balancing instead
    return MoEConfig(**fields)


# --- the results: one record per training run (and per speed measurement) -----------------------------------------


def load_runs(path: Path = RESULTS) -> list[dict]:
    """The sweep's records (an empty list if the file does not exist yet)."""
    path = Path(path)
    return json.loads(path.read_text())["runs"] if path.exists() else []


def budget_of(run: dict):
    """A run's budget: its steps (equal steps) or its seconds (equal time)."""
    return run.get("budget_seconds") or run["steps"]


def val_losses(runs, comparison: str, budget) -> dict[str, list[float]]:
    """{variant: its seeds' val losses} for one comparison ("equal_steps", "equal_time") and budget."""
    losses = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["comparison"] == comparison and budget_of(r) == budget:
            losses.setdefault(r["variant"], []).append(r["val_loss"])
    return losses


def summary_of(losses) -> tuple:
    """(mean, sd, n) of the seeds' val losses (sd nan for a single seed)."""
    return statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else float("nan"), len(losses)


def summaries(runs, comparison: str, budget) -> dict[str, tuple]:
    """{variant: (mean, sd, n)} for one comparison and budget."""
    return {v: summary_of(x) for v, x in val_losses(runs, comparison, budget).items()}


def step_times(runs) -> dict[str, float]:
    """{variant: seconds per step} from the speed phase, which times every variant in one sitting."""
    return {r["variant"]: r["seconds_per_step"] for r in runs if r["comparison"] == "step_time"}


@dataclass
class Row:
    """One line of the sweep's table: a variant at one comparison and budget, over its seeds."""
    comparison: str
    budget: float  # steps, or seconds of training (equal time)
    variant: str
    losses: list  # one val loss per seed
    vs_dense: float  # mean val loss minus dense's at the same budget
    verdict: str  # against dense: "better" / "worse" (beyond 2 sd), "tie", "n<2", or "" for dense
    total_params: int
    active_params: int
    ms_per_step: float | None  # the speed phase's, or (equal time) the runs' own probes'
    x_dense: float | None  # ms_per_step over dense's, measured in the same sitting
    equal_time_runs: list  # equal time: (steps, own seconds) of each run

    @property
    def mean(self) -> float:
        return statistics.mean(self.losses)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else float("nan")


def verdict_vs(losses, dense) -> str:
    """The 2-sd rule (moe_tutorial.seeds) in the table's words: 'better' is a lower loss."""
    return verdict_of_summaries(summary_of(losses), summary_of(dense))


def verdict_of_summaries(a, b) -> str:
    """verdict_vs from (mean, sd, n, ...) summaries."""
    if a[2] < 2 or b[2] < 2:
        return "n<2"  # one seed says nothing about noise: no verdict
    return {"lower": "better", "higher": "worse", "tie": "tie"}[verdict_of_stats(a[0], a[1], b[0], b[1])]


def summary(runs) -> list[Row]:
    """Every (comparison, budget, variant) of the runs, best first within each budget."""
    speed = step_times(runs)
    sizes = {r["variant"]: r for r in runs if "total_params" in r}
    trained = [r for r in runs if r["comparison"] in ("equal_steps", "equal_time")]
    budgets = sorted({(r["comparison"], budget_of(r)) for r in trained})
    rows = []
    for comparison, budget in budgets:
        losses = val_losses(runs, comparison, budget)
        dense = losses.get("dense", [])
        timed = {}
        for r in runs:
            if comparison == "equal_time" and r["comparison"] == comparison and r["budget_seconds"] == budget:
                timed.setdefault(r["variant"], []).append(r)
        ms = {v: 1e3 * statistics.mean(r["seconds_per_step"] for r in rs) for v, rs in timed.items()} or \
            {v: 1e3 * s for v, s in speed.items()}
        for variant, vals in sorted(losses.items(), key=lambda kv: statistics.mean(kv[1])):
            rows.append(Row(
                comparison, budget, variant, vals,
                vs_dense=statistics.mean(vals) - statistics.mean(dense) if dense else float("nan"),
                verdict="" if variant == "dense" or not dense else verdict_vs(vals, dense),
                total_params=sizes[variant]["total_params"], active_params=sizes[variant]["active_params"],
                ms_per_step=ms.get(variant), x_dense=ms[variant] / ms["dense"] if variant in ms and "dense" in ms
                else None,
                equal_time_runs=[(r["steps"], r["seconds"]) for r in sorted(timed.get(variant, []),
                                                                           key=lambda r: r["seed"])]))
    return rows


def format_table(rows: list[Row]) -> str:
    """The table `benchmarks/moe_scaling.py --report` prints."""
    lines = [f"{'comparison':<12}{'budget':<12} {'variant':<42}{'n':>2}{'val loss':>18}{'vs dense':>10}  "
             f"{'verdict':<8}{'total':>11}{'active':>9}{'ms/step':>8}{'x dense':>8}  equal time: steps in own seconds"]
    for r in rows:
        unit = "steps" if r.comparison == "equal_steps" else "s"
        ms = "-" if r.ms_per_step is None else f"{r.ms_per_step:.1f}"
        ratio = "-" if r.x_dense is None else f"{r.x_dense:.2f}"
        own = "  " + ", ".join(f"{steps} in {seconds:.0f} s" for steps, seconds in r.equal_time_runs)
        lines.append(f"{r.comparison:<12}{r.budget:>5g} {unit:<6}{r.variant:<42}{len(r.losses):>2}"
                     f"{r.mean:>10.4f} ± {r.sd:.4f}{r.vs_dense:>+10.4f}  {r.verdict:<8}{r.total_params:>11,}"
                     f"{r.active_params:>9,}{ms:>8}{ratio:>8}{own if r.equal_time_runs else ''}")
    return "\n".join(lines)


def routing_table(runs) -> str:
    """What the routers of the re-trained runs did ("routing" records), one line per seed: the val
    loss, and per MoE layer the busiest expert's share of first choices and the tokens dropped, over
    the last 100 steps; then the mean loss and the busiest layer's busiest share through training."""
    records = sorted((r for r in runs if r["comparison"] == "routing"), key=lambda r: (r["variant"], r["seed"]))
    lines = []
    for r in records:
        shares = " ".join(f"{v:.2f}" for v in r["max_share"])
        drops = " ".join(f"{v:4.1f}" for v in r["dropped_pct"])
        lines.append(f"{r['variant']} seed {r['seed']}: val loss {r['val_loss']:.4f}; per layer, busiest expert's "
                     f"share {shares}, dropped % {drops}")
        lines.append(f"    through training, mean loss {' '.join(f'{v:.2f}' for v in r['loss_through_training'])}; "
                     f"busiest share {' '.join(f'{v:.2f}' for v in r['max_share_through_training'])}")
    return "\n".join(lines)


def plot_results(rows: list[Row], steps: int = 1800):
    """One figure, two panels: val loss against expert count at equal steps (each family a line,
    dense a band), and val loss against the training budget at equal wall time. Points are seed
    means, bars one sd."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    at_steps = {r.variant: r for r in rows if r.comparison == "equal_steps" and r.budget == steps}
    for label, members in FAMILIES.items():
        points = [(moe_config(v).n_experts, at_steps[v]) for v in members if v in at_steps]
        left.errorbar([e for e, _ in points], [r.mean for _, r in points], yerr=[r.sd for _, r in points],
                      marker="o", capsize=3, label=label)
    for suffix, marker in ((AUX_FREE, "*"), (EVERY_OTHER, "v")):  # one change to a grid variant: its own marker
        for v, r in at_steps.items():
            if v.endswith(suffix):
                left.errorbar([moe_config(v).n_experts * 1.12], [r.mean], yerr=[r.sd], marker=marker, markersize=9,
                              capsize=3, linestyle="none", label=v)
    if "dense" in at_steps:
        dense = at_steps["dense"]
        left.axhspan(dense.mean - dense.sd, dense.mean + dense.sd, color="grey", alpha=0.25)
        left.axhline(dense.mean, color="grey", label="dense (mean ± sd)")
    left.set_xscale("log", base=2)
    left.set_xticks([4, 8, 16, 32, 64], labels=["4", "8", "16", "32", "64"])
    left.set(xlabel="routed experts per MoE layer", ylabel=f"val loss after {steps} steps",
             title="equal steps, equal active compute per token")
    left.legend(fontsize=8)
    timed = {}
    for r in rows:
        if r.comparison == "equal_time":
            timed.setdefault(r.variant, []).append(r)
    for variant, points in timed.items():
        right.errorbar([r.budget for r in points], [r.mean for r in points], yerr=[r.sd for r in points],
                       marker="o", capsize=3, label=variant)
    right.set(xlabel="training budget (seconds on the benchmark's machine)", ylabel="val loss",
              title="equal wall time: the steps a timing probe said would fit")
    if timed:
        right.legend(fontsize=8)
    fig.tight_layout()
    return fig
