"""MoE layer forward+backward time against a FLOP-matched dense FFN and a Mixtral-style loop.

    python benchmarks/moe_layer.py

For top-1 and top-2 routing with E=8 experts, at the course's char-model shape (d=128, h=4d,
768 tokens) and a GPT-2-small-like shape (d=384, h=4d, 8192 tokens):
  moe      moe_tutorial.moe.MoE (sorted dispatch, grouped matmul)
  dense    a GELU MLP with hidden = top_k * h: the same matmul FLOPs per token as the MoE
  hf-loop  the same layer with the per-expert loop of Hugging Face's Mixtral block
           (moe_tutorial.dispatch.loop_dispatch: torch.where per expert, index_add back)
Capacity is set high enough (factor E) that no token is dropped, so all three do the same work.
Median of 40 interleaved repeats, 2 threads; ratios are within this run. Compare `--threads 1`
with `--threads 2`: the per-expert matmuls gain less from a second core than the dense one does.

    python benchmarks/moe_layer.py --shapes char --threads 1
"""

import argparse
import statistics

import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.measure import median_seconds
from moe_tutorial.model import MLP
from moe_tutorial.moe import MoE

SHAPES = {"char": (128, 768), "gpt2-small-like": (384, 8192)}  # (d_model, tokens per batch)
N_EXPERTS = 8


def fwd_bwd(module, x):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()  # MoE returns (y, aux_loss)
    return run


def interleaved_medians(runs, repeats, warmup=3):
    """Median seconds of each run, timed in turn (A, B, C, A, B, C, ...) so that drifts in
    machine speed hit every contender alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(median_seconds(run, repeats=1, warmup=0))
    return {name: statistics.median(s) for name, s in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"E={N_EXPERTS}, forward+backward, median of {args.repeats}, {args.threads} threads")
    print(f"{'shape':<17}{'top_k':>6}{'dense ms':>10}{'moe ms':>9}{'hf-loop ms':>12}"
          f"{'moe/dense':>11}{'hf/dense':>10}{'moe/hf':>8}")
    for name in args.shapes:
        d, tokens = SHAPES[name]
        for top_k in (1, 2):
            torch.manual_seed(0)
            moe_cfg = MoEConfig(n_experts=N_EXPERTS, top_k=top_k, capacity_factor_train=float(N_EXPERTS))  # no drops
            moe = MoE(GPTConfig(vocab_size=8, n_embd=d, n_head=1, moe=moe_cfg)).train()
            loop = MoE(GPTConfig(vocab_size=8, n_embd=d, n_head=1, moe=moe_cfg), dispatch="loop").train()
            loop.load_state_dict(moe.state_dict())  # same router, same experts
            dense = MLP(GPTConfig(vocab_size=8, n_embd=d, n_head=1, mlp_hidden=top_k * 4 * d))
            x = torch.randn(tokens // 256, 256, d, requires_grad=True)
            t = interleaved_medians({"dense": fwd_bwd(dense, x), "moe": fwd_bwd(moe, x),
                                     "hf": fwd_bwd(loop, x)}, args.repeats)
            print(f"{name:<17}{top_k:>6}{t['dense'] * 1e3:>10.2f}{t['moe'] * 1e3:>9.2f}{t['hf'] * 1e3:>12.2f}"
                  f"{t['moe'] / t['dense']:>11.2f}{t['hf'] / t['dense']:>10.2f}{t['moe'] / t['hf']:>8.2f}")


if __name__ == "__main__":
    main()
