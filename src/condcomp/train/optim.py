"""Optimizer and learning-rate schedules shared by the LM trainer and the classifier trainer."""

from __future__ import annotations

import contextlib
import math

import torch

from condcomp.device import resolve_precision


def autocast(precision: str, device_type: str = "cpu"):
    """bf16 autocast for precision "bf16", nothing for "fp32"; "auto" is bf16 on CUDA, fp32 elsewhere."""
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norm gains, biases) do not. A
    parameter with an ``lr_scale`` attribute (L0 gate logits, which must travel far in a short
    fine-tune) trains at ``lr * lr_scale`` without decay, in a group of its own."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in trainable if not hasattr(p, "lr_scale")]
    groups = [{"params": [p for p in plain if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in plain if p.dim() < 2], "weight_decay": 0.0}]
    for scale in sorted({float(p.lr_scale) for p in trainable if hasattr(p, "lr_scale")}):
        groups.append({"params": [p for p in trainable if getattr(p, "lr_scale", None) == scale],
                       "weight_decay": 0.0, "lr": lr * scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float, budget_progress: float = 0.0) -> float:
    """LR factor: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps — or
    earlier, when ``budget_progress`` (fraction of a FLOPs or time budget spent) is further along."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), budget_progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, *, warmup_fraction: float, total: int) -> float:
    """LR factor: linear warmup over ``warmup_fraction`` of ``total`` steps, then linear decay to 0."""
    warm = max(1, math.ceil(warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))
