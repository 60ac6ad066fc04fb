"""A comparison grid: variants of one base config, trained under one budget.

A grid file (YAML):

    name: demo
    budget: {flops: 1.5e13}          # equal training FLOPs as counted by the trainer, {seconds: 60}, or
                                     # {steps: 500} (equal optimizer steps: the paper-style comparison);
                                     # several, e.g. {flops: 1.5e13, steps: 500}: every variant is trained
                                     # once per budget (a "view"), each with its own schedule
    base: {model: {...}, train: {...}}   # a RunConfig mapping, or a path to a config file
    common: [train.seed=0, train.eval_batches=16]   # applied to every variant last (same data, seed, eval)
    variants:
      dense: {}                                  # the base as is
      moe-top1: {set: [model.ffn=moe, model.moe.k=1]}
      mod: {config: ../mod.yaml, set: [...]}     # a whole config file instead of the base
    stages: {...}                    # optional: models built first that variants start from
                                     # (model.init: stage:NAME); see condcomp.compare.stages
    seeds: [0, 1, 2]                 # optional: the whole grid (stages too) once per training seed;
                                     # the report gives means, 95% intervals and noise-aware verdicts

    claims: [{claim: moe.expert_choice_steps, variant: expert-choice, baseline: moe-top2}]
                                     # optional: paper claims checked on the results (condcomp.compare.claims)

Every variant's config is built and validated when the grid loads, before anything trains (one that
starts from a stage is validated again once the stage exists, with the stage's shape).

No silent confounds: a technique's own FFN (MoE experts and the dense layers between MoE layers, the
CoLT5 FFNs) takes the base model's dense FFN activation unless the variant sets it (its ``set:`` list
or its own config file); ``Grid.inherited`` says where that happened, and the report prints every
resolved setting in which a variant differs from the base.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


from condcomp import registry
from condcomp.compare.claims import parse_claims
from condcomp.compare.stages import Stage, parse_stages, stage_of
from condcomp.config import ConfigError, RunConfig, from_dict, resolve_file_paths
from condcomp.settings import apply_override, changed_keys, load_yaml_file
from condcomp.train.pretrained_init import resolve_init


# A variant name becomes one folder under --out: one path component, nothing hidden or special.
SAFE_NAME = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,99}")


BUDGET_KINDS = ("flops", "seconds", "steps")


def with_budget(cfg: RunConfig | dict, kind: str, amount: float):
    """The config (a RunConfig, or a raw mapping, changed in place) trained to one budget: equal optimizer
    steps, or equal FLOPs / wall clock with the LR schedule following the fraction spent."""
    train = cfg.setdefault("train", {}) if isinstance(cfg, dict) else None
    if train is None:
        cfg = copy.deepcopy(cfg)
        cfg.train.max_flops = cfg.train.max_seconds = None
        if kind == "steps":
            cfg.train.steps = int(amount)
        else:
            setattr(cfg.train, "max_flops" if kind == "flops" else "max_seconds", amount)
            cfg.train.steps = 10_000_000  # the budget decides when to stop (and drives the LR schedule)
        return cfg
    train.pop("max_flops", None)
    train.pop("max_seconds", None)
    if kind == "steps":
        train["steps"] = int(amount)
    else:
        train["max_flops" if kind == "flops" else "max_seconds"] = amount
        train["steps"] = 10_000_000
    return cfg


@dataclass
class Grid:
    name: str
    budget_kind: str  # the primary budget: "flops" | "seconds" | "steps"
    budget: float
    variants: dict[str, RunConfig]  # trained to the primary budget
    source: str = ""
    stages: dict[str, Stage] = field(default_factory=dict)
    # Variants that start from a stage: {"config": raw mapping (model.init still "stage:NAME"),
    # "own_keys": the keys the variant's own set: list assigns}, built for real once the stage exists.
    staged: dict[str, dict] = field(default_factory=dict)
    seeds: list[int] | None = None  # None: one run, the seed the configs say
    # Every budget the variants are trained to, primary first; more than one: a run per variant per
    # budget (a "view": equal FLOPs, equal wall clock, equal steps), each with its own LR schedule.
    budgets: list[tuple[str, float]] = field(default_factory=list)
    base: RunConfig | None = None  # the base config with common settings, at the primary budget
    inherited: dict[str, list[str]] = field(default_factory=dict)  # variant -> settings taken from the base
    claims: list[dict] = field(default_factory=list)  # {claim, variant, baseline}: checked in the report

    def __post_init__(self) -> None:
        if not self.budgets:
            self.budgets = [(self.budget_kind, self.budget)]

    @property
    def views(self) -> list[str] | None:
        """The budget kinds when there are several (each variant trained once per kind), else None."""
        return [kind for kind, _ in self.budgets] if len(self.budgets) > 1 else None

    def for_view(self, kind: str) -> "Grid":
        """The grid trained to its ``kind`` budget only."""
        amount = dict(self.budgets)[kind]
        g = copy.copy(self)
        g.budget_kind, g.budget, g.budgets = kind, amount, [(kind, amount)]
        g.variants = {name: with_budget(cfg, kind, amount) for name, cfg in self.variants.items()}
        return g

    def changes(self, name: str) -> list[str]:
        """The resolved settings in which variant ``name`` differs from the base ("model.ffn: 'swiglu' ->
        'moe'"); run folder and budget left out (they differ by design or not at all)."""
        if self.base is None:
            return []
        if name in self.staged:  # its real config exists only once the stage does
            own = ", ".join(self.staged[name]["own_keys"])
            return [f"starts from grid stage {stage_of(self.staged[name]['config'])!r} (its model and techniques)"
                    + (f"; sets {own}" if own else "")]
        base, mine = self.base.to_dict(), self.variants[name].to_dict()
        for cfg in (base, mine):
            cfg.pop("run_dir", None)
        return changed_keys(base, mine)


def _load_mapping(value, where: Path, what: str) -> dict:
    if isinstance(value, str):
        path = (where / value) if not Path(value).is_absolute() else Path(value)
        if not path.is_file():
            raise ConfigError(f"{what}: config file not found: {path}")
        return resolve_file_paths(load_yaml_file(path) or {}, path.resolve().parent)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping or a config path, got {type(value).__name__}")
    return resolve_file_paths(json.loads(json.dumps(value)), where.resolve())  # a deep copy; paths as in the grid


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid; every variant's config is built (and checked) here, before training."""
    path = Path(path)
    raw = load_yaml_file(path, what="grid") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with name, budget, base, common and variants")
    if raw.get("kind") == "dit":
        raise ConfigError(f"{path} is a DiT grid (kind: dit); run it with `condcomp dit compare --grid {path} --out ...`")
    unknown = set(raw) - {"name", "budget", "base", "common", "variants", "stages", "seeds", "claims"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}; valid: name, budget, base, common, variants, "
                          "stages, seeds, claims")
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
                              or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63
                                         for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a list of distinct integers >= 0 (e.g. [0, 1, 2]), got {seeds!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or not budget or set(budget) - set(BUDGET_KINDS):
        raise ConfigError(f"{path}: budget must be {{flops: N}} (equal training FLOPs), {{seconds: N}} "
                          f"(equal wall clock) or {{steps: N}} (equal optimizer steps), or several of them, got "
                          f"{budget!r}")
    budgets = []
    for kind, amount in budget.items():
        try:
            amount = float(amount)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: budget.{kind} must be a number, got {amount!r}") from None
        if amount <= 0:
            raise ConfigError(f"{path}: budget.{kind} must be > 0")
        if kind == "steps" and amount != int(amount):
            raise ConfigError(f"{path}: budget.steps must be a whole number of steps, got {amount}")
        budgets.append((kind, amount))
    kind, amount = budgets[0]
    variants_raw = raw.get("variants") or {}
    if not variants_raw or not isinstance(variants_raw, dict):
        raise ConfigError(f"{path}: the grid has no variants (a mapping of name -> {{config, set}})")
    for name in variants_raw:
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"variants: {name!r} is not a usable variant name: it names a folder under --out, so it "
                              "must be one path component (no '/' or '\\', not starting with '.', at most 100 "
                              "characters)")
    common = list(raw.get("common") or []) + list(overrides or [])
    stages = parse_stages(raw.get("stages"), lambda value, what: _load_mapping(
        value if value is not None else raw.get("base"), path.parent, what), common)
    for name in stages:
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", "..", "charges.json"):
            raise ConfigError(f"stages: {name!r} is not a usable stage name (one path component, as variant names)")
    base = None
    if raw.get("base") is not None:
        base_raw = _load_mapping(raw.get("base"), path.parent, "base")
        for assignment in common:
            apply_override(base_raw, assignment)
        if stage_of(base_raw) is None:
            try:
                base = from_dict(RunConfig, resolve_init(with_budget(base_raw, kind, amount)))
            except ConfigError as e:
                raise ConfigError(f"base: {e}") from None
    base_activation = _dense_activation(base)
    variants, staged, inherited = {}, {}, {}
    for name, spec in variants_raw.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"config", "set"}:
            raise ConfigError(f"variants.{name}: expected {{config: PATH, set: [key=value, ...]}} (both optional)")
        cfg = _load_mapping(spec["config"] if "config" in spec else raw.get("base"), path.parent, f"variants.{name}")
        for assignment in list(spec.get("set") or []) + common:
            apply_override(cfg, assignment)
        with_budget(cfg, kind, amount)
        inherited[name] = _inherit_activation(cfg, base_activation)
        stage = stage_of(cfg)
        if stage is not None:
            if stage not in stages:
                raise ConfigError(f"variants.{name}: model.init: stage:{stage} names no stage; stages: "
                                  f"{', '.join(stages) or 'none'}")
            # The techniques come from the stage unless this variant sets them itself (the base's ffn:
            # swiglu must not turn an upcycled stage back into a dense model).
            own = {a.split("=", 1)[0].strip() for a in spec.get("set") or []}
            staged[name] = {"config": json.loads(json.dumps(cfg)), "own_keys": sorted(own)}
            cfg["model"]["init"] = None  # the keys and values are checked now; the shape once the stage exists
        try:
            variants[name] = from_dict(RunConfig, resolve_init(cfg))
        except ConfigError as e:
            raise ConfigError(f"variants.{name}: {e}") from None
    if stages and (kind != "flops" or len(budgets) > 1):
        raise ConfigError(f"{path}: a grid with stages needs one budget, a FLOPs budget (the stages' FLOPs are "
                          "charged to the variants built on them)")
    grid = Grid(name=str(raw.get("name") or path.stem), budget_kind=kind, budget=amount, variants=variants,
                source=path.read_text(), stages=stages, staged=staged, seeds=seeds, budgets=budgets, base=base,
                inherited={k: v for k, v in inherited.items() if v})
    grid.claims = parse_claims(raw.get("claims"), grid, path)
    return grid


def _dense_activation(base: RunConfig | None) -> str | None:
    """The activation of the base model's FFN (None without a base, or for an FFN that has none)."""
    if base is None:
        return None
    activation = registry.get("ffn", base.model.ffn).activation
    return activation(base.model) if activation is not None else None


def _inherit_activation(cfg: dict, activation: str | None) -> list[str]:
    """Give the variant's FFN technique the base's activation unless its config chose one. Returns the
    settings it set ("model.moe.activation=swiglu")."""
    model = cfg.setdefault("model", {})
    tech = registry.get("ffn", model.get("ffn", "swiglu"))
    if activation is None or tech.section is None or "activation" not in getattr(tech.settings, "__dataclass_fields__", {}):
        return []
    section = model.setdefault(tech.section, {})
    if not isinstance(section, dict) or "activation" in section:
        return []
    section["activation"] = activation
    return [f"model.{tech.section}.activation={activation}"]
