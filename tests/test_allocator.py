"""``train.low_memory``'s host-allocator settings: freed activations go back to the system with them
and stay resident without them (the heap holes below a live allocation), and training is unchanged."""

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


def test_low_memory_training_runs_and_matches_the_default(tiny_config):
    import torch

    from condcomp.train import Trainer

    losses = {}
    for low in (False, True):
        cfg = tiny_config(f"low-{low}", **{"train.low_memory": low, "train.steps": 3, "model.ffn": "moe",
                                           "model.moe.num_experts": 4})
        losses[low] = Trainer(cfg).train().losses
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)  # memory handling changes no number
