"""MoE layer forward+backward time against a FLOP-matched dense FFN and a Mixtral-style loop.

    python benchmarks/moe_layer.py

For top-1 and top-2 routing with E=8 experts, at the course's char-model shape (d=128, h=4d,
768 tokens) and a GPT-2-small-like shape (d=384, h=4d, 8192 tokens):
  moe      moe_tutorial.moe.MoE (sorted dispatch, grouped matmul)
  dense    a GELU MLP with hidden = top_k * h: the same matmul FLOPs per token as the MoE
  hf-loop  a per-expert loop in the style of Hugging Face's Mixtral block: a one-hot expert
           mask, torch.where per expert, index_add_ back (same router, same experts)
Capacity is set high enough (factor E) that no token is dropped, so all three do the same work.
Median of 40 interleaved repeats, 2 threads; ratios are within this run.
"""

import argparse
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_tutorial.measure import median_seconds
from moe_tutorial.model import MLP, GPTConfig
from moe_tutorial.moe import MoE

SHAPES = {"char": (128, 768), "gpt2-small-like": (384, 8192)}  # (d_model, tokens per batch)
N_EXPERTS = 8


class HFStyleLoopMoE(nn.Module):
    """The per-expert loop of transformers' MixtralSparseMoeBlock, over our router and experts."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        flat = x.view(-1, C)
        logits = self.moe.router.logits(flat)
        probs = F.softmax(logits, dim=-1)
        gates, chosen = torch.topk(probs, self.moe.router.top_k, dim=-1)
        if self.moe.router.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(chosen, num_classes=N_EXPERTS).permute(2, 1, 0)  # (E, k, N)
        for e in range(N_EXPERTS):
            slot, token = torch.where(expert_mask[e])
            y = self.moe.experts.expert(e, flat[token]) * gates[token, slot, None]
            out.index_add_(0, token, y.to(flat.dtype))
        return out.view(B, T, C)


def fwd_bwd(module, x):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"E={N_EXPERTS}, forward+backward, median of {args.repeats}, {args.threads} threads")
    print(f"{'shape':<17}{'top_k':>6}{'dense ms':>10}{'moe ms':>9}{'hf-loop ms':>12}"
          f"{'moe/dense':>11}{'hf/dense':>10}{'moe/hf':>8}")
    for name, (d, tokens) in SHAPES.items():
        for top_k in (1, 2):
            torch.manual_seed(0)
            cfg = GPTConfig(vocab_size=8, n_embd=d, n_head=1, n_experts=N_EXPERTS, top_k=top_k,
                            capacity_factor_train=float(N_EXPERTS))  # never drop: equal work
            moe = MoE(cfg).train()
            dense = MLP(GPTConfig(vocab_size=8, n_embd=d, n_head=1))
            dense.c_fc = nn.Linear(d, top_k * 4 * d, bias=False)
            dense.c_proj = nn.Linear(top_k * 4 * d, d, bias=False)
            loop = HFStyleLoopMoE(moe)
            x = torch.randn(tokens // 256, 256, d, requires_grad=True)
            t = interleaved_medians({"dense": fwd_bwd(dense, x), "moe": fwd_bwd(moe, x),
                                     "hf": fwd_bwd(loop, x)}, args.repeats)
            print(f"{name:<17}{top_k:>6}{t['dense'] * 1e3:>10.2f}{t['moe'] * 1e3:>9.2f}{t['hf'] * 1e3:>12.2f}"
                  f"{t['moe'] / t['dense']:>11.2f}{t['hf'] / t['dense']:>10.2f}{t['moe'] / t['hf']:>8.2f}")


if __name__ == "__main__":
    main()
