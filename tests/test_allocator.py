"""The trainer's host-allocator settings: with ``train.low_memory`` freed activations go back to the
system (without it they stay resident in the heap holes below a live allocation); with
``train.fast_allocator`` (the default) freed tensors stay for reuse; training is unchanged by either."""

from __future__ import annotations

import subprocess
import sys

import pytest

from condcomp.train import allocator

GLIBC = allocator.available()

PROBE = """
import os, torch
from condcomp.train.allocator import release_free_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
base = rss()
blocks = [torch.ones(15_000) for _ in range(1000)]  # 60 KB each: heap-allocated under any threshold
pin = torch.ones(8)  # allocated after them, on top of the heap: free() can only trim above it
del blocks
kept = rss() - base
release_free_memory()
print(kept, rss() - base)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_activations_are_returned_to_the_system():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    kept, after_trim = (float(v) for v in out.stdout.split())
    if kept < 40:
        pytest.skip(f"this process's allocator already returned the freed memory ({kept:.0f} of 60 MiB kept)")
    assert after_trim < 10  # MiB of the 60 freed: returned by the trim


FAST_PROBE = """
import os, sys, torch
from condcomp.train.allocator import tune_for_speed
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
if sys.argv[1] == "fast":
    assert tune_for_speed()
base = rss()
blocks = [torch.ones(250_000) for _ in range(60)]  # 1 MB each: mapped per tensor under glibc's defaults
del blocks
kept = rss() - base
blocks = [torch.ones(250_000) for _ in range(60)]  # the same again: reuses the kept pages
print(kept, rss() - base)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_fast_allocator_keeps_freed_tensors_for_the_next_step():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", FAST_PROBE, mode], capture_output=True, text=True, check=True)
        return [float(v) for v in out.stdout.split()]

    kept, again = probe("fast")
    assert kept > 40 and again < kept + 10  # MiB of 57: kept resident, then reused rather than grown
    kept_default, _ = probe("default")
    assert kept_default < 10  # glibc's defaults hand 1 MB tensors straight back


def test_allocator_settings_change_no_training_number(tiny_config):
    import torch

    from condcomp.train import Trainer

    losses = {}
    for low, fast in ((False, True), (True, True), (False, False)):
        cfg = tiny_config(f"low-{low}-{fast}", **{"train.low_memory": low, "train.fast_allocator": fast,
                                                 "train.steps": 3, "model.ffn": "moe", "model.moe.num_experts": 4})
        losses[(low, fast)] = Trainer(cfg).train().losses
    for other in ((True, True), (False, False)):
        torch.testing.assert_close(losses[other], losses[(False, True)], rtol=0, atol=0)
