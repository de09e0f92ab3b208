"""Naive vs FlashAttention-2 (pure PyTorch) vs SDPA: time and peak extra memory against T.

    python benchmarks/attention.py                      # T = 256 ... 8192, about 6 minutes
    python benchmarks/attention.py --seq-lens 1024 4096 # a subset

Causal, fp32, B=1, H=8, D=64, 2 threads. Every point runs in a fresh process
(moe_tutorial.measure) so the peak-RSS figure belongs to that point alone. Prints a table with
ratios against SDPA and naive measured in the same run, checks the course's targets at
T=4096, and saves a log-log plot to benchmarks/results/attention.png.
"""

import argparse
from pathlib import Path

from moe_tutorial.measure import measure_in_subprocess

IMPLS = ("naive", "flash", "sdpa")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", default=str(Path(__file__).parent / "results" / "attention.png"))
    args = parser.parse_args()

    rows = []
    for backward in (False, True):
        for T in args.seq_lens:
            point = {impl: measure_in_subprocess("attention", impl=impl, seq_len=T, backward=backward,
                                                 threads=args.threads, repeats=3 if T >= 4096 else 5)
                     for impl in IMPLS}
            rows.append((backward, T, point))

    print("causal fp32, B=1 H=8 D=64; time = median, memory = peak RSS increase in a fresh process")
    print(f"{'pass':<9}{'T':>6} | {'naive s':>8}{'flash s':>9}{'sdpa s':>8} | {'flash/sdpa':>10}"
          f"{'flash/naive':>12} | {'naive MiB':>10}{'flash MiB':>10}{'sdpa MiB':>9} | {'flash/naive mem':>15}")
    for backward, T, p in rows:
        n, f, s = (p[i] for i in IMPLS)
        print(f"{'fwd+bwd' if backward else 'forward':<9}{T:>6} | {n['seconds']:>8.3f}{f['seconds']:>9.3f}"
              f"{s['seconds']:>8.3f} | {f['seconds'] / s['seconds']:>10.2f}{f['seconds'] / n['seconds']:>12.2f}"
              f" | {n['extra_mib']:>10.1f}{f['extra_mib']:>10.1f}{s['extra_mib']:>9.1f}"
              f" | {100 * f['extra_mib'] / max(n['extra_mib'], 1e-9):>14.1f}%")

    target = next((p for backward, T, p in rows if T == 4096 and not backward), None)
    if target:
        time_ratio = target["flash"]["seconds"] / target["sdpa"]["seconds"]
        mem_share = target["flash"]["extra_mib"] / target["naive"]["extra_mib"]
        print(f"\nT=4096 causal forward: flash = {time_ratio:.2f}x SDPA's time (target <= 2.5x), "
              f"{100 * mem_share:.1f}% of naive's memory (target <= 5%)")
    slower = [T for backward, T, p in rows if not backward and T >= 1024
              and p["flash"]["seconds"] >= p["naive"]["seconds"]]
    print("flash faster than naive (forward) for every T >= 1024:", "yes" if not slower else f"no, at {slower}")
    plot(rows, args.plot)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backward, style in ((False, "-"), (True, "--")):
        for impl in IMPLS:
            pts = [(T, p[impl]) for b, T, p in rows if b == backward]
            label = f"{impl} {'fwd+bwd' if backward else 'fwd'}"
            axes[0].loglog([T for T, _ in pts], [m["seconds"] for _, m in pts], style, marker="o", label=label)
            axes[1].loglog([T for T, _ in pts], [max(m["extra_mib"], 0.1) for _, m in pts], style,
                           marker="o", label=label)
    axes[0].set(xlabel="sequence length T", ylabel="seconds (median)", title="time")
    axes[1].set(xlabel="sequence length T", ylabel="peak extra MiB", title="memory")
    for ax in axes:
        ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
