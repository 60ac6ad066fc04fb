"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards
of the weights and optimizer state, in parallel, and a checkpoint loads on any number of ranks.

Layout (a folder like every checkpoint, ``condcomp.train.checkpoint``): DCP's files (``__<rank>_0.distcp``
per rank and ``.metadata``), ``state.pt`` (schedule, RNG, counters), ``config.json`` and
``manifest.json``. All ranks write into ``step_N.tmp-sharded``; once DCP has finished on every rank,
rank 0 adds the rest and the manifest and renames the folder into place, so a rank killed mid-save
leaves the previous checkpoint as the newest complete one.

Resharding: DCP stores each tensor by its global name, shape and the offsets of the pieces each rank
held, and reads back whatever pieces the loading ranks hold. FSDP parameters are DTensors already.
Expert shards (expert parallelism) are plain tensors on their ranks, so they are described here as the
DTensor they are: the whole expert bank, split over the "expert" dimension of the expert mesh and
replicated over its "replicate" dimension. A 4-rank expert-parallel checkpoint therefore resumes on 2
FSDP ranks or in one process, and the other way round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from condcomp.distributed import Runtime
from condcomp.distributed.expert_parallel import moe_layers
from condcomp.train.checkpoint import checkpoint_dir, publish_checkpoint, quiet_single_process


def _expert_shards(model: nn.Module) -> dict[str, object]:
    """Names of this rank's expert-shard parameters -> their ExpertPlacement (empty without EP)."""
    placement = {id(p): moe.placement for _, moe in moe_layers(model) if moe.placement is not None
                 for p in moe.experts.parameters()}
    return {name: placement[id(p)] for name, p in model.named_parameters() if id(p) in placement}


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _whole_bank(local: torch.Tensor, placement, rt: Runtime) -> DTensor:
    """An expert shard [E/P, ...] as the DTensor of the whole bank [E, ...] (no copy)."""
    shape = torch.Size((placement.num_experts, *local.shape[1:]))
    return DTensor.from_local(local, rt.expert_mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                              stride=_contiguous_stride(shape))


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict:
    """{"model": weights and buffers by name, "optimizer": AdamW state by parameter name}, each tensor
    as the piece of a global tensor this rank holds (what DCP saves or loads into)."""
    weights, optim = get_state_dict(model, optimizer)
    for name, placement in _expert_shards(model).items():
        weights[name] = _whole_bank(weights[name], placement, rt)
        if name not in optim["state"]:
            continue
        # A copy: the state dict shares its entries with the live optimizer, which must keep its tensors.
        entry = optim["state"][name] = dict(optim["state"][name])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == placement.num_local:
                entry[key] = _whole_bank(value, placement, rt)
    return {"model": weights, "optimizer": optim}


def _local_pieces(tree):
    """The same structure with every expert-bank DTensor back to this rank's shard."""
    if isinstance(tree, dict):
        return {k: _local_pieces(v) for k, v in tree.items()}
    if isinstance(tree, DTensor) and tree.device_mesh.mesh_dim_names == ("replicate", "expert"):
        return tree.to_local()
    return tree


def save_sharded(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 config: dict, rt: Runtime, *, keep: int = 2) -> Path:
    """Write checkpoint ``step`` as shards, every rank its own, atomically (all ranks call this)."""
    folder = checkpoint_dir(run_dir)
    tmp = folder / f"step_{step:08d}.tmp-sharded"
    if rt.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    rt.barrier()
    writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
    with quiet_single_process(rt.distributed):
        dcp.save(training_state(model, optimizer, rt), storage_writer=writer, no_dist=not rt.distributed)
    final = folder / f"step_{step:08d}"
    if rt.is_main:
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        final = publish_checkpoint(run_dir, tmp, step, fmt="sharded", keep=keep)
    rt.barrier()  # nobody moves on (or can be killed) believing in a half-written step
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> None:
    """Load weights and optimizer state into this rank's pieces, whatever world size and mesh wrote
    them (all ranks call this; the checkpoint was verified by the caller)."""
    state = training_state(model, optimizer, rt)
    with quiet_single_process(rt.distributed):
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not rt.distributed)
    state = _local_pieces(state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
