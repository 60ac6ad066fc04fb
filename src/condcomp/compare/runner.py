"""``condcomp compare``: train every variant of a grid under one budget, then measure it.

Each variant trains in its own child process (so its peak memory is its own), started through a
Python entry point (``train_variant``) with the variant's validated config, under
``<out>/variants/<name>``; ``result.json`` marks it finished, so an interrupted grid resumes where it
stopped and never retrains a finished variant (an unfinished one resumes from its last checkpoint).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from condcomp import registry
from condcomp.compare.grid import Grid
from condcomp.compare.routing_health import routing_health
from condcomp.compare.stages import build_stages, stage_model_dir, stage_of
from condcomp.config import ConfigError, RunConfig, config_from_saved, from_dict
from condcomp.files import write_json_atomic
from condcomp.train.metrics_log import MetricsLog
from condcomp.train.pretrained_init import resolve_init
from condcomp.train.trainer import TrainingError, TrainingInterrupted


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
    # Training FLOPs of the grid stages the variant starts from (included in train_flops and the curve).
    prior_flops: float = 0.0
    seed: int | None = None  # the grid's seed this result belongs to (None: a grid without seeds)
    view: str | None = None  # the budget kind it was trained to, in a grid with several (None: one budget)
    routing: dict[str, dict] = field(default_factory=dict)  # router -> its health over training (routing_health)


def train_variant(config: dict) -> None:
    """Child-process entry point: train one variant from its config mapping (``RunConfig.to_dict()``),
    resuming from its newest checkpoint if it has one. A user's mistake ends the process with exit code
    2 and a one-line message (no traceback); the parent reports which variant failed."""
    from condcomp.errors import user_errors
    from condcomp.train import Trainer

    try:
        Trainer(config_from_saved(config), resume=True).train()
    except user_errors() as e:
        print(f"condcomp compare: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (a killed compare leaves no
    orphan training on): the trainer then saves a checkpoint and stops."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the parent's own cleanup still terminates children it outlives
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _variant_process(config: dict, peak_rss) -> None:
    _die_with_parent()
    train_variant(config)
    peak_rss.value = _peak_rss_mib()


def train_in_child(cfg: RunConfig, name: str) -> float:
    """Train ``cfg`` in a fresh (spawned) process; returns that process's peak RSS in MiB."""
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no torch threads or state inherited
    peak = ctx.Value("d", 0.0)
    proc = ctx.Process(target=_variant_process, args=(cfg.to_dict(), peak), name=f"condcomp-{name}")
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        # The child got the Ctrl-C too and is saving a checkpoint: give it time, then make sure it is gone.
        try:
            proc.join(timeout=120)
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        raise TrainingInterrupted(f"compare interrupted while training variant {name}; run the same compare "
                                  "command again to resume (finished variants are kept)") from None
    if proc.exitcode != 0:
        raise TrainingError(f"training variant {name} failed (exit {proc.exitcode}); fix the error above and run "
                            f"the same compare command again to resume")
    return peak.value


def measure_variant(name: str, run_dir: Path, peak_rss_mib: float, *, infer_time: float = 1.0,
                    prior_flops: float = 0.0) -> VariantResult:
    """Numbers of one finished run: read from its metrics.jsonl, measured on its final checkpoint.
    prior_flops: FLOPs of the stages it started from, added to its own (train_flops, the curve)."""
    from condcomp.bench.measure import inference_tokens_per_s
    from condcomp.compare.compute_map import active_parameters, trace_routing
    from condcomp.convert.prune import for_generation
    from condcomp.data import eval_batches, load_corpus
    from condcomp.device import resolve_device
    from condcomp.train.trainer import load_model

    records = MetricsLog(run_dir / "metrics.jsonl").read()
    evals = [r for r in records if "val_bpb" in r]
    if not evals:
        raise RuntimeError(f"{run_dir}: no validation record in metrics.jsonl; the run did not finish")
    last = evals[-1]
    model, cfg = load_model(run_dir)
    device = resolve_device(cfg.train.device)
    model.to(device)
    corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                         cache_dir=cfg.data.cache_dir)
    x, _ = next(iter(eval_batches(corpus.val, batch_size=4, seq_len=cfg.model.seq_len, max_batches=1)))
    x = x.to(device)
    traces = trace_routing(model, x)
    # A pruned model is deployed as its compact dense model (for an input-conditioned one, the one its
    # first window's prompt picks: same shapes for every prompt); its size and speed are that model's.
    deployed = for_generation(model, x[:1])
    return VariantResult(
        name=name,
        val_bpb=float(last["val_bpb"]),
        total_params=model.num_parameters(),
        active_params=active_parameters(model, traces) if deployed is model else deployed.num_parameters(),
        train_flops=float(last["total_flops"]) + prior_flops,
        train_seconds=float(last["train_seconds"]),
        steps=int(last["step"]),
        train_tokens_per_s=float(last["tokens"]) / max(float(last["train_seconds"]), 1e-9),
        infer_tokens_per_s=inference_tokens_per_s(deployed, corpus.val, cfg.train.precision, min_time=infer_time),
        peak_rss_mib=peak_rss_mib,
        curve=[{"step": r["step"], "val_bpb": r["val_bpb"], "total_flops": r["total_flops"] + prior_flops,
                "train_seconds": r["train_seconds"]} for r in evals],
        loads={tr.name: tr.group_sizes.tolist() for tr in traces},
        prior_flops=prior_flops,
        routing=routing_health(records),
    )


def _staged_config(grid: Grid, name: str, out: Path, charges: dict[str, float]) -> tuple[RunConfig, float]:
    """A stage-based variant's real config (the stage's shape, its own budget: the grid's minus the
    stage's FLOPs) and the FLOPs it is charged."""
    raw = json.loads(json.dumps(grid.staged[name]["config"]))
    own = grid.staged[name]["own_keys"]
    stage = stage_of(raw)
    model = raw["model"]
    for key in ("block", "attention", "ffn", *registry.sections()):
        # The stage's techniques and settings, except what the variant's own set: list chooses.
        if f"model.{key}" in own:
            continue
        subkeys = [k.split(".", 2)[2] for k in own if k.startswith(f"model.{key}.")]
        value = model.pop(key, None)
        if subkeys and isinstance(value, dict):
            model[key] = {sub: value[sub] for sub in subkeys if sub in value}
    raw["model"]["init"] = str(stage_model_dir(out, grid.stages, stage))
    prior = charges[stage]
    if prior >= grid.budget:
        raise ConfigError(f"variants.{name}: stage {stage} alone used {prior:.3g} FLOPs, the whole budget of "
                          f"{grid.budget:.3g}; raise budget.flops or shorten the stage")
    raw["train"]["max_flops"] = grid.budget - prior
    try:
        return from_dict(RunConfig, resolve_init(raw)), prior
    except ConfigError as e:
        raise ConfigError(f"variants.{name}: {e}") from None



def run_grid(grid: Grid, out_dir: str | Path, *, stop_after: int | None = None, infer_time: float = 1.0,
             log=print) -> list[VariantResult]:
    """Train and measure every variant not finished yet; return all results in grid order (with
    ``seeds``: every variant of seed 0, then of seed 1, ..., each replicate under ``out/seed-<s>``;
    with several budgets: each view in turn, under ``out/<kind>``).

    stop_after: stop after training this many variants in this call (to test interruption).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(grid.source)
    if grid.views:
        results: list[VariantResult] = []
        for kind in grid.views:
            log(f"view: equal {kind} ({dict(grid.budgets)[kind]:.3g}):")
            got, trained = _run_seeds(grid.for_view(kind), out / kind, stop_after=stop_after, infer_time=infer_time,
                                      log=log)
            for r in got:
                r.view = kind
            results += got
            if stop_after is not None:
                stop_after -= trained
                if stop_after <= 0 and len(got) < len(grid.variants) * len(grid.seeds or [None]):
                    break
        return results
    return _run_seeds(grid, out, stop_after=stop_after, infer_time=infer_time, log=log)[0]


def _run_seeds(grid: Grid, out: Path, *, stop_after: int | None, infer_time: float,
               log) -> tuple[list[VariantResult], int]:
    """Every seed's replicate of a one-budget grid in ``out``: (results so far, variants trained)."""
    if grid.seeds is None:
        return _run_replicate(grid, out, None, stop_after=stop_after, infer_time=infer_time, log=log)
    results: list[VariantResult] = []
    total = 0
    for seed in grid.seeds:
        log(f"seed {seed} ({grid.seeds.index(seed) + 1} of {len(grid.seeds)}):")
        got, trained = _run_replicate(with_seed(grid, seed), out / f"seed-{seed}", seed, stop_after=stop_after,
                                      infer_time=infer_time, log=log)
        results += got
        total += trained
        if stop_after is not None:
            stop_after -= trained
            if stop_after <= 0 and len(got) < len(grid.variants):
                break
    return results, total


def finished_results(grid: Grid, out_dir: str | Path) -> list[VariantResult]:
    """The results of every run of the grid that finished under ``out_dir``, in run_grid's order,
    without training or building anything."""
    out = Path(out_dir)
    results = []
    for view in grid.views or [None]:
        for seed in grid.seeds or [None]:
            folder = out / (view or "") / (f"seed-{seed}" if seed is not None else "") / "variants"
            for name in grid.variants:
                done = folder / name / "result.json"
                if done.is_file():
                    r = VariantResult(**json.loads(done.read_text()))
                    r.view = view
                    results.append(r)
    return results


def with_seed(grid: Grid, seed: int) -> Grid:
    """The grid with every variant's and every trained stage's ``train.seed`` set to ``seed``."""
    g = copy.deepcopy(grid)
    for cfg in g.variants.values():
        cfg.train.seed = seed
    for staged in g.staged.values():
        staged["config"].setdefault("train", {})["seed"] = seed
    for stage in g.stages.values():
        if stage.config is not None:
            stage.config.train.seed = seed
    return g


def _run_replicate(grid: Grid, out: Path, seed: int | None, *, stop_after: int | None, infer_time: float,
                   log) -> tuple[list[VariantResult], int]:
    """One pass over the grid's stages and variants in ``out``; (results so far, variants trained)."""
    (out / "variants").mkdir(parents=True, exist_ok=True)
    charges = build_stages(grid.stages, out, train=train_in_child, log=log) if grid.stages else {}
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
        cfg, prior = grid.variants[name], 0.0
        if name in grid.staged:
            cfg, prior = _staged_config(grid, name, out, charges)
        cfg.run_dir = str(vdir)
        vdir.mkdir(parents=True, exist_ok=True)
        config_path = vdir / "variant.yaml"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if trained:
            per = (time.perf_counter() - started) / trained
            remaining = sum(1 for n in names[i - 1 :] if not (out / "variants" / n / "result.json").is_file())
            eta = f", ETA ~{per * remaining / 60:.1f} min" + (" for this seed" if seed is not None else "")
        else:
            eta = ""
        log(f"[{i}/{len(names)}] {name}: training to {grid.budget:.3g} {grid.budget_kind}{eta}")
        rss = train_in_child(cfg, name)
        result = measure_variant(name, vdir, rss, infer_time=infer_time, prior_flops=prior)
        result.seed = seed
        write_json_atomic(done, asdict(result))
        results.append(result)
        trained += 1
    return results, trained
