"""Training a class-conditional DiT on digits with rectified flow: the LM trainer's guarantees for an
image model — bf16 autocast, executed-FLOP counting (and FLOP budgets for equal-compute grids),
atomic verified checkpoints, exact resume, NaN stop, Ctrl-C saves, a progress bar and JSONL metrics.

Exactness: the images, labels, noise, times and dropped labels of step s are a pure function of
(seed, s), and a checkpoint holds model, EMA weights, optimizer, schedule and counters, so a resumed
run continues as if it had never stopped. Samples are drawn from the EMA weights (standard for
diffusion models: much smoother samples than the raw weights of a short run).

Evaluation (every ``eval_every`` steps and at the end) writes: the flow loss on a fixed held-out
batch with fixed noise; and, from ``eval_samples`` samples, the judge's class-conditional accuracy
and the Fréchet distance to the held-out digits (``condcomp.models.digit_judge``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from condcomp import registry
from condcomp.data.digits import load_digits
from condcomp.device import resolve_device
from condcomp.dit_config import DiTConfig, DiTRunConfig
from condcomp.flops import flop_counter
from condcomp.models.dit import DiT
from condcomp.models.flow import flow_loss, sample
from condcomp.settings import ConfigError, from_dict
from condcomp.train import checkpoint as ckpt
from condcomp.train.metrics_log import MetricsLog
from condcomp.train.optim import autocast, build_optimizer, warmup_cosine
from condcomp.train.run_guard import RunLock, StopRequest
from condcomp.train.trainer import TrainingError, TrainingInterrupted


def dit_config_from_checkpoint(path: str | Path) -> DiTRunConfig:
    saved = ckpt.read_config(path)
    if saved.get("kind") != "dit":
        raise TrainingError(f"{path} is not a DiT checkpoint (it holds a {'language model' if 'model' in saved else 'different'}"
                            " run); `condcomp dit` commands take runs made by `condcomp dit train`")
    return from_dict(DiTRunConfig, saved)


def load_dit(path: str | Path, *, ema: bool = True) -> tuple[DiT, DiTRunConfig]:
    """A trained DiT (EMA weights by default) in eval mode, from a run or checkpoint folder."""
    folder = ckpt.resolve_checkpoint(path)
    cfg = dit_config_from_checkpoint(folder)
    model = DiT(cfg.model)
    state = ckpt.load_checkpoint(folder, model)
    if ema:
        model.load_state_dict({**model.state_dict(), **state["ema"]})
    return model.eval(), cfg


def aux_loss_weights(cfg: DiTConfig) -> dict[str, float]:
    return dict(registry.get("ffn", cfg.ffn).aux_loss_weights)


class DiTTrainer:
    """Trains a DiT as a DiTRunConfig says; ``run()`` returns the final metrics record."""

    def __init__(self, cfg: DiTRunConfig, *, resume: bool = False):
        self.cfg = cfg
        tc = cfg.train
        self.device = resolve_device(tc.device)
        torch.manual_seed(tc.seed)
        self.model = DiT(cfg.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.images, self.labels = load_digits(cfg.data.dataset, "train")
        self.test_images, self.test_labels = load_digits(cfg.data.dataset, "test")
        self.run_dir = Path(cfg.run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.aux_weights = aux_loss_weights(cfg.model)
        self.step, self.total_flops, self.last_step_flops, self.train_seconds = 0, 0.0, 0.0, 0.0
        self.optimizer = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay)
        warmup, total, floor = tc.warmup_steps, tc.steps, tc.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=warmup, total=total, min_ratio=floor,
                                                    budget_progress=self.budget_progress()))
        self.lock = RunLock(self.run_dir)
        self.lock.acquire(TrainingError)
        try:
            self._prepare(resume)
        except BaseException:
            self.lock.release()
            raise

    # -- run folder ------------------------------------------------------------------------

    def _prepare(self, resume: bool) -> None:
        existing = ckpt.list_checkpoints(self.run_dir)
        if existing and not resume:
            raise TrainingError(f"run folder {self.run_dir} already has checkpoints (newest {existing[-1].name}); "
                                "pass --resume to continue it, or choose another run_dir (nothing was overwritten)")
        if not existing:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.reset()
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            return
        path = existing[-1]
        saved = dit_config_from_checkpoint(path)
        if saved.model != self.cfg.model:
            raise TrainingError(f"checkpoint {path} was trained with a different model config; resume with the "
                                "config it was saved with")
        state = ckpt.load_checkpoint(path, self.model)
        self.ema.load_state_dict({**self.ema.state_dict(), **state["ema"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.total_flops = int(state["step"]), float(state["total_flops"])
        self.last_step_flops, self.train_seconds = float(state["last_step_flops"]), float(state["train_seconds"])
        self.metrics.truncate_after(self.step)  # lines after the checkpoint will be written again
        print(f"resumed {self.run_dir} at step {self.step}")

    def _save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "step": self.step, "total_flops": self.total_flops,
                 "last_step_flops": self.last_step_flops, "train_seconds": self.train_seconds,
                 "ema": {k: v.clone() for k, v in self.ema.state_dict().items()}}
        return ckpt.save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.to_dict())

    # -- budget ------------------------------------------------------------------------------

    def budget_progress(self) -> float:
        mf = self.cfg.train.max_flops
        return self.total_flops / mf if mf else 0.0

    def budget_spent(self) -> bool:
        mf = self.cfg.train.max_flops
        return bool(mf) and self.total_flops + 0.5 * self.last_step_flops >= mf

    # -- steps -------------------------------------------------------------------------------

    def batch(self, step: int):
        """(images, labels, noise generator) of training step ``step``: a pure function of (seed, step)."""
        tc = self.cfg.train
        rng = np.random.default_rng([tc.seed, step])
        idx = torch.from_numpy(rng.integers(0, len(self.labels), size=tc.batch_size))
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return self.images[idx].to(self.device), self.labels[idx].to(self.device), gen

    def train_step(self) -> dict:
        tc = self.cfg.train
        x, y, gen = self.batch(self.step)
        count = self.step % tc.flops_every == 0 or self.last_step_flops == 0
        counter = flop_counter() if count else contextlib.nullcontext()
        self.model.train()
        with counter:
            with autocast(tc.precision, self.device.type):
                loss, infos = flow_loss(self.model, x, y, generator=gen, label_dropout=tc.label_dropout,
                                         time_sampling=tc.time_sampling)
                aux = sum((self.aux_weights.get(name, 0.0) * value for info in infos
                           for name, value in info.aux_losses.items()), torch.zeros(()))
                total = loss + aux
            total.backward()
        if count:
            self.last_step_flops = float(counter.get_total_flops())
        if not torch.isfinite(total):
            raise TrainingError(f"training diverged at step {self.step}: the loss became {total.item()}; lower "
                                f"train.lr (now {tc.lr:g}) or use train.precision=fp32 (the last checkpoint is intact)")
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            decay = min(tc.ema, (1 + self.step) / (10 + self.step))  # short runs: the EMA warms up
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        return {"loss": loss.item(), "aux": float(aux.detach())}

    @torch.no_grad()
    def held_out_loss(self, n: int = 256) -> float:
        """Flow loss of the EMA model on the first n held-out digits with fixed noise and times."""
        gen = torch.Generator().manual_seed(12345)
        x, y = self.test_images[:n].to(self.device), self.test_labels[:n].to(self.device)
        with autocast(self.cfg.train.precision, self.device.type):
            loss, _ = flow_loss(self.ema, x, y, generator=gen, label_dropout=0.0)
        return loss.item()

    def evaluate(self) -> dict:
        from condcomp.models.digit_judge import frechet_distance, judge_accuracy, judge_features, load_judge

        tc = self.cfg.train
        judge, _ = load_judge(self.cfg.data.dataset)
        n = tc.eval_samples
        labels = torch.arange(n) % self.cfg.model.num_classes
        gen = torch.Generator().manual_seed(777)
        with autocast(tc.precision, self.device.type):
            images = sample(self.ema, labels, steps=tc.sample_steps, guidance=tc.guidance, generator=gen).float().cpu()
        real = judge_features(judge, self.test_images)
        return {"val_loss": self.held_out_loss(), "sample_accuracy": judge_accuracy(judge, images.clamp(-1, 1), labels),
                "frechet": frechet_distance(judge_features(judge, images), real)}

    def run(self) -> dict:
        tc = self.cfg.train
        bar = tqdm(total=tc.steps, initial=self.step, disable=not tc.progress, unit="step", dynamic_ncols=True,
                   mininterval=1.0, desc=self.run_dir.name)
        record: dict = {}
        try:
            with StopRequest() as stop:
                while self.step < tc.steps and not self.budget_spent():
                    t0 = time.perf_counter()
                    out = self.train_step()
                    self.step += 1
                    self.train_seconds += time.perf_counter() - t0
                    self.total_flops += self.last_step_flops
                    bar.update(1)
                    last = self.step >= tc.steps or self.budget_spent()
                    if self.step % tc.log_every == 0 or last:
                        record = {"step": self.step, **out, "flops": self.total_flops,
                                  "lr": self.scheduler.get_last_lr()[0], "seconds": self.train_seconds}
                        if self.step % tc.eval_every == 0 or last:
                            record.update(self.evaluate())
                        self.metrics.append(record)
                        bar.set_postfix(loss=f"{out['loss']:.4f}")
                    if self.step % tc.checkpoint_every == 0 or last:
                        self._save()
                    if stop.requested:
                        self._save()
                        raise TrainingInterrupted(f"stopped by {stop.name} at step {self.step} after saving a "
                                                  f"checkpoint; continue with: condcomp dit train --run-dir {self.run_dir} --resume")
        finally:
            bar.close()
            self.lock.release()
        return record


def parse_classes(text: str, num_classes: int) -> list[int]:
    """"0-9", "3", "1,4,7" -> class indices, each checked against the model's classes."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"--classes {text!r}: expected class numbers like 0-9 or 1,4,7") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out:
        raise ConfigError(f"--classes {text!r}: unknown class label {bad[0] if bad else '(none given)'}; the model "
                          f"knows 0..{num_classes - 1}")
    return out


def image_grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """images [n, 1, H, W] in [-1, 1] -> one uint8 grid [rows * (H + 2), cols * (W + 2)] (2-px gutters)."""
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + 2), cols * (w + 2)), 0, dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = pixels[i]
    return grid
