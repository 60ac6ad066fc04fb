"""A DiT comparison grid: variants of one DiT config trained at equal training FLOPs, one after the
other, then the report (``condcomp.compare.dit_report``).

    kind: dit
    name: ecdit
    budget: {flops: 3.2e13}          # executed training FLOPs, as the DiT trainer counts them
    base: {data: {...}, model: {...}, train: {...}}
    variants:
      dense: {}
      token-choice-top2: {set: [model.ffn=moe, model.moe.router=top_k, model.moe.k=2]}
      ec-dit: {set: [model.ffn=moe]}

    condcomp dit compare --grid configs/grids/ecdit.yaml --out runs/ecdit

Every variant's config is validated before anything trains. A variant whose run already reached the
budget is not trained again; one that stopped part-way resumes from its checkpoint, so an interrupted
grid continues where it stopped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from condcomp.compare.grid import SAFE_NAME
from condcomp.settings import ConfigError, apply_override, load_yaml_file
from condcomp.train import checkpoint as ckpt
from condcomp.dit_config import DiTRunConfig, load_dit_config
from condcomp.train.dit_trainer import DiTTrainer


@dataclass
class DiTGrid:
    name: str
    flops: float
    variants: dict[str, DiTRunConfig]


def load_dit_grid(path: str | Path, out: str | Path) -> DiTGrid:
    raw = load_yaml_file(path, what="grid")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with name, budget, base and variants")
    if raw.get("kind") != "dit":
        raise ConfigError(f"{path}: not a DiT grid (it has no `kind: dit`); language-model grids run with "
                          "`condcomp compare --grid`")
    unknown = set(raw) - {"kind", "name", "budget", "base", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid key {sorted(unknown)[0]!r}; expected kind, name, budget, base, variants")
    budget = raw.get("budget")
    if not isinstance(budget, dict) or set(budget) != {"flops"} or not isinstance(budget["flops"], (int, float)) \
            or budget["flops"] <= 0:
        raise ConfigError(f"{path}: budget: expected {{flops: N}} with N > 0 (equal training FLOPs), got {budget!r}")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: variants: expected a mapping of name -> {{set: [key=value, ...]}}")
    base = raw.get("base") or {}
    out_dir = Path(out)
    configs = {}
    for name, spec in variants.items():
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
            raise ConfigError(f"{path}: variant name {name!r} cannot be a folder name")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"set"}:
            raise ConfigError(f"{path}: variants.{name}: expected {{set: [key=value, ...]}}")
        merged = copy.deepcopy(base)
        for assignment in spec.get("set") or []:
            apply_override(merged, assignment)
        merged["run_dir"] = str(out_dir / name)
        merged.setdefault("train", {})["max_flops"] = float(budget["flops"])
        try:
            configs[name] = load_dit_config(None, [], base=merged)
        except ConfigError as e:
            raise ConfigError(f"{path}: variants.{name}: {e}") from None
    return DiTGrid(name=str(raw.get("name", Path(path).stem)), flops=float(budget["flops"]), variants=configs)


def run_dit_grid(path: str | Path, out: str | Path) -> Path:
    """Train every variant (or resume it), then write the report. Returns the report's path."""
    from condcomp.compare.dit_report import write_dit_report

    grid = load_dit_grid(path, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, cfg in grid.variants.items():
        existing = ckpt.list_checkpoints(cfg.run_dir)
        print(f"== {name}: {'resuming' if existing else 'training'} to {grid.flops:.3g} FLOPs", flush=True)
        DiTTrainer(cfg, resume=bool(existing)).run()
    return write_dit_report(grid, Path(out))
