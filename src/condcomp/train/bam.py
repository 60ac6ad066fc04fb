"""BAM end to end: branch a dense seed into one run per data domain, train each, merge them.

    result = run_bam(seed="runs/seed", domains=["stdlib", "python-docs", "kjv"], steps=300, out="runs/bam")
    # runs/bam/branches/<domain>/   one ordinary, resumable run per domain, initialised from the seed
    # runs/bam/merged/              the merged mixture, a run folder: condcomp train --init runs/bam/merged
    # runs/bam/bam.json             what was merged, and the branches' training FLOPs (part of BAM's cost)

Every branch config is built and every domain's data read before anything is written, so a domain
with no data or a bad override fails at once. Run again after an interruption and finished branches
are kept, an unfinished one resumes from its last checkpoint, and the merge is redone only if missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from condcomp.config import ConfigError, RunConfig, from_dict
from condcomp.convert.bam import ATTENTION_MODES, merge_branches
from condcomp.files import write_json_atomic
from condcomp.settings import apply_override
from condcomp.train import checkpoint as ckpt
from condcomp.train.metrics_log import MetricsLog
from condcomp.train.pretrained_init import resolve_init


@dataclass
class BamResult:
    merged_dir: Path
    branch_dirs: dict[str, Path]  # domain -> run folder
    branch_flops: float  # training FLOPs of all branches together (counted by the trainer)


def _branch_name(domain: str) -> str:
    """A folder name for a domain: the name itself, or a path's last component made safe."""
    name = Path(domain).name if ("/" in domain or "\\" in domain) else domain
    return re.sub(r"[^A-Za-z0-9_.%-]", "_", name).lstrip(".") or "domain"


def branch_configs(seed: str | Path, domains: list[str], *, steps: int, branches_dir: str | Path,
                   overrides: list[str] | None = None) -> dict[str, RunConfig]:
    """Validated run configs of the branches: the seed's own config, initialised from the seed, on
    each domain's data, for ``steps`` steps (then ``overrides``). Reads every domain's data now."""
    from condcomp.data import load_corpus

    if not domains:
        raise ConfigError("domains: name at least one data domain (stdlib, python-docs, kjv, bbc-news or a path)")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"domains: each domain once, got {domains}")
    seed_ckpt = ckpt.resolve_checkpoint(seed)
    saved = ckpt.read_config(seed_ckpt)
    names = [_branch_name(d) for d in domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"domains: {domains} give clashing folder names {names}; rename one")
    configs = {}
    for domain, name in zip(domains, names):
        raw = json.loads(json.dumps(saved))
        raw["model"]["init"] = str(Path(seed_ckpt).resolve())
        raw["data"]["source"] = domain
        raw["train"].update(steps=steps, max_flops=None, max_seconds=None)
        raw["run_dir"] = str(Path(branches_dir) / name)
        for assignment in overrides or []:
            apply_override(raw, assignment)
        try:
            cfg = from_dict(RunConfig, resolve_init(raw))
        except ConfigError as e:
            raise ConfigError(f"branch {domain}: {e}") from None
        d = cfg.data
        corpus = load_corpus(d.source, val_fraction=d.val_fraction, test_fraction=d.test_fraction, cache_dir=d.cache_dir)
        if len(corpus.train) <= cfg.model.seq_len or len(corpus.val) <= cfg.model.seq_len:
            raise ConfigError(f"domains: {domain} has too little text ({len(corpus.train)} training and "
                              f"{len(corpus.val)} validation bytes) for sequences of {cfg.model.seq_len}; "
                              "give it more text")
        configs[domain] = cfg
    return configs


def _train_here(cfg: RunConfig, name: str) -> None:
    from condcomp.train.trainer import Trainer

    Trainer(cfg, resume=True).train()


def run_flops(run_dir: str | Path) -> float:
    """The training FLOPs a finished run counted (its last metrics record)."""
    records = [r for r in MetricsLog(Path(run_dir) / "metrics.jsonl").read() if "total_flops" in r]
    if not records:
        raise ConfigError(f"{run_dir}: no metrics record with total_flops; the run did not train")
    return float(records[-1]["total_flops"])


def run_bam(*, seed: str | Path, domains: list[str], steps: int, out: str | Path, attention: str = "soft", k: int = 2,
            include_seed: bool = True, capacity_factor: float | None = None, overrides: list[str] | None = None,
            branches_dir: str | Path | None = None, train: Callable[[RunConfig, str], object] = _train_here,
            log=print) -> BamResult:
    """Branch, train and merge (see the module docstring). ``train(cfg, name)`` trains one branch
    to completion, resuming if it can (the default trains in this process; compare uses a child).
    branches_dir: where the branch runs live (default ``out/branches``); two merges of the same
    branches (FFN-only and with attention experts) share them."""
    from condcomp.train.pretrained_init import run_tokenizer, save_imported
    from condcomp.train.trainer import load_model

    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention: must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    out = Path(out)
    configs = branch_configs(seed, domains, steps=steps, branches_dir=branches_dir or out / "branches",
                             overrides=overrides)
    n_experts = len(domains) + int(include_seed)
    if not 1 <= k <= n_experts:
        raise ConfigError(f"k: {k} must be between 1 and the {n_experts} experts (one per branch"
                          f"{' plus the seed' if include_seed else ''})")
    merged_dir = out / "merged"
    for i, (domain, cfg) in enumerate(configs.items(), 1):
        # A finished branch resumes at its last step and returns at once; an unfinished one continues.
        log(f"[branch {i}/{len(configs)}] {domain}: {steps} steps from the seed in {cfg.run_dir}")
        train(cfg, f"branch-{_branch_name(domain)}")
    branch_dirs = {d: Path(c.run_dir) for d, c in configs.items()}
    branch_flops = sum(run_flops(p) for p in branch_dirs.values())
    if not (out / "bam.json").is_file():
        seed_model, seed_cfg = load_model(seed)
        branches = [load_model(p)[0] for p in branch_dirs.values()]
        merged = merge_branches(seed_model, branches, attention=attention, k=k, capacity_factor=capacity_factor,
                                include_seed=include_seed)
        _, tokenizer = run_tokenizer(seed_cfg.data)
        if ckpt.list_checkpoints(merged_dir):  # an interrupted earlier merge: write it again
            import shutil

            shutil.rmtree(merged_dir)
        save_imported(merged, tokenizer, merged_dir, source=f"BAM merge of {seed} and branches {list(branch_dirs)}")
        info = {"seed": str(seed), "domains": list(domains), "steps": steps, "attention": attention, "k": k,
                "include_seed": include_seed, "experts": ["seed"] * include_seed + list(domains),
                "branch_flops": branch_flops, "branches": {d: str(p) for d, p in branch_dirs.items()}}
        write_json_atomic(out / "bam.json", info)  # written last: its presence means the merge is complete
    return BamResult(merged_dir=merged_dir, branch_dirs=branch_dirs, branch_flops=branch_flops)

