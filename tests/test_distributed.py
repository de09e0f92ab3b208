"""Data and expert parallelism on 2 CPU processes (gloo on 127.0.0.1), bounded in time."""

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_tutorial import distributed
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.data import Dataset, get_batch
from moe_tutorial.model import GPT
from moe_tutorial.moe import MoE
from moe_tutorial.train import TrainConfig, train

WORLD = 2
DEADLINE_S = 120  # the whole 2-process scenario; collectives themselves time out after 30 s


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, scenario, result_dir, world=WORLD):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        scenario(rank, result_dir)
    except BaseException:
        (result_dir / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(scenario, tmp_path, world=WORLD):
    """Run scenario(rank, tmp_path) in `world` spawned processes (2 unless told); fail with a rank's traceback."""
    context = mp.start_processes(_worker, args=(_free_port(), scenario, tmp_path, world), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish within {DEADLINE_S} s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error*.txt")))
        pytest.fail(f"a rank failed:\n{errors}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# --- expert parallelism: same outputs and gradients as one process -----------------------------

MOE_CONFIGS = {
    "top-1": GPTConfig(n_embd=16, n_head=2, bias=True, moe=MoEConfig(n_experts=4, top_k=1)),
    "top-2 + shared": GPTConfig(n_embd=16, n_head=2, moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1)),
}


def _ep_equivalence(rank, result_dir):
    for config in MOE_CONFIGS.values():
        torch.manual_seed(0)
        reference = MoE(config)  # all experts, on every rank
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(std=0.3)  # large router logits: uneven loads and some drops
        inputs = [torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(WORLD)]
        weights = [torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(20 + r)) for r in range(WORLD)]
        ref_x = [x.clone().requires_grad_() for x in inputs]
        ref_router_grad = None
        for r in range(WORLD):  # the reference: each rank's tokens through the full layer
            reference.zero_grad()
            (reference(inputs[r])[0] * weights[r]).sum().backward()  # this rank's loss alone
            if r == rank:
                ref_router_grad = reference.router.gate.weight.grad.clone()
        reference.zero_grad()
        ref_out = [reference(x)[0] for x in ref_x]
        sum((o * w).sum() for o, w in zip(ref_out, weights)).backward()  # experts see everyone's tokens

        layer = MoE(config)
        layer.load_state_dict(reference.state_dict())
        distributed.shard_experts(layer)
        x = inputs[rank].clone().requires_grad_()
        out, _, routing = layer(x)
        (out * weights[rank]).sum().backward()
        torch.testing.assert_close(out, ref_out[rank], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, ref_x[rank].grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.router.gate.weight.grad, ref_router_grad, atol=1e-5, rtol=1e-5)
        n_local = config.moe.n_experts // WORLD
        mine = slice(rank * n_local, (rank + 1) * n_local)
        for name, p in layer.experts.named_parameters():
            torch.testing.assert_close(p.grad, getattr(reference.experts, name).grad[mine], atol=1e-5, rtol=1e-5)
        sent = layer.dispatch.last_stats["sent_rows"]
        assert sum(sent) == routing.kept.sum().item()  # every kept assignment leaves, local ones too


def test_expert_parallel_layer_equals_single_process(tmp_path):
    run_on_ranks(_ep_equivalence, tmp_path)


# --- DDP: 2 ranks x batch B == 1 process x batch 2B ---------------------------------------------

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
TINY = dict(vocab_size=len(set(TEXT)), block_size=16, n_layer=2, n_head=2, n_embd=32)
RECIPE = dict(max_iters=4, learning_rate=3e-3, warmup_iters=1, eval_interval=4, eval_iters=2, progress=False)


def _ddp_train(rank, result_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    train(model, Dataset.from_text(TEXT), TrainConfig(batch_size=4, **RECIPE))
    if rank == 0:
        torch.save(model.state_dict(), result_dir / "ddp.pt")


def test_ddp_matches_single_process_with_doubled_batch(tmp_path):
    run_on_ranks(_ddp_train, tmp_path)
    torch.manual_seed(0)
    single = GPT(GPTConfig(**TINY))
    train(single, Dataset.from_text(TEXT), TrainConfig(batch_size=8, **RECIPE))
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, atol=2e-5, rtol=1e-4, msg=name)


def _ep_train(rank, result_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2, capacity_factor_train=4.0)))  # no drops
    distributed.shard_experts(model)
    history = train(model, Dataset.from_text(TEXT), TrainConfig(batch_size=4, **RECIPE))
    torch.save({"val": history.final_val_loss, "wte": model.transformer.wte.weight}, result_dir / f"ep{rank}.pt")


def test_expert_parallel_training_matches_single_process(tmp_path):
    run_on_ranks(_ep_train, tmp_path)
    torch.manual_seed(0)
    single = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2, capacity_factor_train=4.0,
                                                  capacity_factor_eval=4.0)))
    history = train(single, Dataset.from_text(TEXT), TrainConfig(batch_size=8, **RECIPE))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"ep{rank}.pt", weights_only=True)
        # Routing losses are computed per rank, so the replicated weights match closely, not exactly.
        torch.testing.assert_close(result["wte"], single.transformer.wte.weight.detach(), atol=2e-3, rtol=0)
        assert abs(result["val"] - history.final_val_loss) < 2e-2


def _ep_dp_train(rank, result_dir):
    """One backward pass against one process on the whole batch; then the same run twice on 4 ranks:
    experts split 4 ways, then 2 ways with each shard held twice."""
    config = GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2, capacity_factor_train=4.0))  # no drops
    x, y = get_batch(Dataset.from_text(TEXT).train, 8, TINY["block_size"], torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    one = GPT(config)
    one(x, y).loss.backward()
    torch.manual_seed(0)
    model = distributed.shard_experts_with_replicas(GPT(config), ep_size=2)
    model(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]).loss.backward()
    distributed.average_expert_grads(model, 4)
    mine = slice((rank % 2) * 2, (rank % 2) * 2 + 2)
    full = dict(one.named_parameters())
    errors = [(p.grad - full[name].grad[mine]).abs().max() / full[name].grad[mine].abs().max()
              for name, p in model.named_parameters() if distributed.is_expert_parallel(p)]
    results = {"gradient_error": max(errors).item()}
    for ep_size in (4, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2, capacity_factor_train=4.0)))  # no drops
        if ep_size == 4:
            distributed.shard_experts(model)
        else:
            distributed.shard_experts_with_replicas(model, ep_size)  # ranks {0, 1}, {2, 3}; shards on {0, 2}, {1, 3}
        history = train(model, Dataset.from_text(TEXT), TrainConfig(batch_size=2, **RECIPE))  # 4 x 2 = 8 sequences
        results[ep_size] = {"val": history.final_val_loss,
                            "params": {name: p.detach().clone() for name, p in model.named_parameters()}}
    torch.save(results, result_dir / f"ep_dp{rank}.pt")


def test_expert_parallel_with_replicas_trains_as_experts_over_every_rank(tmp_path):
    """4 ranks, experts split 2 ways and each shard held twice: the shard's copies stay identical, and every
    weight ends as in the run with the experts split over all 4 ranks (one expert each)."""
    run_on_ranks(_ep_dp_train, tmp_path, world=4)
    results = [torch.load(tmp_path / f"ep_dp{rank}.pt", weights_only=True) for rank in range(4)]
    for rank, result in enumerate(results):
        assert result["gradient_error"] < 1e-4  # relative: replicas summed, / W, is the global batch's gradient
        replicated, alone = result[2]["params"], result[4]["params"]
        shard = rank % 2  # experts 2s and 2s + 1: on ranks 2s and 2s + 1 when split 4 ways
        for name, value in replicated.items():
            if "mlp.experts." in name:
                torch.testing.assert_close(value, results[shard][2]["params"][name], atol=0, rtol=0)  # replicas agree
                split_four_ways = torch.cat([results[2 * shard + i][4]["params"][name] for i in range(2)])
                torch.testing.assert_close(value, split_four_ways, atol=1e-5, rtol=1e-4, msg=name)
            else:
                torch.testing.assert_close(value, alone[name], atol=1e-5, rtol=1e-4, msg=name)
        assert abs(result[2]["val"] - result[4]["val"]) < 1e-4


def _replicated_checkpoint_refused(rank, result_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2)))
    distributed.shard_experts_with_replicas(model, ep_size=2)
    with pytest.raises(ValueError, match="cannot save one yet"):
        train(model, Dataset.from_text(TEXT), TrainConfig(batch_size=2, **RECIPE), checkpoint_path=result_dir / "ck")


def test_a_run_with_replicated_shards_refuses_a_sharded_checkpoint(tmp_path):
    run_on_ranks(_replicated_checkpoint_refused, tmp_path, world=4)


def _aux_free_train(rank, result_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, aux_loss_coef=0.0, bias_update_rate=1e-2,
                                                 capacity_factor_train=4.0)))
    train(model, Dataset.from_text(TEXT), TrainConfig(batch_size=4, **RECIPE))
    torch.save([layer.router.selection_bias for layer in model.moe_layers()], result_dir / f"bias{rank}.pt")


def test_aux_loss_free_bias_follows_the_global_load(tmp_path):
    """Each rank routes its own half of the batch; the bias must follow the load of the whole batch
    (all-reduced counts), be the same on every rank, and equal one process's with the doubled batch."""
    run_on_ranks(_aux_free_train, tmp_path)
    biases = [torch.load(tmp_path / f"bias{rank}.pt", weights_only=True) for rank in range(WORLD)]
    torch.manual_seed(0)
    single = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, aux_loss_coef=0.0, bias_update_rate=1e-2,
                                                  capacity_factor_train=4.0)))
    train(single, Dataset.from_text(TEXT), TrainConfig(batch_size=8, **RECIPE))
    expected = [layer.router.selection_bias for layer in single.moe_layers()]
    for rank_biases in biases:
        for got, want in zip(rank_biases, expected):
            torch.testing.assert_close(got, want)
    assert any(b.abs().sum() > 0 for b in expected)


def _rank_local_counts(rank, result_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, aux_loss_coef=0.0, bias_update_rate=1e-2)))
    net = distributed.ddp(model)
    router = model.moe_layers()[0].router
    x = torch.randint(TINY["vocab_size"], (4, TINY["block_size"]), generator=torch.Generator().manual_seed(rank))
    counts = []
    for _ in range(2):  # two micro-batches of one step: counts accumulate in a buffer
        net(x, x).loss.backward()
        counts.append(router.load_since_update.clone())
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, counts[0])
    assert not torch.equal(everyone[0], everyone[1])  # the ranks' own tokens load the experts differently
    # DDP's default (broadcast_buffers=True) would copy rank 0's counts over rank 1's before the
    # second forward; every rank must keep its own, to be summed over ranks once per step.
    torch.testing.assert_close(counts[1], 2 * counts[0], rtol=0, atol=0)


def test_ddp_keeps_each_ranks_routing_counts(tmp_path):
    run_on_ranks(_rank_local_counts, tmp_path)


# --- sharded checkpoints of expert-parallel runs (torch.distributed.checkpoint) --------------

EP_MOE = MoEConfig(n_experts=4, top_k=2, capacity_factor_train=1.0)  # drops tokens: capacity is part of the state
EP_RECIPE = dict(RECIPE, max_iters=6, lr_decay_iters=6, eval_interval=3)  # the same schedule for both runs


def _ep_checkpoints(rank, result_dir):
    def run(max_iters, out, resume=False, optimizer="adamw"):
        torch.manual_seed(0)
        model = distributed.shard_experts(GPT(GPTConfig(**TINY, norm="rmsnorm", moe=EP_MOE)))
        cfg = TrainConfig(batch_size=2, **{**EP_RECIPE, "max_iters": max_iters}, optimizer=optimizer)
        history = train(model, Dataset.from_text(TEXT), cfg, checkpoint_path=result_dir / out / "ckpt-sharded",
                        resume=resume, extra={"chars": "x"})
        return model, history

    whole, whole_history = run(6, "whole")
    run(3, "half")
    resumed, resumed_history = run(6, "half", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"rank {rank}: {name} differs after resuming"
    if rank == 0:  # the checkpoint keeps rank 0's history (each rank's loss is that of its own slice of the batch)
        assert whole_history.loss == resumed_history.loss and whole_history.val_loss == resumed_history.val_loss
    run(3, "muon", optimizer="muon")  # Muon + AdamW: both optimizers' states, experts' in AdamW
    run(6, "muon", resume=True, optimizer="muon")
    idx = torch.arange(32).reshape(2, 16) % TINY["vocab_size"]
    with torch.no_grad():
        logits = whole.eval()(idx).logits  # every rank takes part: the experts are spread over them
    if rank == 0:
        torch.save({"idx": idx, "logits": logits}, result_dir / "sharded_logits.pt")


def test_sharded_checkpoints_resume_exactly_and_consolidate(tmp_path):
    from moe_tutorial.checkpoint import load_checkpoint, model_from_checkpoint
    from moe_tutorial.sharded_checkpoint import consolidate, read_meta

    run_on_ranks(_ep_checkpoints, tmp_path)
    folder = tmp_path / "whole" / "ckpt-sharded"
    assert len(list(folder.glob("*.distcp"))) == WORLD and read_meta(folder)["world_size"] == WORLD
    state = load_checkpoint(consolidate(folder, tmp_path / "whole" / "ckpt.pt"))  # sha256-checked
    model = model_from_checkpoint(state).eval()
    assert state["model"]["transformer.h.0.mlp.experts.c_fc"].size(0) == EP_MOE.n_experts  # every expert, whole
    expected = torch.load(tmp_path / "sharded_logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["idx"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)
    assert read_meta(tmp_path / "muon" / "ckpt-sharded")["param_groups"].keys() == {"muon", "adamw"}
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged"):
        consolidate(folder, tmp_path / "again.pt")
    assert not (tmp_path / "again.pt").exists()


def _fsdp_and_ddp(rank, result_dir):
    def run(max_iters, out=None, resume=False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=2)))
        if out:  # FSDP2, checkpointed; else DDP
            distributed.shard_parameters(model)
        cfg = TrainConfig(batch_size=2, **{**EP_RECIPE, "max_iters": max_iters})
        history = train(model, Dataset.from_text(TEXT), cfg, resume=resume,
                        checkpoint_path=result_dir / out / "ckpt-sharded" if out else None)
        return model, history

    _, ddp_history = run(6)
    fsdp, fsdp_history = run(6, "whole")
    assert distributed.is_fully_sharded(fsdp) and not distributed.is_fully_sharded(run(1)[0])
    # Same data, same initial weights: only the order of float additions in the gradient sync differs.
    torch.testing.assert_close(torch.tensor(fsdp_history.loss), torch.tensor(ddp_history.loss), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(fsdp_history.val_loss), torch.tensor(ddp_history.val_loss), atol=1e-5,
                               rtol=0)
    run(3, "half")
    resumed, _ = run(6, "half", resume=True)
    def whole(t):  # parameters are DTensors (shards), buffers plain tensors
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    for (name, a), b in zip(fsdp.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(whole(a), whole(b)), f"{name} differs after resuming"
    idx = torch.arange(32).reshape(2, 16) % TINY["vocab_size"]
    with torch.no_grad():
        logits = fsdp.eval()(idx).logits
    if rank == 0:
        torch.save({"idx": idx, "logits": logits}, result_dir / "fsdp_logits.pt")


def test_fsdp_trains_like_ddp_and_its_checkpoint_resumes_and_consolidates(tmp_path):
    from moe_tutorial.checkpoint import load_checkpoint, model_from_checkpoint
    from moe_tutorial.sharded_checkpoint import consolidate

    run_on_ranks(_fsdp_and_ddp, tmp_path)
    model = model_from_checkpoint(load_checkpoint(consolidate(tmp_path / "whole" / "ckpt-sharded",
                                                              tmp_path / "whole.pt"))).eval()
    expected = torch.load(tmp_path / "fsdp_logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["idx"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)


def test_expert_parallel_cli_run_resumes_consolidates_and_samples(tmp_path, shakespeare_file):
    """The command line end to end: torchrun trains with sharded experts, resumes, then one process
    consolidates the checkpoint and samples from it."""
    import subprocess
    import sys

    from conftest import copy_into

    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    env = {**os.environ, "MOE_TUTORIAL_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"

    def torchrun(max_iters, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
               "moe_tutorial.train", "--preset", "char-tiny", "--variant", "top-2", "--expert-parallel",
               "--max-iters", str(max_iters), "--sample", "0", "--no-progress", "--threads", "1",
               "--out-dir", str(out), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)

    first = torchrun(4)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sharded over 2 ranks" in first.stdout and (out / "ckpt-sharded" / "meta.json").exists()
    resumed = torchrun(8, "--resume")
    assert resumed.returncode == 0 and "8 iters" in resumed.stdout, resumed.stderr[-2000:]
    run = [sys.executable, "-m", "moe_tutorial.sharded_checkpoint", str(out)]
    assert subprocess.run(run, env=env, capture_output=True, timeout=60).returncode == 0
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # never replaces a checkpoint silently
    sample = subprocess.run([sys.executable, "-m", "moe_tutorial.sample", "--out-dir", str(out), "--prompt", "KING",
                             "--max-new-tokens", "10", "--threads", "1"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert sample.returncode == 0 and sample.stdout.startswith("KING") and len(sample.stdout) == 4 + 10 + 1


# --- bad setups fail clearly, on every rank, without hanging ------------------------------------

def _bad_setups(rank, result_dir):
    model = GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=3)))
    with pytest.raises(ValueError, match="n_experts=3 is not divisible by the 2 expert-parallel ranks"):
        distributed.shard_experts(model)
    config = GPTConfig(**{**TINY, "n_embd": 32 if rank == 0 else 48})
    with pytest.raises(ValueError, match="n_embd: rank 0 has 32, rank 1 has 48"):
        distributed.check_same_config(config)
    with pytest.raises(ValueError, match="rank 1: PermissionError: cannot write"):  # one rank's error, everywhere
        distributed.raise_on_every_rank(PermissionError("cannot write") if rank == 1 else None)
    sharded = distributed.shard_experts(GPT(GPTConfig(**TINY, moe=MoEConfig(n_experts=2))))
    with pytest.raises(FileNotFoundError, match="No sharded checkpoint"):  # --resume with nothing to resume
        train(sharded, Dataset.from_text(TEXT), TrainConfig(batch_size=2, **RECIPE), checkpoint_path=result_dir / "x",
              resume=True)


def test_bad_setups_fail_clearly_without_hanging(tmp_path):
    run_on_ranks(_bad_setups, tmp_path)


def test_bytes_sent_counts_the_rows_that_arrived_on_the_way_back():
    # rank 0 dispatches 405 rows to rank 1 and received 347 from it: it sends 405 out, then 347 back
    stats = {"sent_rows": [120, 405], "received_rows": [120, 347], "local_expert_rows": [0]}
    assert distributed.bytes_sent(stats, rank=0, n_embd=128) == (405 + 347) * 128 * 4  # 385 kB, not 2 x 405 rows
    assert distributed.bytes_sent(stats, rank=0, n_embd=128) != 2 * 405 * 128 * 4
    rank1 = {"sent_rows": [347, 90], "received_rows": [405, 90]}  # the same exchange seen from rank 1
    assert distributed.bytes_sent(rank1, rank=1, n_embd=128) == (347 + 405) * 128 * 4


def test_all_to_all_volume_formula():
    # 8 ranks, 1024 tokens each, top-2, 768 channels, bf16: 7/8 of 2048 rows leave and come back.
    assert distributed.all_to_all_bytes(1024, 768, 2, 8, 2) == 2 * 2048 * 7 / 8 * 768 * 2
    assert distributed.all_to_all_bytes(1024, 768, 2, 1) == 0  # one rank: nothing to send


def test_expert_parallel_groups_split_the_world_into_shards_and_replicas():
    assert distributed.expert_parallel_groups(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert distributed.expert_parallel_groups(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    # ep_size = world: one expert-parallel group, no replicas (no expert all-reduce)
    assert distributed.expert_parallel_groups(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    # ep_size = 1: every rank holds all the experts, and all ranks average their gradients
    assert distributed.expert_parallel_groups(3, 1) == ([[0], [1], [2]], [[0, 1, 2]])


@pytest.mark.parametrize("world, ep", [(1, 1), (6, 2), (6, 3), (12, 4), (16, 8)])
def test_every_rank_is_in_one_group_of_each_kind(world, ep):
    ep_groups, replica_groups = distributed.expert_parallel_groups(world, ep)
    for groups, size in ((ep_groups, ep), (replica_groups, world // ep)):
        assert sorted(r for g in groups for r in g) == list(range(world)) and {len(g) for g in groups} == {size}
    for ep_group in ep_groups:  # an expert-parallel group holds each shard exactly once
        assert sorted(r % ep for r in ep_group) == list(range(ep))


@pytest.mark.parametrize("world, ep", [(4, 3), (4, 0), (4, -2), (4, 8), (0, 1)])
def test_expert_parallel_groups_refuse_sizes_that_do_not_divide(world, ep):
    with pytest.raises(ValueError, match=f"ep_size={ep} does not divide world_size={world}"):
        distributed.expert_parallel_groups(world, ep)
