"""Activation checkpointing of whole blocks: the forward pass keeps only a block's input, and backward
runs the block again to get the activations it needs (``torch.utils.checkpoint``, non-reentrant).

Two things must stay true when a block runs twice:
- Layers with side effects in training forward (expert choice's inference thresholds, an EMA) must
  apply them once: they check ``is_recomputing()``.
- Recomputation is real work: ``count_recomputed_flops`` measures it, so a trainer reports the FLOPs
  the model needs (forward + backward) and the FLOPs the machine executed (those plus recomputation).
  The same sink takes other work that is executed but not the model's: the padding rows dispatch adds
  so shapes repeat (``add_overhead_flops``).
  RNG (router jitter, dropout) is replayed by torch.utils.checkpoint, so the recomputed block makes
  the same choices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch.utils.checkpoint import checkpoint

_recomputing = 0  # depth of recomputation now running (a counter, as checkpoints may nest)
_recomputed_flops: list[float] | None = None  # the sink while a trainer counts this step's FLOPs


def is_recomputing() -> bool:
    """True while a checkpointed block is being run again in backward."""
    return _recomputing > 0


@contextlib.contextmanager
def _recompute_context() -> Iterator[None]:
    global _recomputing
    _recomputing += 1
    try:
        if _recomputed_flops is None:
            yield
        else:
            from condcomp.flops import flop_counter

            sink = _recomputed_flops
            counter = flop_counter()
            try:
                with counter:  # counts alongside any outer counter: both see each op
                    yield
            finally:  # recomputation stops early (by an exception) once it has what backward needs
                sink.append(float(counter.get_total_flops()))
    finally:
        _recomputing -= 1


def _contexts():
    return contextlib.nullcontext(), _recompute_context()


def run_checkpointed(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` keeping only its inputs for backward, where it is recomputed."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def counting_overhead() -> bool:
    """Whether a trainer is counting this step's FLOPs (so executed-only work should be reported)."""
    return _recomputed_flops is not None


def add_overhead_flops(flops: float) -> None:
    """Report FLOPs that were executed but are not the model's (counted by the outer FLOP counter, so
    the trainer takes them out of the model FLOPs); a no-op when no trainer is counting."""
    if _recomputed_flops is not None:
        _recomputed_flops.append(float(flops))


@contextlib.contextmanager
def count_recomputed_flops() -> Iterator[list[float]]:
    """Within the block, FLOPs of every recomputation (and any ``add_overhead_flops``) are appended to the
    yielded list (sum it after backward)."""
    global _recomputed_flops
    previous, _recomputed_flops = _recomputed_flops, []
    try:
        yield _recomputed_flops
    finally:
        _recomputed_flops = previous

