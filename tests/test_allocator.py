"""The trainer's host-allocator settings: on with glibc, off with CONDCOMP_MALLOC=default, and large
freed tensors really go back to the system once the threshold is pinned."""

from __future__ import annotations

import subprocess
import sys

import pytest

from condcomp.train import allocator

GLIBC = allocator._glibc() is not None

PROBE = """
import os, torch
from condcomp.train.allocator import release_free_memory, tune_allocator
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
tune_allocator()
base = rss()
for step in range(30):  # shapes that change every step, as routed layers' activations do
    kept = [torch.ones(1000 + 97 * step + 13 * i, 64) for i in range(40)]
    del kept
    release_free_memory()
print(rss() - base)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_settings_apply_with_glibc_and_can_be_turned_off(monkeypatch):
    assert allocator.tune_allocator() is True
    monkeypatch.setenv("CONDCOMP_MALLOC", "default")
    assert allocator.tune_allocator() is False and not allocator.enabled()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_activations_of_varying_shapes_do_not_stay_resident():
    def growth(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE], env={"CONDCOMP_MALLOC": mode, "PATH": ""},
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert growth("tuned") < 20  # MiB: the tensors (up to ~16 MiB each step) were all returned
