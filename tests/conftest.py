"""Shared fixtures: tiny configs and generated text so tests stay fast and offline."""

from __future__ import annotations

import random

import pytest

from condcomp.config import load_config


@pytest.fixture
def text_file(tmp_path):
    """A ~60 KB generated text file: enough for train/val/test windows of a tiny model."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "routing", "expert", "token", "layer", "skip", "depth"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(6000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(data_path, run_dir, cache_dir, **extra) -> list[str]:
    sets = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 32,
        "data.source": str(data_path), "data.cache_dir": str(cache_dir),
        "train.steps": 20, "train.batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 5,
        "train.eval_every": 10, "train.eval_batches": 2, "train.checkpoint_every": 10,
        "train.log_every": 1, "train.progress": False, "train.precision": "fp32",
        "run_dir": str(run_dir),
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture
def tiny_config(text_file, tmp_path):
    """Factory: a validated tiny RunConfig writing to tmp_path/<name>."""

    def make(name: str = "run", **extra):
        return load_config(None, tiny_overrides(text_file, tmp_path / name, tmp_path / "cache", **extra))

    return make
