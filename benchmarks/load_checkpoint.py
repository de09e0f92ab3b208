"""Peak memory of loading a sharded bf16 MoE checkpoint with moe_tutorial.hf_models (notebook 08).

    python benchmarks/load_checkpoint.py            # a random ~1.2 GB Qwen3-MoE-shaped checkpoint
    python benchmarks/load_checkpoint.py --layers 4  # smaller

Writes a random checkpoint with transformers (sharded safetensors, bf16) in one process, then loads
it with the package in a fresh process and reports that process's peak resident memory against the
weights' size: a loader that built a second copy (fp32 first, or the whole state dict before the
model) would need about twice the weights or more.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = """
import sys, torch, transformers
layers, folder = int(sys.argv[1]), sys.argv[2]
config = transformers.Qwen3MoeConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
    norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained(folder, max_shard_size="200MB")
"""

LOAD = """
import json, sys, time, torch
from moe_tutorial.hf_models import load_directory
from moe_tutorial.measure import peak_rss_mib
baseline = peak_rss_mib() / 1024  # GiB: python + torch, before any weights
t0 = time.perf_counter()
model = load_directory(sys.argv[1], torch.bfloat16)
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
print(json.dumps(dict(weights_gib=weights, baseline_gib=baseline, peak_gib=peak_rss_mib() / 1024, seconds=seconds)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", WRITE, str(args.layers), folder], check=True)
        shards = sorted(Path(folder).glob("*.safetensors"))
        on_disk = sum(f.stat().st_size for f in shards) / 2**30
        result = json.loads(subprocess.run([sys.executable, "-c", LOAD, folder], check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
    extra = result["peak_gib"] - result["baseline_gib"]
    print(f"checkpoint: {len(shards)} shards, {on_disk:.2f} GiB on disk; model weights {result['weights_gib']:.2f} GiB")
    print(f"loading: peak RSS {result['peak_gib']:.2f} GiB = {result['baseline_gib']:.2f} GiB before loading + "
          f"{extra:.2f} GiB ({extra / result['weights_gib']:.2f}x the weights), {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
