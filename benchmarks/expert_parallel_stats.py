"""Expert parallelism at work: all-to-all volume per step and each rank's expert load.

    torchrun --nproc_per_node=2 benchmarks/expert_parallel_stats.py

Trains the "char" model's "Switch top-1" variant (8 experts in every block; moe_tutorial.presets)
for a few steps with the experts sharded over the ranks, after checking that the
sharded layer gives the same outputs and gradients as the full layer. Rank 0 prints the tables.
"""

import argparse

import torch
import torch.distributed as dist

from moe_tutorial import distributed
from moe_tutorial.data import shakespeare_dataset
from moe_tutorial.model import GPT
from moe_tutorial.presets import MOE_VARIANTS, preset
from moe_tutorial.train import TrainConfig, train


def equivalence_check(config, rank, world):
    """Max |difference| of the sharded MoE layer vs the full one on this rank's tokens."""
    from moe_tutorial.moe import MoE

    torch.manual_seed(0)
    full = MoE(config)
    sharded = MoE(config)
    sharded.load_state_dict(full.state_dict())
    distributed.shard_experts(sharded)
    x = torch.randn(4, 64, config.n_embd, generator=torch.Generator().manual_seed(rank))
    x_full, x_shard = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_full, y_shard = full(x_full).out, sharded(x_shard).out  # an MoE layer returns (out, aux_loss, routing)
    y_shard.square().sum().backward()
    y_full.square().sum().backward()  # input gradients depend on this rank's tokens only
    return max((y_full - y_shard).abs().max().item(), (x_full.grad - x_shard.grad).abs().max().item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", default="Switch top-1", choices=sorted(MOE_VARIANTS))
    args = parser.parse_args()
    ranks = distributed.setup(timeout_s=60)
    if ranks.world_size < 2:
        raise SystemExit("run me under torchrun with --nproc_per_node >= 2")
    torch.set_num_threads(1)
    try:
        dataset = shakespeare_dataset(progress=False)
        model_cfg, _ = preset("char", dataset.tokenizer.vocab_size, variant=args.variant)
        distributed.check_same_config(model_cfg)
        diff = torch.tensor(equivalence_check(model_cfg, ranks.rank, ranks.world_size))
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        torch.manual_seed(1337)
        model = distributed.shard_experts(GPT(model_cfg))
        for layer in model.moe_layers():
            layer.dispatch.records = []  # every forward's traffic
        train(model, dataset, TrainConfig(batch_size=12, max_iters=args.steps, eval_interval=args.steps,
                                          eval_iters=1, progress=False))
        # the first `steps` forwards are the training steps (evaluation follows)
        stats = [[layer.dispatch.records[step] for layer in model.moe_layers()] for step in range(args.steps)]
        gathered = [None] * ranks.world_size
        dist.all_gather_object(gathered, stats)
        if ranks.is_main:
            report(gathered, model_cfg, diff.item(), ranks.world_size)
    finally:
        distributed.cleanup()


def report(gathered, config, diff, world):
    print(f"sharded vs full MoE layer: max |difference| of outputs and input gradients {diff:.2e}")
    tokens = 12 * config.block_size
    expected = distributed.all_to_all_bytes(tokens, config.n_embd, config.moe.top_k, world)
    print(f"\nall-to-all per MoE layer, forward (fp32): rows sent to each rank; the backward sends as much again"
          f"\n(even routing would send {expected / 1e3:.0f} kB per rank: tokens x top_k x (W-1)/W x C x 4 B x 2)")
    print(f"{'step':>4}{'layer':>6}{'rank':>5}  {'rows to ranks':<16}{'kB out':>8}  {'rows on my experts':<20}")
    for step in range(len(gathered[0])):
        for layer in range(len(gathered[0][step])):
            for rank in range(world):
                s = gathered[rank][step][layer]
                kb = distributed.bytes_sent(s, rank, config.n_embd) / 1e3  # dispatch out + combine back
                print(f"{step:>4}{layer:>6}{rank:>5}  {str(s['sent_rows']):<16}{kb:>8.1f}  "
                      f"{str(s['local_expert_rows']):<20}")


if __name__ == "__main__":
    main()
