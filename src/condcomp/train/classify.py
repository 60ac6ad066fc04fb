"""Training and evaluation of sequence classifiers built by ``condcomp.convert`` (CoDA and baselines).

A run folder holds the inference model (``model.safetensors``, ``coda.json``, tokenizer),
``checkpoints/step_*`` for resuming, ``metrics.jsonl`` and ``result.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from condcomp.convert.coda import CodaClassifier
from condcomp.convert.saved import save_converted
from condcomp.data.labelled import LabelledText
from condcomp.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from condcomp.settings import Settings, setting
from condcomp.train.metrics_log import MetricsLog
from condcomp.train.optim import autocast, build_optimizer, warmup_linear
from condcomp.train.trainer import TrainingError


@dataclass
class ClassifyConfig(Settings):
    """steps x batch_size examples are seen (the same budget for every method); lr peaks after
    warmup (a fraction of steps) and decays linearly to 0. precision: "fp32" or "bf16" (autocast)."""

    steps: int = setting(300, ge=1)
    batch_size: int = setting(16, ge=1)
    lr: float = setting(1e-3, gt=0.0)
    weight_decay: float = setting(0.01, ge=0.0)
    warmup: float = setting(0.1, ge=0.0, lt=1.0, help="a fraction of steps")
    precision: str = setting("bf16", choices=("fp32", "bf16"))
    seed: int = setting(0, ge=0)
    eval_batch_size: int = setting(32, ge=1)
    checkpoint_every: int = setting(100, ge=1)
    log_every: int = setting(10, ge=1)
    distill_steps: int = setting(0, ge=0, help="CoDA's distillation phase before the task (method coda only)")


class Tokenized:
    """Token ids of each text (truncated to max_length, no padding) with its label."""

    def __init__(self, data: LabelledText, tokenizer, max_length: int):
        self.ids = tokenizer(data.texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = torch.tensor(data.labels, dtype=torch.int64)
        self.description = data.description

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input_ids [b, t] (0-padded to the longest), attention_mask [b, t] int64, labels [b]."""
        rows = list(rows)
        t = max(len(self.ids[i]) for i in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.int64)
        mask = torch.zeros(len(rows), t, dtype=torch.int64)
        for j, i in enumerate(rows):
            ids[j, :len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[j, :len(self.ids[i])] = 1
        return ids, mask, self.labels[rows]


@torch.no_grad()
def evaluate_accuracy(model: CodaClassifier, data: Tokenized, *, batch_size: int = 32, precision: str = "fp32") -> float:
    """Accuracy in [0, 1]; examples batched by length so little padding is computed. Runs on the
    model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        ids, mask, labels = (t.to(device) for t in data.batch(order[start:start + batch_size]))
        with autocast(precision, device.type):
            logits = model(ids, mask)
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(data))


def _lr_factor(step: int, cfg: ClassifyConfig) -> float:
    """Warmup then linear decay, restarted at the phase boundary (distillation, then the task)."""
    if step < cfg.distill_steps:
        return warmup_linear(step, warmup_fraction=cfg.warmup, total=cfg.distill_steps)
    return warmup_linear(step - cfg.distill_steps, warmup_fraction=cfg.warmup, total=cfg.steps)


def train_classifier(model: CodaClassifier, train: Tokenized, val: Tokenized, cfg: ClassifyConfig, out: str | Path,
                     *, tokenizer=None, resume: bool = True, progress: bool = True) -> dict:
    """Train for cfg.steps steps (resuming from the newest checkpoint in ``out`` if there is one),
    save the inference model to ``out`` and return the result (also written to out/result.json).
    Trains on the model's device (move it there first)."""
    device = next(model.parameters()).device
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds = 0, 0.0
    generator = torch.Generator().manual_seed(cfg.seed)
    checkpoints = list_checkpoints(out) if resume else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model)
        opt.load_state_dict(state["optimizer"])
        step, seconds = int(state["step"]), float(state["seconds"])
        generator.set_state(state["generator"])
    log = MetricsLog(out / "metrics.jsonl")
    log.truncate_after(step)  # lines after the checkpoint will be written again
    meta = {"coda": model.config.to_dict(), "train": cfg.to_dict()}
    model.train()
    if cfg.distill_steps and model.config.method != "coda":
        raise TrainingError("distill_steps applies to method 'coda' only (the others start as the pretrained model)")
    total = cfg.distill_steps + cfg.steps
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"{model.config.method}", unit="step")
    while step < total:
        distilling = step < cfg.distill_steps
        rows = torch.randint(len(train), (cfg.batch_size,), generator=generator).tolist()
        ids, mask, labels = (t.to(device) for t in train.batch(rows))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        started = time.perf_counter()
        with autocast(cfg.precision, device.type):
            if distilling:
                loss, metrics = model.distillation_loss(ids, mask), {}
            else:
                logits, metrics = model.classify(ids, mask)
                loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at step {step}; lower --lr (now {cfg.lr}) "
                                f"or resume from the last checkpoint in {out / 'checkpoints'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - started
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            record = {"step": step, "phase": "distill" if distilling else "task", "loss": loss.item(),
                      "seconds": round(seconds, 2)}
            record.update({k: round(float(v), 4) for k, v in metrics.items() if k.endswith("mean_weight")})
            log.append(record)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.checkpoint_every == 0 and step < total:
            save_checkpoint(out, step, model, {"optimizer": opt.state_dict(), "step": step, "seconds": seconds,
                                               "generator": generator.get_state()}, meta)
    bar.close()
    val_acc = evaluate_accuracy(model, val, batch_size=cfg.eval_batch_size, precision=cfg.precision)
    result = {"method": model.config.method, "reduction": model.config.reduction, "steps": cfg.steps,
              "distill_steps": cfg.distill_steps,
              "train_seconds": round(seconds, 1), "val_accuracy": val_acc,
              "trainable_parameters": model.trainable_parameters(), "val": val.description}
    save_converted(model, out, tokenizer=tokenizer, extra={"result": result, "train": cfg.to_dict()})
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
