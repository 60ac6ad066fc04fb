"""``condcomp compare``: train every variant of a grid under one budget, then measure and report.

A grid file (YAML):

    name: demo
    budget: {flops: 1.5e13}          # equal training FLOPs as counted by the trainer, or {seconds: 60}
    base: {model: {...}, train: {...}}   # a RunConfig mapping, or a path to a config file
    common: [train.seed=0, train.eval_batches=16]   # applied to every variant last (same data, seed, eval)
    variants:
      dense: {}                                  # the base as is
      moe-top1: {set: [model.ffn=moe, model.moe.k=1]}
      mod: {config: ../mod.yaml, set: [...]}     # a whole config file instead of the base

Each variant trains in its own process (so its peak memory is its own) under
``<out>/variants/<name>``; ``result.json`` marks it finished, so an interrupted grid resumes where it
stopped and never retrains a finished variant (an unfinished one resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from condcomp.config import ConfigError, RunConfig, from_dict
from condcomp.settings import apply_override


@dataclass
class Grid:
    name: str
    budget_kind: str  # "flops" | "seconds"
    budget: float
    variants: dict[str, RunConfig]
    source: str = ""


@dataclass
class VariantResult:
    """One variant's numbers, all read from its own run (metrics.jsonl) or measured on its checkpoint."""

    name: str
    val_bpb: float
    total_params: int
    active_params: int
    train_flops: float
    train_seconds: float
    steps: int
    train_tokens_per_s: float
    infer_tokens_per_s: float
    peak_rss_mib: float
    curve: list[dict] = field(default_factory=list)  # eval records: step, val_bpb, total_flops, train_seconds
    loads: dict[str, list[int]] = field(default_factory=dict)  # router name -> tokens per group


def _load_mapping(value, where: Path, what: str) -> dict:
    if isinstance(value, str):
        path = (where / value) if not Path(value).is_absolute() else Path(value)
        if not path.is_file():
            raise ConfigError(f"{what}: config file not found: {path}")
        return yaml.safe_load(path.read_text()) or {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping or a config path, got {type(value).__name__}")
    return json.loads(json.dumps(value))  # deep copy


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid; every variant's config is built (and checked) here, before training."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "budget", "base", "common", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}; valid: name, budget, base, common, variants")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("flops", "seconds"):
        raise ConfigError(f"{path}: budget must be {{flops: N}} (equal training FLOPs) or {{seconds: N}} "
                          f"(equal wall clock), got {budget!r}")
    kind, amount = next(iter(budget.items()))
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: budget.{kind} must be a number, got {amount!r}") from None
    if amount <= 0:
        raise ConfigError(f"{path}: budget.{kind} must be > 0")
    variants_raw = raw.get("variants") or {}
    if not variants_raw:
        raise ConfigError(f"{path}: the grid has no variants")
    common = list(raw.get("common") or []) + list(overrides or [])
    variants = {}
    for name, spec in variants_raw.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"config", "set"}:
            raise ConfigError(f"variants.{name}: expected {{config: PATH, set: [key=value, ...]}} (both optional)")
        cfg = _load_mapping(spec["config"] if "config" in spec else raw.get("base"), path.parent, f"variants.{name}")
        for assignment in list(spec.get("set") or []) + common:
            apply_override(cfg, assignment)
        cfg.setdefault("train", {})
        cfg["train"].pop("max_flops", None)
        cfg["train"].pop("max_seconds", None)
        cfg["train"]["max_flops" if kind == "flops" else "max_seconds"] = amount
        cfg["train"]["steps"] = 10_000_000  # the budget decides when to stop (and drives the LR schedule)
        try:
            variants[name] = from_dict(RunConfig, cfg)
        except ConfigError as e:
            raise ConfigError(f"variants.{name}: {e}") from None
    return Grid(name=str(raw.get("name") or path.stem), budget_kind=kind, budget=amount, variants=variants,
                source=path.read_text())


# ------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _train_in_subprocess(config_path: Path) -> float:
    """Train (resuming if a checkpoint exists) in a child process; returns its peak RSS in MiB."""
    cmd = [sys.executable, "-m", "condcomp", "train", "--config", str(config_path), "--resume"]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"training {config_path.parent.name} failed (exit {proc.returncode}); fix the error above "
                           f"and run the same compare command again to resume")
    return usage.ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def inference_tokens_per_s(model, data, precision: str, batch: int = 8, min_time: float = 1.0) -> float:
    """Forward-only tokens/s in inference mode on validation windows (torch.utils.benchmark, all threads)."""
    import torch.utils.benchmark as tb

    from condcomp.data import eval_batches
    from condcomp.train.trainer import autocast

    x, _ = next(iter(eval_batches(data, batch_size=batch, seq_len=model.cfg.seq_len, max_batches=1)))

    def run():
        with autocast(precision):
            model(x)

    run()
    t = tb.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return x.numel() / t.median


def measure_variant(name: str, run_dir: Path, peak_rss_mib: float, *, infer_time: float = 1.0) -> VariantResult:
    """Numbers of one finished run: read from its metrics.jsonl, measured on its final checkpoint."""
    from condcomp.bench.compute_map import active_parameters, trace_routing
    from condcomp.data import eval_batches, load_corpus
    from condcomp.train.trainer import load_model

    records = _read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in records if "val_bpb" in r]
    steps = [r for r in records if "loss" in r]
    if not evals:
        raise RuntimeError(f"{run_dir}: no validation record in metrics.jsonl; the run did not finish")
    last = evals[-1]
    model, cfg = load_model(run_dir)
    corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                         cache_dir=cfg.data.cache_dir)
    x, _ = next(iter(eval_batches(corpus.val, batch_size=4, seq_len=cfg.model.seq_len, max_batches=1)))
    traces = trace_routing(model, x)
    return VariantResult(
        name=name,
        val_bpb=float(last["val_bpb"]),
        total_params=model.num_parameters(),
        active_params=active_parameters(model, traces),
        train_flops=float(last["total_flops"]),
        train_seconds=float(last["train_seconds"]),
        steps=int(last["step"]),
        train_tokens_per_s=float(last["tokens"]) / max(float(last["train_seconds"]), 1e-9),
        infer_tokens_per_s=inference_tokens_per_s(model, corpus.val, cfg.train.precision, min_time=infer_time),
        peak_rss_mib=peak_rss_mib,
        curve=[{k: r[k] for k in ("step", "val_bpb", "total_flops", "train_seconds")} for r in evals],
        loads={tr.name: tr.group_sizes.tolist() for tr in traces},
    )


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_grid(grid: Grid, out_dir: str | Path, *, stop_after: int | None = None, infer_time: float = 1.0,
             log=print) -> list[VariantResult]:
    """Train and measure every variant not finished yet; return all results in grid order.

    stop_after: stop after training this many variants in this call (to test interruption).
    """
    out = Path(out_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(grid.source)
    results, trained, started = [], 0, time.perf_counter()
    names = list(grid.variants)
    for i, name in enumerate(names, 1):
        vdir = out / "variants" / name
        done = vdir / "result.json"
        if done.is_file():
            log(f"[{i}/{len(names)}] {name}: finished earlier, not retrained")
            results.append(VariantResult(**json.loads(done.read_text())))
            continue
        if stop_after is not None and trained >= stop_after:
            break
        cfg = grid.variants[name]
        cfg.run_dir = str(vdir)
        vdir.mkdir(parents=True, exist_ok=True)
        config_path = vdir / "variant.yaml"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if trained:
            per = (time.perf_counter() - started) / trained
            remaining = sum(1 for n in names[i - 1 :] if not (out / "variants" / n / "result.json").is_file())
            eta = f", grid ETA ~{per * remaining / 60:.1f} min"
        else:
            eta = ""
        log(f"[{i}/{len(names)}] {name}: training to {grid.budget:.3g} {grid.budget_kind}{eta}")
        rss = _train_in_subprocess(config_path)
        result = measure_variant(name, vdir, rss, infer_time=infer_time)
        _write_json_atomic(done, asdict(result))
        results.append(result)
        trained += 1
    return results
