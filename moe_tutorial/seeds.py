"""Comparing training runs over seeds: mean ± sd, and a verdict that calls small differences a tie.

One seed says nothing about noise, so nothing here accepts fewer than two runs a side. A difference
of means is called only when it exceeds twice the combined per-run sd, sqrt(sd_a² + sd_b²) — a
conservative convention (with 3 seeds a side, about 3.5 standard errors of the difference); under
that it is a "tie", and the course's prose says tie.
"""

import math
import statistics


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of at least two runs' results."""
    values = list(values)
    if len(values) < 2:
        raise ValueError(f"mean ± sd needs at least 2 runs (one per seed), got {len(values)}: train more seeds")
    return statistics.mean(values), statistics.stdev(values)


def verdict(a, b) -> str:
    """'lower' / 'higher' when a's mean is below / above b's by more than twice the combined per-run sd
    (sqrt(sd_a² + sd_b²)), else 'tie'. a, b: each run's result."""
    return verdict_of_stats(*mean_sd(a), *mean_sd(b))


def verdict_of_stats(mean_a, sd_a, mean_b, sd_b) -> str:
    """The same rule from summaries already computed (mean and sd of each side's runs)."""
    diff = mean_a - mean_b
    if abs(diff) <= 2 * math.hypot(sd_a, sd_b):
        return "tie"
    return "lower" if diff < 0 else "higher"


def combined_sd(*groups) -> float:
    """sqrt(sd_1² + sd_2² + ...) of each group's runs: the sd the 2-sd rule measures a difference of
    means against (two groups), or a difference of two differences (four)."""
    return math.hypot(*(mean_sd(g)[1] for g in groups))


def describe(name_a, a, name_b, b, unit="val loss") -> str:
    """One sentence for a notebook: both means ± sd, the difference and the verdict."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    call = verdict(a, b)
    said = "a tie (under 2 sd)" if call == "tie" else f"{name_a} is {call} by more than 2 sd"
    return (f"{name_a} {mean_a:.4f} ± {sd_a:.4f} vs {name_b} {mean_b:.4f} ± {sd_b:.4f} {unit} "
            f"({len(a)} and {len(b)} seeds): difference {mean_a - mean_b:+.4f}, {said}")
