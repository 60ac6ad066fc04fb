"""Expert parallelism for every ``MoE`` in a model: shard the experts, reduce their gradients over
their replicas only, and put the full banks back together for a checkpoint.

    rt = init_distributed(expert_parallel=2)
    model = Transformer(cfg)                        # same seed on every rank: identical full weights
    names = shard_experts(model, rt.expert_group)   # each rank keeps its block of experts
    ddp = DistributedDataParallel(model, ...)       # after ignore_in_ddp(model, names)
    ...loss.backward()
    reduce_expert_grads(model, rt)                  # DDP skipped them; average over replicas
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from condcomp.dispatch.expert_parallel import ExpertPlacement
from condcomp.distributed.runtime import DistributedError, Runtime
from condcomp.layers.experts import Experts
from condcomp.layers.moe import MoE


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, group: dist.ProcessGroup) -> list[str]:
    """Keep in each MoE only this rank's block of experts; return the sharded parameters' names.

    Every rank of ``group`` must start from the same full weights (same seed, or a loaded
    checkpoint): rank i keeps experts [i*E/P, (i+1)*E/P).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    names = []
    for prefix, moe in moe_layers(model):
        if moe.placement is not None:
            raise DistributedError(f"{prefix or 'the model'} is already expert-parallel")
        e = moe.experts.num_experts
        if e % size:
            raise DistributedError(f"{prefix}: {e} experts cannot be split evenly over {size} ranks; set "
                                   f"train.expert_parallel to a divisor of model.moe.num_experts={e}")
        placement = ExpertPlacement(group=group, group_rank=rank, group_size=size, num_experts=e)
        lo, hi = placement.first, placement.first + placement.num_local
        moe.experts = Experts.from_weights(moe.experts.up[lo:hi], moe.experts.down[lo:hi],
                                           activation=moe.experts.activation)
        moe.placement = placement
        names += [f"{prefix}.experts.{p}" if prefix else f"experts.{p}" for p, _ in moe.experts.named_parameters()]
    return names


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that live on this rank only (expert shards)."""
    return [p for _, moe in moe_layers(model) if moe.placement is not None for p in moe.experts.parameters()]


def ignore_in_ddp(model: nn.Module, names: list[str]) -> None:
    """Keep the expert shards out of DDP: no broadcast at wrap time (they differ by design) and no
    all-reduce of their gradients (``reduce_expert_grads`` averages them over replicas instead)."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def reduce_expert_grads(model: nn.Module, rt: Runtime) -> None:
    """Turn each expert shard's gradient into the gradient of the global mean loss.

    After backward, a shard's gradient is the sum over the ranks of its expert group of d(local mean
    loss)/d(shard) (the backward exchange brought it home). The global loss is the mean of the W local
    losses, and each expert has W/P replicas that saw different tokens: sum over replicas, divide by W.
    DDP does the same for the other parameters (all-reduce, divide by W).
    """
    for p in sharded_parameters(model):
        if p.grad is None:
            continue
        if rt.replica_group is not None:
            dist.all_reduce(p.grad, group=rt.replica_group)
        p.grad.div_(rt.world_size)


def clip_grad_norm(model: nn.Module, max_norm: float, rt: Runtime) -> torch.Tensor:
    """clip_grad_norm_ over the whole (sharded) model: the norm counts every expert once.

    Replicated gradients are equal on all ranks after DDP; shard gradients are summed in squares over
    the expert group. Returns the total norm (the same on every rank).
    """
    shards = {id(p) for p in sharded_parameters(model)}
    replicated = [p for p in model.parameters() if p.grad is not None and id(p) not in shards]
    sharded = [p for p in model.parameters() if p.grad is not None and id(p) in shards]
    grads = [p.grad for p in replicated]
    sq = torch.nn.utils.get_total_norm(grads).pow(2) if grads else torch.zeros((), device=rt.device)
    if sharded:
        local = torch.nn.utils.get_total_norm([p.grad for p in sharded]).pow(2).to(torch.float64)
        dist.all_reduce(local, group=rt.expert_group)
        sq = sq.to(torch.float64) + local
    total = sq.sqrt().to(torch.float32)
    torch.nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, total)
    return total


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


@contextlib.contextmanager
def full_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, every MoE holds its full expert bank (gathered over its expert group) and is
    an ordinary single-process layer, e.g. to write a checkpoint any number of ranks can load.
    A collective: every rank enters it together."""
    saved = []
    for _, moe in moe_layers(model):
        if moe.placement is None:
            continue
        g = moe.placement.group
        full = Experts.from_weights(_gather_rows(moe.experts.up.detach(), g), _gather_rows(moe.experts.down.detach(), g),
                                    activation=moe.experts.activation)
        saved.append((moe, moe.experts, moe.placement))
        moe.experts, moe.placement = full, None
    try:
        yield
    finally:
        for moe, shard, placement in saved:
            moe.experts, moe.placement = shard, placement


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """``optimizer.state_dict()`` as a single process holding every expert would have it.

    Per-parameter state tensors shaped like an expert shard (Adam's moments) are gathered over the
    expert group; scalars (step) are the same everywhere. A collective.
    """
    state = optimizer.state_dict()
    shards = _shard_placements(model)
    for index, param in enumerate(_params_in_state_order(optimizer)):
        placement = shards.get(id(param))
        if placement is None or index not in state["state"]:
            continue
        entry = state["state"][index] = dict(state["state"][index])  # state_dict() shares the live tensors
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                entry[key] = _gather_rows(value, placement.group)
    return state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Inverse of ``full_optimizer_state``: slice this rank's block out of full per-expert state."""
    shards = _shard_placements(model)
    for index, param in enumerate(_params_in_state_order(optimizer)):
        placement = shards.get(id(param))
        if placement is None or index not in state["state"]:
            continue
        entry = state["state"][index] = dict(state["state"][index])
        lo, hi = placement.first, placement.first + placement.num_local
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() == param.dim() and value.shape[0] == placement.num_experts:
                entry[key] = value[lo:hi].clone()
    return state


def _shard_placements(model: nn.Module) -> dict[int, ExpertPlacement]:
    return {id(p): moe.placement for _, moe in moe_layers(model) if moe.placement is not None
            for p in moe.experts.parameters()}


def _params_in_state_order(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order ``state_dict()`` numbers them (group by group)."""
    return [p for group in optimizer.param_groups for p in group["params"]]
