"""Grid stages: models a comparison builds before its variants, which variants then start from.

    stages:                                   # built in order; each may start from an earlier one
      seed:     {train: {set: [train.steps=600]}}            # the base config (or {config: PATH}), trained
      upcycled: {upcycle: {from: seed, experts: 8, k: 2}}    # condcomp.convert.upcycle
      bam-ffn:  {bam: {from: seed, domains: [stdlib, kjv], steps: 150, attention: none}}   # condcomp bam
      bam-attn: {bam: {branches_of: bam-ffn, attention: soft}}    # the same branches, merged otherwise
    variants:
      dense:    {set: [model.init=stage:seed]}               # continue the seed

Every variant is charged the training FLOPs of the stages it builds on (the seed's, plus BAM's
branches), and the grid's budget is each variant's total: a variant starting from the seed trains for
the budget minus the seed's FLOPs, one from scratch for the whole budget, so all end at equal compute.
Stages resume like variants: a finished one is kept, an interrupted one continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from condcomp.config import ConfigError, RunConfig, from_dict
from condcomp.files import write_json_atomic
from condcomp.settings import apply_override

STAGE_PREFIX = "stage:"
_UPCYCLE_KEYS = {"from", "experts", "k", "every", "layers", "router", "capacity_factor", "noise", "granularity", "seed"}
_BAM_KEYS = {"from", "domains", "steps", "attention", "k", "include_seed", "capacity_factor", "set", "branches_of"}
_BRANCH_KEYS = ("from", "domains", "steps", "set")  # what a bam stage with branches_of takes from the other


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "upcycle" | "bam"
    after: str | None = None  # the stage it starts from
    config: RunConfig | None = None  # train: the validated config
    options: dict = field(default_factory=dict)  # upcycle / bam arguments


def parse_stages(raw, load_mapping, common: list[str]) -> dict[str, Stage]:
    """Validate a grid's ``stages`` mapping. ``load_mapping(value, what)`` reads a base config or a
    config path; ``common`` are the grid's common overrides (applied to trained stages too)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("stages: expected a mapping of name -> {train | upcycle | bam: {...}}")
    stages: dict[str, Stage] = {}
    for name, spec in raw.items():
        what = f"stages.{name}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("train", "upcycle", "bam"):
            raise ConfigError(f"{what}: expected exactly one of train: {{...}}, upcycle: {{...}}, bam: {{...}}")
        kind, options = next(iter(spec.items()))
        options = dict(options or {})
        if kind == "train":
            if set(options) - {"config", "set"}:
                raise ConfigError(f"{what}.train: expected {{config: PATH, set: [key=value, ...]}} (both optional)")
            cfg = load_mapping(options.get("config"), what)
            for assignment in list(options.get("set") or []) + common:
                apply_override(cfg, assignment)
            try:
                config = from_dict(RunConfig, cfg)
            except ConfigError as e:
                raise ConfigError(f"{what}: {e}") from None
            stages[name] = Stage(name, kind, config=config)
            continue
        allowed = _UPCYCLE_KEYS if kind == "upcycle" else _BAM_KEYS
        unknown = set(options) - allowed
        if unknown:
            raise ConfigError(f"{what}.{kind}: unknown keys {sorted(unknown)}; valid: {sorted(allowed)}")
        if kind == "bam" and "branches_of" in options:
            other = stages.get(options["branches_of"])
            if other is None or other.kind != "bam":
                raise ConfigError(f"{what}.bam.branches_of: must name an earlier bam stage, got {options['branches_of']!r}")
            given = sorted(set(_BRANCH_KEYS) & set(options))
            if given:
                raise ConfigError(f"{what}.bam: {given} come from branches_of: {options['branches_of']}; remove them")
            options.update({"from": other.after, **{k: v for k, v in other.options.items() if k in _BRANCH_KEYS}})
        after = options.pop("from", None)
        if kind == "upcycle" and after not in stages and isinstance(after, str) and _external_model(after):
            stages[name] = Stage(name, kind, after=None, options={**options, "source": after})
            continue
        if after not in stages:
            also = " or a pretrained model (a Hugging Face folder, smollm2, a condcomp run)" if kind == "upcycle" else ""
            raise ConfigError(f"{what}.{kind}.from: must name an earlier stage ({', '.join(stages) or 'none yet'}){also}, "
                              f"got {after!r}")
        if kind == "upcycle" and "experts" not in options:
            raise ConfigError(f"{what}.upcycle: experts is required")
        if kind == "bam" and (not options.get("domains") or "steps" not in options):
            raise ConfigError(f"{what}.bam: domains (a list) and steps are required")
        stages[name] = Stage(name, kind, after=after, options=options)
    return stages


def _external_model(name: str) -> bool:
    from condcomp.convert.hf import PACKAGED_DECODERS

    return name in PACKAGED_DECODERS or Path(name).expanduser().is_dir()


def stage_of(raw_config: dict) -> str | None:
    """The stage a variant's raw config starts from (``model.init: stage:NAME``), or None."""
    init = (raw_config.get("model") or {}).get("init")
    if isinstance(init, str) and init.startswith(STAGE_PREFIX):
        return init[len(STAGE_PREFIX) :]
    return None



def build_stages(stages: dict[str, Stage], out: Path, *, train, log=print) -> dict[str, float]:
    """Build every stage not built yet under ``out/stages/<name>``; returns each stage's charge (the
    training FLOPs a variant starting from it inherits). ``train(cfg, name)`` trains a config."""
    from condcomp.convert.upcycle import upcycle
    from condcomp.train import checkpoint as ckpt
    from condcomp.train.bam import run_bam, run_flops
    from condcomp.train.pretrained_init import load_model_source, save_imported

    charges_path = out / "stages" / "charges.json"
    charges = json.loads(charges_path.read_text()) if charges_path.is_file() else {}
    for i, stage in enumerate(stages.values(), 1):
        folder = out / "stages" / stage.name
        if stage.name in charges:
            log(f"[stage {i}/{len(stages)}] {stage.name}: built earlier")
            continue
        log(f"[stage {i}/{len(stages)}] {stage.name}: {stage.kind}")
        if stage.kind == "train":
            stage.config.run_dir = str(folder)
            train(stage.config, f"stage-{stage.name}")
            charge = run_flops(folder)
        elif stage.kind == "upcycle":
            o = dict(stage.options)
            source = o.pop("source", None)
            if not ckpt.list_checkpoints(folder):
                dense, tokenizer = load_model_source(source or str(out / "stages" / stage.after))
                moe = upcycle(dense, num_experts=o.pop("experts"), **o)
                save_imported(moe, tokenizer, folder, source=f"upcycled {source or 'stage ' + stage.after}")
            charge = charges[stage.after] if stage.after else 0.0  # a pretrained model's training is not ours
        else:
            o = dict(stage.options)
            shared = o.pop("branches_of", None)
            result = run_bam(seed=out / "stages" / stage.after, out=folder, train=train, log=log,
                             overrides=o.pop("set", None), branches_dir=out / "stages" / (shared or stage.name) / "branches",
                             **o)
            charge = charges[stage.after] + result.branch_flops
        charges[stage.name] = charge
        charges_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(charges_path, charges)
    return charges


def stage_model_dir(out: Path, stages: dict[str, Stage], name: str) -> Path:
    """The folder a variant's ``model.init: stage:NAME`` points to."""
    folder = out / "stages" / name
    return folder / "merged" if stages[name].kind == "bam" else folder
