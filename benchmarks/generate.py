"""KV-cache decoding vs recomputing the whole prefix for every new token.

    python benchmarks/generate.py

Same weights, same random numbers, so both paths must produce the same tokens (checked).
Weights are random: decoding speed does not depend on what the model has learned.
"""

import argparse
import time

import torch

from moe_tutorial.config import GPTConfig
from moe_tutorial.model import GPT
from moe_tutorial.presets import PRESETS, gpt2_config

MODELS = {  # name -> (config, prompt length, new tokens), each run within its block_size
    "char (0.8M)": (lambda: GPTConfig(vocab_size=65, **PRESETS["char"][0]), 16, 48),
    "gpt2 (124M)": (lambda: gpt2_config("gpt2"), 16, 128),
    "gpt2-moe-16x (550M, 124M active)": (lambda: gpt2_config("gpt2-moe-16x"), 16, 128),
}


def timed_generate(model, prompt, new_tokens, use_cache):
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, top_p=0.9, generator=torch.Generator().manual_seed(0),
                         use_cache=use_cache)
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch 1, top-p 0.9, fp32, {args.threads} threads; tokens/s of the new tokens, prefill included")
    print(f"{'model':<34}{'prompt':>7}{'new':>6}{'no cache tok/s':>16}{'cache tok/s':>13}{'speed-up':>10}")
    for name in args.models:
        make_config, prompt_len, new_tokens = MODELS[name]
        torch.manual_seed(0)
        model = GPT(make_config()).eval()
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
        timed_generate(model, prompt, 4, True)  # warm-up
        slow, t_slow = timed_generate(model, prompt, new_tokens, use_cache=False)
        fast, t_fast = timed_generate(model, prompt, new_tokens, use_cache=True)
        assert torch.equal(slow, fast), f"{name}: the cache changed the generated tokens"
        print(f"{name:<34}{prompt_len:>7}{new_tokens:>6}{new_tokens / t_slow:>16.1f}{new_tokens / t_fast:>13.1f}"
              f"{t_slow / t_fast:>9.2f}x")


if __name__ == "__main__":
    main()
