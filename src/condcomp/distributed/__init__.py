"""Data parallel and expert parallel training on torch.distributed (launched with torchrun).

See docs/distributed.md for launch commands on one CPU machine, one GPU node and several nodes.
"""

from condcomp.dispatch.expert_parallel import ExpertPlacement, dispatch_expert_parallel, exchange
from condcomp.distributed.expert_parallel import (clip_grad_norm, full_experts, full_optimizer_state, ignore_in_ddp,
                                                  reduce_expert_grads, shard_experts, shard_optimizer_state,
                                                  sharded_parameters)
from condcomp.distributed.runtime import DistributedError, Runtime, default_backend, init_distributed, shutdown

__all__ = ["DistributedError", "ExpertPlacement", "Runtime", "clip_grad_norm", "default_backend",
           "dispatch_expert_parallel", "exchange", "full_experts", "full_optimizer_state", "ignore_in_ddp",
           "init_distributed", "reduce_expert_grads", "shard_experts", "shard_optimizer_state", "sharded_parameters",
           "shutdown"]
