"""``train.low_memory``'s host-allocator settings: large freed tensors of varying shapes really go
back to the system once glibc's mmap threshold is pinned, and stay resident without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from condcomp.train import allocator

GLIBC = allocator.available()

PROBE = """
import os, sys, torch
from condcomp.train.allocator import release_free_memory, tune_allocator
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
if sys.argv[1] == "tuned":
    tune_allocator()
base = rss()
pins = []
for step in range(30):  # shapes that change every step, as routed layers' activations do
    big = torch.ones(2_000_000 + 1000 * step)  # 8 MB freed: glibc raises its mmap threshold past it
    del big
    kept = [torch.ones(1000 + 97 * step + 13 * i, 64) for i in range(40)]
    pins.append(torch.ones(8))  # a small tensor that outlives the step, on top of the heap
    del kept
    if sys.argv[1] == "tuned":
        release_free_memory()
print(rss() - base)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_activations_of_varying_shapes_do_not_stay_resident():
    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    tuned, default = growth("tuned"), growth("default")
    assert tuned < 20 < default  # MiB: freed memory went back to the system only when tuned


def test_low_memory_training_runs_and_matches_the_default(tiny_config):
    import torch

    from condcomp.train import Trainer

    losses = {}
    for low in (False, True):
        cfg = tiny_config(f"low-{low}", **{"train.low_memory": low, "train.steps": 3, "model.ffn": "moe",
                                           "model.moe.num_experts": 4})
        losses[low] = Trainer(cfg).train().losses
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)  # memory handling changes no number
