"""A judge for generated digits: a small CNN trained once on the training digits and cached, which
scores samples two ways.

- Class-conditional accuracy: the share of samples drawn for class y that the judge calls y.
- Fréchet distance (FID's formula, on this judge's features instead of Inception's): between the
  Gaussians fitted to the judge's penultimate features of generated and of held-out real images,

      FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r^{1/2} S_g S_r^{1/2})^{1/2})

  (the symmetric form of tr sqrt(S_g S_r), computed with two eigendecompositions in float64).

The judge is trained on ``train`` only (never on the held-out ``test`` digits it is checked on),
with one-pixel random shifts; its held-out accuracy is stored beside its weights. The cache is a
safetensors file written atomically and keyed by dataset and recipe version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.data.corpus import default_cache_dir
from condcomp.data.digits import NUM_CLASSES, load_digits
from condcomp.files import write_json_atomic

RECIPE = "v1"  # bump when the architecture or training changes: old caches are then ignored
FEATURES = 128
SHIFT = 2


class DigitJudge(nn.Module):
    """CNN: x [b, 1, H, W] in [-1, 1] -> (logits [b, 10], features [b, 128])."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(7))
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 49, FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, NUM_CLASSES))

    def forward(self, x: torch.Tensor):
        f = self.features(self.conv(x))
        return self.head(f), f


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``SHIFT`` pixels in each direction (padded with the background, -1)."""
    b = x.shape[0]
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=generator)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def judge_accuracy(judge: DigitJudge, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    judge.eval()
    right = sum(int((judge(images[i:i + batch])[0].argmax(-1) == labels[i:i + batch]).sum())
                for i in range(0, len(labels), batch))
    return right / max(1, len(labels))


def train_judge(dataset: str = "mnist", *, epochs: int = 20, seed: int = 0) -> tuple[DigitJudge, float]:
    """Train a judge on ``dataset``'s training digits. Returns (judge in eval mode, held-out accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits(dataset, "train")
    judge = DigitJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(y) // 100)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - 99, 100):
            idx = order[i:i + 100]
            loss = F.cross_entropy(judge(_shift(x[idx], gen))[0], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    xt, yt = load_digits(dataset, "test")
    return judge.eval(), judge_accuracy(judge, xt, yt)


def load_judge(dataset: str = "mnist", cache_dir: str | Path | None = None) -> tuple[DigitJudge, float]:
    """The cached judge for ``dataset`` (trained and cached on first use, about a minute on 2 cores).
    Returns (judge in eval mode, its held-out accuracy)."""
    from safetensors.torch import load_model, save_model

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    weights = folder / f"digit-judge-{dataset}-{RECIPE}.safetensors"
    meta = weights.with_suffix(".json")
    judge = DigitJudge()
    if weights.is_file() and meta.is_file():
        try:
            load_model(judge, str(weights))
            return judge.eval(), float(json.loads(meta.read_text())["held_out_accuracy"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    judge, accuracy = train_judge(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f"{weights.name}.tmp-{os.getpid()}")
    save_model(judge, str(tmp))
    os.replace(tmp, weights)
    write_json_atomic(meta, {"dataset": dataset, "recipe": RECIPE, "held_out_accuracy": accuracy})
    return judge, accuracy


@torch.no_grad()
def judge_features(judge: DigitJudge, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate features [n, 128] of images [n, 1, H, W] (clamped to [-1, 1] first)."""
    judge.eval()
    return torch.cat([judge(images[i:i + batch].clamp(-1, 1).float())[1] for i in range(0, len(images), batch)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, f] and b [m, f] (module docstring)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_b)
    root_b = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)
