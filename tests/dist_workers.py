"""Multi-process test helpers: start N gloo ranks on this machine the way torchrun would (same
environment variables), run a worker function in each, and collect what each rank saved."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CONDCOMP_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    from condcomp.distributed import shutdown

    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        shutdown(wait_for_peers=False)
        raise
    shutdown()


def run_ranks(fn, world: int, out_dir: Path, *args) -> list:
    """Run fn(rank, world, *args) in ``world`` processes; return each rank's return value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), str(out_dir), fn, args), nprocs=world,
                           start_method="spawn")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("rank*.err")))
        raise AssertionError(f"a rank failed:\n{errors}") from None
    except mp.ProcessExitedException:
        # gloo occasionally aborts a process in interpreter teardown ("terminate called without an
        # active exception"), after the process group was destroyed. Every rank that wrote its result
        # had finished its work; anything else is a real failure.
        finished = all((out_dir / f"rank{r}.pt").is_file() for r in range(world))
        if not finished or any(out_dir.glob("rank*.err")):
            raise
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
