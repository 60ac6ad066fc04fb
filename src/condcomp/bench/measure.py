"""Timing and activation-memory helpers for benchmark scripts (tables, never timed tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.utils.benchmark as tb

from condcomp.train.optim import autocast


def parameter_storages(modules: Iterable[torch.nn.Module]) -> set[int]:
    """Storage addresses of the modules' parameters (excluded from activation memory)."""
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def saved_bytes(fn: Callable[[], torch.Tensor], params: set[int]) -> int:
    """Activation bytes kept for backward by one call of fn (unique storages, parameters excluded),
    plus its output: the activation memory of forward+backward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return sum(seen.values()) + y.numel() * y.element_size()


def timed_pair(fn: Callable[[], object], ref_fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median seconds of fn and of ref_fn, timed alternately round by round so that drift in the
    machine's speed (frequency, the other core) hits both alike."""
    timers = [tb.Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for f in (fn, ref_fn)]
    a, b = [], []
    for _ in range(rounds):
        a.append(timers[0].timeit(1).median)
        b.append(timers[1].timeit(1).median)
    return sorted(a)[rounds // 2], sorted(b)[rounds // 2]


def gemm_rate(dtype: torch.dtype, n: int = 2048, rounds: int = 5, device: str | torch.device = "cpu") -> float:
    """FLOP/s of one plain n x n x n matmul: the physical limit a benchmark's rows are compared with."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed_alternating({"gemm": lambda: a @ b}, rounds, warmup=1)["gemm"]


def timed_alternating(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed one call each in turn, round by round, so
    drift in the machine's speed hits every function alike (the many-way form of timed_pair)."""
    timers = {name: tb.Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads()) for name, f in fns.items()}
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(1).median)
    return {name: sorted(t)[rounds // 2] for name, t in times.items()}


@dataclass
class Prepared:
    """forward: no-grad forward; both: forward+backward; act_bytes: activation memory of ``both``."""

    forward: Callable[[], None]
    both: Callable[[], None]
    act_bytes: int


def prepare(fwd: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, precision: str, params: set[int]) -> Prepared:
    """Callables timing y = fwd(x) under the trainer's autocast for ``precision`` (fp32|bf16)."""

    def f_only():
        with torch.no_grad(), autocast(precision):
            fwd(x)

    xg = x.detach().requires_grad_(True)

    def f_fwd():
        with autocast(precision):
            return fwd(xg)

    grad = torch.randn_like(f_fwd())

    def f_both():
        f_fwd().backward(grad)

    f_only(), f_both()  # warm-up
    return Prepared(f_only, f_both, saved_bytes(f_fwd, params))


@torch.no_grad()
def inference_tokens_per_s(model, data, precision: str, batch: int = 8, min_time: float = 1.0) -> float:
    """Forward-only tokens/s of an LM in inference mode on validation windows of ``data`` (uint8 array),
    timed with torch.utils.benchmark on all threads, on the model's device."""
    from condcomp.data import eval_batches

    device = next(model.parameters()).device
    x, _ = next(iter(eval_batches(data, batch_size=batch, seq_len=model.cfg.seq_len, max_batches=1)))
    x = x.to(device)

    def run():
        with autocast(precision, device.type):
            model(x)

    run()
    t = tb.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return x.numel() / t.median
