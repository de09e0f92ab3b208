"""The three MoE dispatch strategies: forward+backward time and peak extra memory.

    python benchmarks/moe_dispatch.py

One MoE layer (d=128, h=4d, top-2, capacity factor 1.25, training mode) per point, each point
in a fresh process (moe_tutorial.measure). einsum builds (tokens x experts x capacity) one-hot
tensors, so its memory grows with the product; sort and loop only move the tokens they route.
"""

import argparse

from moe_tutorial.dispatch import DISPATCH
from moe_tutorial.measure import measure_in_subprocess

STRATEGIES = tuple(DISPATCH)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("top-2, d=128, h=512, capacity factor 1.25, forward+backward; median of 5; peak RSS increase")
    print(f"{'tokens':>7}{'experts':>8} | " + "".join(f"{s + ' ms':>11}" for s in STRATEGIES) + " | "
          + "".join(f"{s + ' MiB':>12}" for s in STRATEGIES) + " | fastest")
    for n_experts in args.experts:
        for tokens in args.tokens:
            p = {s: measure_in_subprocess("dispatch", dispatch=s, tokens=tokens, n_experts=n_experts,
                                          threads=args.threads) for s in STRATEGIES}
            fastest = min(STRATEGIES, key=lambda s: p[s]["seconds"])
            print(f"{tokens:>7}{n_experts:>8} | " + "".join(f"{p[s]['seconds'] * 1e3:>11.2f}" for s in STRATEGIES)
                  + " | " + "".join(f"{p[s]['extra_mib']:>12.1f}" for s in STRATEGIES) + f" | {fastest}")


if __name__ == "__main__":
    main()
