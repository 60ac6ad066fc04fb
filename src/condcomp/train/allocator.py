"""Host-memory allocator settings for training on CPU.

Routed layers allocate tensors whose shapes change every step (how many tokens each expert or block
got). glibc's malloc serves allocations under its mmap threshold from the heap, and it *raises* that
threshold each time a large block is freed; after a few steps of varying shapes most activations
live in the heap, whose free holes are rarely returned to the system. The process's resident memory
then climbs for tens of steps — 0.55 -> 1.8 GB for learned skipping (docs/results.md) — without any
tensor leaking.

``tune_allocator`` pins the threshold (so large tensors are mmapped and unmapped when freed) and
``release_free_memory`` hands the heap's free memory back after a step (``malloc_trim``). The trainer
applies them only with ``train.low_memory: true``: memory handed back must be faulted in again the
next step, which made steps about 2-2.6x slower here (docs/benchmarks.md, "Resident memory").

``tune_for_speed`` does the opposite, and the trainer applies it by default (``train.fast_allocator``):
every tensor comes from the heap, and the heap keeps what is freed, so a step reuses the pages the
last one faulted in. All three are glibc calls through ctypes and no-ops elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024
FAST_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def available() -> bool:
    return _glibc() is not None


def tune_allocator() -> bool:
    """Pin glibc's mmap threshold at 64 KiB for this process. Returns whether anything was set."""
    return available() and bool(_glibc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def tune_for_speed() -> bool:
    """Serve every tensor from the heap (no per-tensor mappings) and keep freed heap memory for reuse
    instead of returning it to the system. Returns whether anything was set.

    With glibc's defaults, a tensor over the mmap threshold (dynamic, at most 32 MiB) is mapped on
    allocation and unmapped when freed, and free memory at the heap's top is handed back, so every
    step faults the same pages in again, zero-filled: about 0.3 ms per MiB here, 20 ms for one
    [32768, 512] fp32 tensor whose arithmetic takes 1 ms (docs/benchmarks.md, "Resident memory").
    Resident memory then stays at the largest the process has needed.
    """
    if not available():
        return False
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, FAST_TRIM_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Return the heap's free memory to the system (after a training step)."""
    if available():
        _glibc().malloc_trim(0)
