"""Who am I in the job: rank, world size, device, backend and the process groups condcomp uses.

``init_distributed`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and starts the default process group: NCCL when CUDA is available, gloo otherwise.
Run as a plain process it returns a single-process runtime, so the trainer has one code path.

Groups for expert parallelism of size P (P divides the world size W), the two dimensions of a
[W/P, P] device mesh (``Runtime.expert_mesh``, dimensions "replicate" and "expert"):
- expert group g = ranks [g*P, (g+1)*P): together they hold every expert once, and exchange tokens;
- replica group i = ranks {i, i+P, i+2P, ...}: they hold the same experts, and average their gradients.
FSDP shards every other parameter over all W ranks (``Runtime.world_mesh``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from condcomp.device import check_device_spec, resolve_device


class DistributedError(RuntimeError):
    """A distributed run is misconfigured or lost a rank; the message says what to do."""


@dataclass
class Runtime:
    """This process's place in the job (world_size 1 = a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    expert_parallel: int = 1
    expert_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None
    world_mesh: DeviceMesh | None = None  # [W]: every rank (FSDP's data-parallel dimension)
    expert_mesh: DeviceMesh | None = None  # [W/P, P] "replicate" x "expert" (expert parallelism only)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, value: float, op: str = "sum") -> float:
        """A Python number reduced over all ranks (sum, mean or max); itself when single-process."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        out = t.item()
        return out / self.world_size if op == "mean" else out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
                               "which sets it") from None


def default_backend(device: str = "auto") -> str:
    """NCCL for GPUs, gloo for CPUs: the two backends PyTorch ships for each. device: the run's
    ``train.device`` spec (auto: GPUs when CUDA is available)."""
    check_device_spec(device)
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store torchrun points at, with keys private to this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, its store still holds the previous
    attempt's keys, and gloo may read a dead worker's address from them ("Connection refused" at
    start-up). Prefixing every key with the restart count gives each attempt a clean namespace.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 29500), world,
                          is_master=not agent_store and _env_int("RANK", 0) == 0, timeout=timeout)
    return dist.PrefixStore(f"condcomp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(*, expert_parallel: int = 1, timeout_s: float | None = None, device: str = "auto") -> Runtime:
    """Start (or join) the process group torchrun describes and build the expert groups.

    device: auto, cpu, cuda or cuda:N (``condcomp.device``). A single process computes there; under
    torchrun each rank uses its local GPU (LOCAL_RANK) with NCCL, or the CPU with gloo for "cpu".
    expert_parallel: ranks each expert bank is spread over (1 = every rank holds every expert).
    timeout_s: how long a collective waits for a missing rank before failing (default 600 s, or
        the CONDCOMP_DIST_TIMEOUT environment variable).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and not dist.is_initialized():
        if expert_parallel != 1:
            raise DistributedError(f"train.expert_parallel={expert_parallel} needs that many ranks, but this is a "
                                   f"single process; launch with torchrun --nproc-per-node {expert_parallel}")
        return Runtime(device=resolve_device(device))
    if timeout_s is None:
        timeout_s = float(os.environ.get("CONDCOMP_DIST_TIMEOUT", 600))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise DistributedError("WORLD_SIZE is set but MASTER_ADDR is not; launch with torchrun (it sets both)")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(default_backend(device), store=_attempt_store(world, timeout), rank=_env_int("RANK", 0),
                                world_size=world, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    if expert_parallel < 1 or world % expert_parallel:
        raise DistributedError(f"train.expert_parallel={expert_parallel} must divide the number of ranks "
                               f"({world}); use 1 (data parallel only) or a divisor of {world}")
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    rt = Runtime(rank=rank, world_size=world, local_rank=local_rank, backend=dist.get_backend(), device=device,
                 expert_parallel=expert_parallel)
    rt.world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    if expert_parallel > 1:
        # Row g of the mesh is expert group g (consecutive ranks), column i is replica group i.
        rt.expert_mesh = init_device_mesh(device.type, (world // expert_parallel, expert_parallel),
                                          mesh_dim_names=("replicate", "expert"))
        rt.expert_group = rt.expert_mesh.get_group("expert")
        if world > expert_parallel:
            rt.replica_group = rt.expert_mesh.get_group("replicate")
    return rt


def shutdown(*, wait_for_peers: bool = True) -> None:
    """Leave the process group. After a normal run (``wait_for_peers``) first wait until every rank
    got here: a rank that tears down its transport while a peer is still finishing its last send
    makes that peer abort at exit (gloo). After an error, leave at once (a peer may be gone)."""
    if dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except RuntimeError:
                pass  # a peer is gone after all: nothing left to wait for
        dist.destroy_process_group()
