"""Fully sharded data parallelism (PyTorch's FSDP2, ``fully_shard``) for the decoder, alone or with
expert parallelism, and the per-rank memory of the training state.

    rt = init_distributed(expert_parallel=P)
    experts = shard_experts(model, rt.expert_group) if P > 1 else []   # expert parallel first
    shard_model(model, rt, precision="bf16", keep_whole=experts)         # then FSDP on the rest
    optimizer = AdamW(model.parameters())                               # over the local shards

Each block is one FSDP unit (its parameters are gathered for its forward and backward, then freed),
and the model's remaining parameters (embeddings, final norm, head) are the root unit. Parameters are
sharded over all W ranks; expert shards stay whole on their rank: they are already split over the
expert group, and ``reduce_expert_grads`` averages them over their replicas as without FSDP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from condcomp.device import resolve_precision
from condcomp.distributed.expert_parallel import moe_layers, sharded_parameters
from condcomp.distributed.runtime import DistributedError, Runtime

GIB = 2**30
# fp32 AdamW training state per parameter: the weight, its gradient and the two moments.
BYTES_PER_PARAMETER = {"params": 4, "grads": 4, "optimizer": 8}


def mixed_precision(precision: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction when the run trains in bf16;
    no casting otherwise."""
    if resolve_precision(precision, device_type) == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, rt: Runtime, *, precision: str, keep_whole: Iterable[nn.Parameter] = (),
                unused_parameters: bool = False) -> None:
    """Apply FSDP2 in place: each of ``model.blocks`` a unit, then the model itself (the root unit).

    keep_whole: parameters FSDP must leave alone (expert shards under expert parallelism).
    unused_parameters: some parameters may get no gradient on some ranks in a step (token selection
        can leave a block's branch empty): reduce zeros for them so every rank joins the same
        reduce-scatter (DDP's find_unused_parameters).
    """
    if rt.world_mesh is None:
        raise DistributedError("FSDP needs a distributed runtime (init_distributed under torchrun)")
    policy = mixed_precision(precision, rt.device.type)
    whole = set(keep_whole)
    for block in model.blocks:
        own = {p for p in block.parameters() if p in whole}
        fully_shard(block, mesh=rt.world_mesh, mp_policy=policy, ignored_params=own or None)
    fully_shard(model, mesh=rt.world_mesh, mp_policy=policy, ignored_params=whole or None)
    if unused_parameters:
        model.set_reduce_scatter_unused_params(True)


def sync_buffers(model: nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's persistent buffers (expert-choice inference thresholds), as DDP does
    before each forward: FSDP shards parameters only, and buffers updated from each rank's own batch
    would otherwise drift apart."""
    if not rt.distributed:
        return
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                dist.broadcast(buf, src=0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_sharded(model: nn.Module, max_norm: float, rt: Runtime) -> torch.Tensor:
    """clip_grad_norm_ for a model whose parameters are FSDP shards (each element on one rank), expert
    shards (each on the ranks of one replica group) or replicated: the norm counts every element once.
    Returns the total norm (the same on every rank)."""
    experts = {id(p) for p in sharded_parameters(model)}
    replicas = rt.world_size // rt.expert_parallel
    grads, sq = [], torch.zeros((), dtype=torch.float64, device=rt.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = _local(p.grad)
        # How many ranks hold this very element: divide so the sum over all ranks counts it once.
        copies = 1 if isinstance(p.grad, DTensor) else replicas if id(p) in experts else rt.world_size
        sq += g.detach().double().pow(2).sum() / copies
        grads.append(g)
    if rt.distributed:
        dist.all_reduce(sq)
    total = sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


# -- memory of the training state -----------------------------------------------------------------

@dataclass(frozen=True)
class StateMemory:
    """Bytes of fp32 AdamW training state one rank holds."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer

    def as_gib(self) -> dict[str, float]:
        return {"params_gib": self.params / GIB, "grads_gib": self.grads / GIB, "optimizer_gib": self.optimizer / GIB,
                "state_gib": self.total / GIB}


def _per_parameter(n: float) -> StateMemory:
    return StateMemory(*(n * BYTES_PER_PARAMETER[k] for k in ("params", "grads", "optimizer")))


def expert_parameter_count(model: nn.Module) -> int:
    """Parameters in MoE expert banks (the part expert parallelism splits), whole-model count."""
    return sum(p.numel() for _, moe in moe_layers(model) for p in moe.experts.parameters())


def planned_state_memory(model: nn.Module, *, world: int, expert_parallel: int, fsdp: bool) -> StateMemory:
    """Per-rank training state of ``model`` (a whole model, e.g. built on the meta device) when trained
    on ``world`` ranks: with expert parallelism the expert banks are split over ``expert_parallel``
    ranks; every other parameter (the experts too, without expert parallelism) is sharded over all
    ranks with FSDP, or held whole by every rank without."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if expert_parallel == 1:  # experts are parameters like any other: FSDP shards them too
        return _per_parameter(total / world if fsdp else total)
    experts = expert_parameter_count(model)
    rest = total - experts
    return _per_parameter(experts / expert_parallel + (rest / world if fsdp else rest))


def local_state_memory(model: nn.Module) -> StateMemory:
    """The training state this rank holds now: its shards of every trainable parameter."""
    return _per_parameter(sum(_local(p).numel() for p in model.parameters() if p.requires_grad))


def check_memory_limit(model: nn.Module, *, limit_gb: float, world: int, expert_parallel: int, fsdp: bool) -> None:
    """Refuse a run whose per-rank training state exceeds ``limit_gb``, naming the world size (and
    settings) that would fit. ``model`` is the whole model (the meta device is enough)."""
    need = planned_state_memory(model, world=world, expert_parallel=expert_parallel, fsdp=fsdp)
    if need.total <= limit_gb * GIB:
        return
    head = (f"the training state needs {need.total / GIB:.2f} GiB per rank (parameters {need.params / GIB:.2f}, "
            f"gradients {need.grads / GIB:.2f}, AdamW state {need.optimizer / GIB:.2f}) on {world} rank(s), over "
            f"train.max_memory_gb={limit_gb:g}")
    for ranks in range(world if not fsdp else world + 1, 4097):
        if ranks % expert_parallel:
            continue
        if planned_state_memory(model, world=ranks, expert_parallel=expert_parallel, fsdp=True).total <= limit_gb * GIB:
            fix = "" if fsdp else "set train.fsdp: true and "
            where = f"launch on {ranks} ranks (torchrun --nproc-per-node/--nnodes)" if ranks > world else \
                f"keep {ranks} ranks"
            raise DistributedError(f"{head}; {fix}{where}, or raise train.max_memory_gb")
    raise DistributedError(f"{head}; even 4096 ranks would not fit: the expert banks alone need more, so raise "
                           "train.expert_parallel (experts split over more ranks) or train.max_memory_gb")
