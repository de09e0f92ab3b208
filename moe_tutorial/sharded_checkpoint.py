"""Checkpoints of runs whose ranks hold different tensors, with torch.distributed.checkpoint
(notebook 06): expert parallel (--expert-parallel) and fully sharded data parallel (--fsdp).

Under --expert-parallel each rank holds n_experts / world_size experts of every MoE layer and its
own optimizer state for them; everything else is the same on every rank. Under --fsdp each rank
holds a shard of every parameter and of its optimizer state (DTensors). A sharded checkpoint is a
folder (OUT_DIR/ckpt-sharded) that torch.distributed.checkpoint (DCP) writes from all ranks at
once: an expert tensor is described as one global (E, ...) tensor sharded along the experts (a
DTensor over this rank's slice), so every rank writes only its own part, and replicated tensors
are written once. Beside DCP's files, meta.json holds the plain values (step, configs, history,
the optimizer's hyperparameters) and sha256.json a checksum of every file, checked before
anything is loaded.

    torchrun --nproc_per_node=2 -m moe_tutorial.train --variant "Switch top-1" --expert-parallel
    torchrun --nproc_per_node=2 -m moe_tutorial.train --variant "Switch top-1" --expert-parallel --resume
    python -m moe_tutorial.sharded_checkpoint out      # one ckpt.pt: moe_tutorial.sample reads it

A resume needs the world size the run was saved with (each rank keeps its own random stream and,
under expert parallelism, its own experts); `consolidate` gathers the shards into an ordinary
single-process checkpoint.
"""

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint import write_checkpoint_file
from .config import CONFIG_VERSION
from .distributed import has_replicated_experts, is_expert_parallel
from .downloads import sha256_of, writer_tag

META, SHA256 = "meta.json", "sha256.json"


def optimizer_parts(optimizer) -> dict:
    """The torch optimizers inside the training optimizer: {"": AdamW}, or Muon, AdamW (and the
    experts' Muon, with TrainConfig.muon_experts) by name."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return {"": optimizer}
    return optimizer.parts  # optimizers.MuonWithAdamW


def _ordered_params(optimizer: torch.optim.Optimizer) -> list:
    """The parameters in the order state_dict() numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def tensors_to_save(model, optimizer) -> tuple[dict, set]:
    """Every tensor of the model and optimizer under a flat name ("model.<fqn>",
    "optim.<part>.<index>.<state>"), and the names that hold one rank's slice of the experts."""
    tensors, sliced = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensors[f"model.{name}"] = tensor.detach()
        if isinstance(tensor, torch.nn.Parameter) and is_expert_parallel(tensor):
            sliced.add(f"model.{name}")
    for part, opt in optimizer_parts(optimizer).items():
        for index, param in enumerate(_ordered_params(opt)):
            for key, value in opt.state.get(param, {}).items():
                name = f"optim.{part}.{index}.{key}"
                tensors[name] = value
                if is_expert_parallel(param) and value.dim() > 0:
                    sliced.add(name)
    return tensors, sliced


def as_global(tensors: dict, sliced: set, mesh) -> dict:
    """The expert slices as DTensors: global tensors sharded along dim 0 (the experts), of which
    this rank holds its slice, in rank order. No copy: DCP reads and writes the slices in place."""
    from torch.distributed.tensor import DTensor, Shard

    return {name: DTensor.from_local(t, mesh, [Shard(0)], run_check=False) if name in sliced else t
            for name, t in tensors.items()}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def save_sharded(folder, model, optimizer, step, cfg, history, batch_rng, extra=None):
    """Write the run's sharded checkpoint from every rank (a collective: all ranks call it). It is
    written into a temporary folder and renamed into place by rank 0 once complete: a crash
    mid-save leaves the previous checkpoint as it was."""
    if has_replicated_experts(model):
        raise ValueError("sharded checkpoints hold one copy of each expert shard per rank; a run whose shards have "
                         "replicas (shard_experts_with_replicas) cannot save one yet: shard over every rank "
                         "(shard_experts) to save checkpoints")
    folder, rank = Path(folder), dist.get_rank()
    tmp = folder.with_name(f"{folder.name}.{writer_tag() if rank == 0 else ''}.tmp")
    names = [str(tmp)]
    dist.broadcast_object_list(names, src=0)  # rank 0's name for the temporary folder
    tmp = Path(names[0])
    tensors, sliced = tensors_to_save(model, optimizer)
    tensors["rng.torch"] = torch.stack(_gather(torch.get_rng_state()))  # (world, n): every rank's own stream
    tensors["rng.batches"] = batch_rng.get_state()
    dcp.save(as_global(tensors, sliced, _mesh()), checkpoint_id=tmp)
    if rank == 0:
        meta = {"step": step, "config_version": CONFIG_VERSION, "model_config": model.config.to_dict(),
                "train_config": asdict(cfg), "history": history.to_dict(), "extra": extra or {},
                "world_size": dist.get_world_size(), "sliced": sorted(sliced),
                "param_groups": {part: _groups(opt) for part, opt in optimizer_parts(optimizer).items()}}
        (tmp / META).write_text(json.dumps(meta))
        (tmp / SHA256).write_text(json.dumps({f.name: sha256_of(f) for f in sorted(tmp.iterdir()) if f.name != SHA256}))
        _replace_folder(tmp, folder)
    dist.barrier()  # no rank goes on (or reads it) before the checkpoint is in place


def _groups(opt) -> list:
    """The optimizer's hyperparameters per group, as state_dict() gives them (params as indices)."""
    return json.loads(json.dumps(opt.state_dict()["param_groups"]))


def _gather(tensor) -> list:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def _replace_folder(new: Path, dest: Path):
    """Put `new` at `dest`; the previous `dest` is moved aside first and deleted only afterwards."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(folder) -> dict:
    """A sharded checkpoint's plain values, after checking every file against sha256.json."""
    folder = Path(folder)
    if not (folder / META).exists() and folder.with_name(folder.name + ".old").exists():
        os.replace(folder.with_name(folder.name + ".old"), folder)  # a save was cut off between two renames
    if not (folder / SHA256).exists() or not (folder / META).exists():
        raise FileNotFoundError(f"No sharded checkpoint at {folder} (no {META} / {SHA256}); train with "
                                f"--expert-parallel first, or check the path")
    recorded = json.loads((folder / SHA256).read_text())
    present = {f.name for f in folder.iterdir() if f.name != SHA256}
    if present != set(recorded):
        raise ValueError(f"{folder} is incomplete or has extra files ({sorted(present ^ set(recorded))}): refused; "
                         f"use an intact copy or retrain")
    for name, sha in recorded.items():
        if sha256_of(folder / name) != sha:
            raise ValueError(f"{folder / name} is damaged: it no longer matches the sha256 recorded when it was saved, "
                             f"so the checkpoint is refused; use an intact copy or retrain")
    return json.loads((folder / META).read_text())


def load_sharded(folder, model, optimizer) -> dict:
    """Read a sharded checkpoint on every rank (a collective): this rank's shards and the plain values,
    as a state dict of the single-process layout (moe_tutorial.checkpoint) that restore() loads."""
    meta = read_meta(folder)
    if meta["world_size"] != dist.get_world_size():
        raise ValueError(f"{folder} was saved by {meta['world_size']} ranks and this run has "
                         f"{dist.get_world_size()}: resume with --nproc_per_node={meta['world_size']}, or "
                         f"consolidate it (python -m moe_tutorial.sharded_checkpoint) and train on one process")
    saved, now = set(meta["param_groups"]), set(optimizer_parts(optimizer))
    if saved != now:  # checked here: DCP would fail on the missing tensors with a long message of its own
        raise ValueError(f"{folder} holds the state of {_describe(saved)} and this run's optimizer is "
                         f"{_describe(now)}: resume with the checkpoint's TrainConfig.optimizer and muon_experts, "
                         f"or start a fresh run in another out_dir")
    _initialise_optimizer_state(model, optimizer)
    tensors, sliced = tensors_to_save(model, optimizer)
    template = {name: t.detach().clone() for name, t in tensors.items()}  # loaded here, copied in by restore()
    template["rng.torch"] = torch.empty((meta["world_size"], torch.get_rng_state().numel()), dtype=torch.uint8)
    template["rng.batches"] = torch.get_rng_state().clone()
    dcp.load(as_global(template, sliced, _mesh()), checkpoint_id=Path(folder))
    return single_process_layout(meta, template, rank=dist.get_rank())


def _describe(parts) -> str:
    """Optimizer parts (optimizer_parts' names) in words, e.g. "Muon + AdamW + Muon for the experts"."""
    words = {"": "AdamW", "muon": "Muon", "adamw": "AdamW", "expert_muon": "Muon for the experts"}
    return " + ".join(words[part] for part in words if part in parts)


def single_process_layout(meta: dict, tensors: dict, rank: int = 0) -> dict:
    """The layout of moe_tutorial.checkpoint (what save_checkpoint writes) from a sharded
    checkpoint's plain values and its tensors (this rank's slices, or the consolidated whole)."""
    model_state = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    optim_states = {}
    for part, groups in meta["param_groups"].items():
        state = {}
        for name, t in tensors.items():
            if name.startswith(f"optim.{part}."):
                index, key = name.removeprefix(f"optim.{part}.").split(".", 1)
                state.setdefault(int(index), {})[key] = t
        optim_states[part] = {"state": state, "param_groups": groups}
    optim_state = optim_states[""] if "" in optim_states else optim_states
    return {"model": model_state, "optimizer": optim_state, "step": meta["step"],
            "config_version": meta["config_version"], "model_config": meta["model_config"],
            "train_config": meta["train_config"], "history": meta["history"], "extra": meta["extra"],
            "rng": {"torch": tensors["rng.torch"][rank].clone(), "batches": tensors["rng.batches"], "cuda": []}}


@torch.no_grad()
def _initialise_optimizer_state(model, optimizer):
    """Give a fresh optimizer its state tensors (zeros), so that DCP has somewhere to load into:
    one step with zero gradients at learning rate 0 changes no weight."""
    if all(opt.state for opt in optimizer_parts(optimizer).values()):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def consolidate(folder, dest) -> Path:
    """Gather a sharded checkpoint into one ordinary checkpoint at `dest` (moe_tutorial.checkpoint's
    layout, with its sha256), on one process: each sharded tensor is read back whole from its parts."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder, dest = Path(folder), Path(dest)
    meta = read_meta(folder)
    stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    template = {name: torch.empty(tuple(m.size), dtype=m.properties.dtype) for name, m in stored.items()
                if isinstance(m, TensorStorageMetadata)}
    dcp.load(template, checkpoint_id=folder, no_dist=True)
    write_checkpoint_file(dest, single_process_layout(meta, template))
    return dest


def main(argv=None):
    """python -m moe_tutorial.sharded_checkpoint OUT_DIR [--overwrite]: OUT_DIR/ckpt-sharded -> OUT_DIR/ckpt.pt."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moe_tutorial.sharded_checkpoint",
                                     description="Consolidate a sharded checkpoint (--expert-parallel, --fsdp) "
                                                 "(OUT_DIR/ckpt-sharded) into one ckpt.pt that one process can load.")
    parser.add_argument("out_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    try:
        if (out / "ckpt.pt").exists() and not args.overwrite:
            raise FileExistsError(f"{out / 'ckpt.pt'} already exists: add --overwrite to replace it")
        dest = consolidate(out / "ckpt-sharded", out / "ckpt.pt")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {dest}: python -m moe_tutorial.sample --out-dir {out}")


if __name__ == "__main__":
    main()
