"""Training on several processes with torch.distributed: data parallel and expert parallel
(notebook 06).

Launch any training script with torchrun; each process is one rank:

    torchrun --nproc_per_node=2 -m moe_tutorial.train --variant "Switch top-1" --expert-parallel

Data parallel (DDP): every rank holds the whole model, trains on its own slice of the batch, and
gradients are averaged (all-reduce) before each optimizer step. Expert parallel: each rank holds
only n_experts / world_size experts of every MoE layer. Tokens are routed where they are, sent to
the rank that owns their expert (all-to-all), processed, and sent back (all-to-all again).
Everything except the experts stays data parallel; expert weights are never all-reduced: each
rank's experts already saw every rank's tokens. With more ranks than expert shards, each shard is
replicated and its gradients are averaged over its replicas only (expert_parallel_groups).
Fully sharded data parallel (FSDP2, --fsdp): every rank trains on its slice of the batch as with
DDP, but holds only a shard of every parameter.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import config_diff
from .dispatch import combine, sort_by_expert
from .experts import Experts
from .moe import MoE


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_s: float = 120.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
    environment): gloo on CPU, nccl on CUDA. Without torchrun: a single process, no group."""
    if dist.is_initialized():
        return info()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # A timeout turns a rank that never arrives (crashed, misconfigured) into an error, not a hang.
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return info()


def info() -> DistInfo:
    if not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def raise_on_every_rank(error: Exception | None, group=None):
    """Re-raise on every rank an error that some ranks hit, so that none waits for the others."""
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"rank {rank}: {message}")


def check_same_config(config, group=None):
    """Every rank must build the same model: compare configs before any collective depends on it."""
    configs = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config.to_dict(), group=group)
    for rank, other in enumerate(configs):
        if diff := config_diff(configs[0], other):
            detail = ", ".join(f"{k}: rank 0 has {a!r}, rank {rank} has {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"Ranks were given different model configs ({detail}); "
                             f"every rank must build the same model")


# --- the all-to-all --------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks in blocks of input_splits; blocks of output_splits arrive.

    Its gradient is the same exchange in reverse: the rows' gradients go back to where the rows
    came from, so autograd flows through the communication.
    """

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x, output_splits, input_splits, group=None):
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class ExpertParallelDispatch:
    """The MoE layer's dispatch (moe_tutorial.dispatch) when experts live on several ranks.

    Rank r owns experts [r * E_local, (r + 1) * E_local). Same signature as sort_dispatch:
    x (N, C), the routing of these N tokens, and *this rank's* Experts -> (N, C).
    """

    def __init__(self, group=None):
        self.group = group  # the ranks that exchange tokens: the expert-parallel group
        self.replica_group = None  # the ranks holding this rank's shard, when shards have replicas
        self.last_stats = None  # rows sent to / received from each rank, for the stats script
        self.records = None  # set to [] to keep every call's stats

    def __call__(self, x, routing, experts: Experts):
        world = dist.get_world_size(self.group)
        n_local = experts.n_experts
        # 1. Group this rank's kept assignments by expert, as sort_dispatch does.
        token, gate, counts = sort_by_expert(routing, world * n_local)  # experts of a rank are contiguous
        # 2. Uneven exchange: first tell every rank how many rows of each of its experts are coming.
        received_counts = torch.empty_like(counts)  # (world * E_local,): per source rank, per local expert
        dist.all_to_all_single(received_counts, counts, group=self.group)
        send = counts.view(world, n_local).sum(1).tolist()
        receive = received_counts.view(world, n_local).sum(1).tolist()
        rows = all_to_all(x.index_select(0, token), receive, send, self.group)  # (M_in, C) by source, then expert
        # 3. Run the local experts on rows regrouped by expert (they arrive grouped by source first).
        local_expert = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(world), received_counts)
        local_counts = torch.bincount(local_expert, minlength=n_local)  # (E_local,)
        by_expert = torch.argsort(local_expert, stable=True)
        y = experts(rows.index_select(0, by_expert), local_counts)
        y = y.index_select(0, torch.argsort(by_expert))  # back to arrival order
        # 4. Send the results home and combine them with the gates, as sort_dispatch does.
        back = all_to_all(y, send, receive, self.group)  # (M, C) in step 1's order
        self.last_stats = {"sent_rows": send, "received_rows": receive, "local_expert_rows": local_counts.tolist()}
        if self.records is not None:
            self.records.append(self.last_stats)
        return combine(x, token, back, gate)


def shard_experts(model, group=None):
    """Keep only this rank's experts in every MoE layer of `model` (a GPT, or one MoE layer)
    and exchange tokens with all-to-all.

    Call it on identically initialised models on every rank (same seed): each keeps its slice.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for layer in [m for m in model.modules() if isinstance(m, MoE)]:
        E = layer.experts.n_experts
        if E % world:
            raise ValueError(f"n_experts={E} is not divisible by the {world} expert-parallel ranks: each rank "
                             f"must own the same number of experts. Use n_experts a multiple of {world}.")
        n_local = E // world
        mine = slice(rank * n_local, (rank + 1) * n_local)
        full = layer.experts
        local = Experts(n_local, full.c_fc.size(1), full.c_proj.size(1), full.b_fc is not None, full.gelu_approximate,
                        full.activation)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(full, name)[mine])
        for param in local.parameters():
            param.expert_parallel = True  # not all-reduced: see ddp() and clip_grad_norm_()
        layer.experts = local.to(full.c_fc.device)
        layer.dispatch = ExpertParallelDispatch(group)
    return model


def expert_parallel_groups(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ranks of a run with more ranks than expert shards: (expert-parallel groups, replica groups).

    Consecutive blocks of ep_size ranks each hold all the experts, sharded ep_size ways, and exchange
    tokens among themselves (all-to-all). Shard s is then replicated on ranks s, s + ep_size, ...:
    that replica ("expert data parallel") group averages the shard's gradients, while the non-expert
    gradients are averaged over the whole world. ep_size = world_size: one expert-parallel group and
    singleton replica groups (no expert all-reduce, what shard_experts does); ep_size = 1: plain
    data parallelism, every rank holding every expert.

    world 4, ep_size 2 -> ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    if world_size < 1 or ep_size < 1 or world_size % ep_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"ep_size={ep_size} does not divide world_size={world_size} into whole groups: "
                         f"use a positive world_size and an ep_size among {divisors}")
    ep_groups = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
    replica_groups = [list(range(shard, world_size, ep_size)) for shard in range(ep_size)]
    return ep_groups, replica_groups


def shard_experts_with_replicas(model, ep_size: int):
    """Expert parallelism inside blocks of ep_size consecutive ranks, data parallelism across them
    (ep_size < world size): each rank keeps 1/ep_size of every MoE layer's experts and exchanges tokens
    within its block; the ranks that hold the same shard (its replica group) add up its gradients in
    average_expert_grads, and clip_grad_norm_ counts each shard once. A collective: every rank calls it,
    on identically initialised models (each rank creates every group, in the same order)."""
    ranks = info()
    ep_groups, replica_groups = expert_parallel_groups(ranks.world_size, ep_size)
    ep_handles = [dist.new_group(group) for group in ep_groups]
    replica_handles = [dist.new_group(group) for group in replica_groups]
    ep_group, replica_group = ep_handles[ranks.rank // ep_size], replica_handles[ranks.rank % ep_size]
    shard_experts(model, ep_group)
    for layer in _sharded_layers(model):
        layer.dispatch.replica_group = replica_group
    return model


def _sharded_layers(model) -> list:
    """The MoE layers whose experts are sharded over ranks (shard_experts)."""
    return [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.dispatch, ExpertParallelDispatch)]


def has_replicated_experts(model) -> bool:
    """Its expert shards have replicas (shard_experts_with_replicas)."""
    return any(layer.dispatch.replica_group is not None for layer in _sharded_layers(model))


def is_expert_parallel(param) -> bool:
    return getattr(param, "expert_parallel", False)


def shard_parameters(model):
    """FSDP2 (torch.distributed.fsdp.fully_shard), for a model too big to hold whole on every rank:
    each rank keeps 1/world_size of every parameter, gradient and optimizer state. A block's
    parameters are gathered just before it runs and freed after; gradients are reduce-scattered
    (averaged, each rank keeping its shard). Each block is one unit, and the root takes the rest."""
    from torch.distributed.fsdp import fully_shard

    if has_sharded_experts(model):
        raise ValueError("--fsdp and --expert-parallel together are not supported: choose one")
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def is_fully_sharded(model) -> bool:
    """Its parameters are DTensors sharded over the ranks: FSDP2's fully_shard (shard_parameters)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def wrap_for_training(model, device: str):
    """What runs forward and backward: DDP's wrapper when several ranks train, else the model."""
    ranks = info()
    if ranks.world_size == 1 or is_fully_sharded(model):  # FSDP2 (fully_shard) syncs gradients itself
        return model
    check_same_config(model.config)  # before any collective depends on it
    return ddp(model, [ranks.local_rank] if str(device).startswith("cuda") else None)


def ddp(model, device_ids=None):
    """Wrap in DistributedDataParallel; expert-parallel weights are left out of its all-reduce.

    Buffers are not broadcast from rank 0 before each forward (DDP's default): the only buffers
    are the routers' aux-loss-free state, whose bias every rank updates identically from the load
    all-reduced by sum_router_loads, and whose load counts are each rank's own."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in model.named_parameters() if is_expert_parallel(p)]
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def has_sharded_experts(model) -> bool:
    return any(is_expert_parallel(p) for p in model.parameters())


def average_expert_grads(model, world_size: int | None = None):
    """DDP averages the replicated weights' gradients over ranks; expert gradients already hold
    the tokens of every rank in their expert-parallel group, summed. With replicas (ep_size < world
    size) the shard's copies first add up their gradients, so that every rank's tokens are in; then
    dividing by world_size makes both the gradient of the mean loss over the global batch, as one
    process training on the whole batch would compute."""
    world_size = world_size or info().world_size
    for layer in _sharded_layers(model):
        replicas = layer.dispatch.replica_group
        for p in layer.experts.parameters():
            if p.grad is None:
                continue
            if replicas is not None and dist.get_world_size(replicas) > 1:
                dist.all_reduce(p.grad, group=replicas)
            p.grad.div_(world_size)


@torch.no_grad()
def sum_router_loads(model, group=None):
    """Aux-loss-free balancing under torchrun: each rank counted the assignments of its own tokens;
    sum the counts over ranks (one all-reduce) so that every rank moves the same bias, the one the
    global batch asks for. Nothing to do on a single process."""
    routers = [layer.router for layer in model.moe_layers() if layer.router.config.bias_update_rate > 0]
    if not routers or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    loads = torch.stack([r.load_since_update for r in routers])  # (layers, E)
    dist.all_reduce(loads, group=group)
    for router, load in zip(routers, loads):
        router.load_since_update.copy_(load)


def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: the data-parallel part is the same on every
    rank, the expert-parallel parts differ per rank and are summed across the ranks of one
    expert-parallel group (its replicas hold the same gradients after average_expert_grads)."""
    params = [p for p in model.parameters() if p.grad is not None]

    def squared_norm(ps):
        return sum((p.grad.float().square().sum() for p in ps), torch.zeros((), device=params[0].grad.device))

    sharded = squared_norm([p for p in params if is_expert_parallel(p)])
    if dist.is_initialized():  # one copy of each shard: an expert-parallel group (the world when no replicas)
        layers = _sharded_layers(model)
        dist.all_reduce(sharded, group=layers[0].dispatch.group if layers else None)
    total = (squared_norm([p for p in params if not is_expert_parallel(p)]) + sharded).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


def bytes_sent(stats: dict, rank: int, n_embd: int, bytes_per_element: int = 4) -> int:
    """Bytes one rank sends to the other ranks in one MoE layer's forward pass, from its dispatch's
    record (ExpertParallelDispatch.last_stats): the rows it dispatches to other ranks' experts, and
    in the combine the rows that *arrived* from other ranks, sent back processed. The two differ
    when routing is uneven; rows a rank keeps for its own experts never leave it."""
    dispatched = sum(n for r, n in enumerate(stats["sent_rows"]) if r != rank)
    returned = sum(n for r, n in enumerate(stats["received_rows"]) if r != rank)
    return (dispatched + returned) * n_embd * bytes_per_element


def all_to_all_bytes(tokens: int, n_embd: int, top_k: int, world_size: int, bytes_per_element: int = 4) -> float:
    """Expected bytes one rank sends per MoE layer in the forward pass, with even routing and no drops:
    its tokens' k assignments, all but the 1/world_size that stay local, go out (dispatch) and come
    back (combine). The backward pass sends as much again."""
    remote_rows = tokens * top_k * (world_size - 1) / world_size
    return 2 * remote_rows * n_embd * bytes_per_element
