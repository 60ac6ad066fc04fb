"""Typed, validated run configuration.

A run is described by a YAML file with three sections (``model``, ``data``, ``train``) plus
``run_dir``. Loading checks every key against the dataclasses below and fails at once, naming the
key, on an unknown key, a wrong type or an out-of-range value, so a typo never trains silently with a
default.

    cfg = load_config("configs/dense.yaml", overrides=["train.steps=100", "model.ffn=gelu"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to change."""


def _field(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
           choices=None, help: str = "", default_factory: Any = dataclasses.MISSING):
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Validated:
    """Mixin: range/choice checks from field metadata, run after construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (_Validated, dict)):
                continue
            m = f.metadata
            name = f.name
            if m.get("choices") is not None:
                choices = m["choices"]() if callable(m["choices"]) else m["choices"]
                if value not in choices:
                    raise ConfigError(f"{name}: {value!r} is not one of {sorted(choices)}")
            if m.get("ge") is not None and value < m["ge"]:
                raise ConfigError(f"{name}: must be >= {m['ge']}, got {value}")
            if m.get("gt") is not None and value <= m["gt"]:
                raise ConfigError(f"{name}: must be > {m['gt']}, got {value}")
            if m.get("le") is not None and value > m["le"]:
                raise ConfigError(f"{name}: must be <= {m['le']}, got {value}")
            if m.get("lt") is not None and value >= m["lt"]:
                raise ConfigError(f"{name}: must be < {m['lt']}, got {value}")
        self.check()

    def check(self) -> None:
        """Cross-field checks; subclasses override."""


def _component_names(kind: str):
    def names():
        from condcomp.models import components

        return components.names(kind)

    return names


@dataclass
class MoEConfig(_Validated):
    """Settings of ``ffn: moe`` (used only when model.ffn is moe)."""

    num_experts: int = _field(8, ge=1)
    router: str = _field("top_k", choices=("top_k", "expert_choice"))
    k: int = _field(1, ge=1, help="experts per token (top_k router)")
    capacity_factor: float | None = _field(1.25, gt=0.0, help="null = dropless (top_k only)")
    renormalize: bool | None = _field(None, help="top_k: rescale the k gates to sum to 1 (default: k > 1)")
    jitter: float = _field(0.0, ge=0.0, lt=1.0)
    expert_choice_mode: str = _field("per_position", choices=("per_position", "global"),
                                     help="global reads future tokens: encoders only")
    d_ff: int | None = _field(None, ge=1, help="hidden size of each expert; default: the dense FFN's")
    activation: str = _field("gelu", choices=("gelu", "swiglu"))
    shared_expert_d_ff: int | None = _field(None, ge=1)
    moe_every: int = _field(1, ge=1, help="layer i is MoE when (i + 1) % moe_every == 0; others dense")

    def check(self) -> None:
        if self.router == "top_k" and self.k > self.num_experts:
            raise ConfigError(f"k: {self.k} exceeds num_experts={self.num_experts}")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ConfigError("capacity_factor: expert choice needs a number (2.0 = top-2 compute), not null")


@dataclass
class MoDConfig(_Validated):
    """Settings of ``block: mod`` (mixture-of-depths)."""

    capacity: float = _field(0.125, gt=0.0, le=1.0, help="fraction of each sequence's tokens the block computes")
    every: int = _field(2, ge=1, help="layer i is MoD when (i + 1) % every == 0; others dense (the paper: 2)")
    causal_scheme: str = _field("aux_loss", choices=("aux_loss", "predictor"),
                                help="how inference decides causally: router logit > 0, or a stop-gradient predictor")


@dataclass
class SkipConfig(_Validated):
    """Settings of ``block: skip`` (learned per-token layer skipping)."""

    target_rate: float = _field(0.5, gt=0.0, le=1.0, help="fraction of tokens that should run each skippable block")
    every: int = _field(1, ge=1, help="layer i is skippable when (i + 1) % every == 0")
    temperature: float = _field(1.0, gt=0.0, help="Gumbel-softmax temperature")


@dataclass
class RecurrenceConfig(_Validated):
    """Settings of ``block: sru`` and ``block: srupp`` (one SRU / SRU++ layer per block, d_model cells)."""

    attn_every: int = _field(1, ge=1, help="srupp: layer i has the attention projection when (i + 1) % attn_every == 0")
    attn_size: int | None = _field(None, ge=1, help="srupp: attention width d'; default d_model / 4")
    attn_heads: int = _field(1, ge=1, help="srupp: attention heads (must divide attn_size)")
    highway_bias: float = _field(-2.0, help="initial reset-gate bias (SRU++: -2; SRU paper: 0)")


@dataclass
class ConditionalConfig(_Validated):
    """Settings of ``ffn: conditional`` and ``attention: conditional`` (CoLT5), decoder form."""

    capacity: float = _field(0.125, gt=0.0, le=1.0, help="fraction of tokens routed to the heavy FFN")
    light_d_ff: int | None = _field(None, ge=1, help="default: half the dense FFN's hidden size")
    heavy_d_ff: int | None = _field(None, ge=1, help="default: 4x the dense FFN's hidden size")
    activation: str = _field("gelu", choices=("gelu", "swiglu"))
    window: int = _field(32, ge=1, help="light attention looks back this many tokens")
    light_heads: int | None = _field(None, ge=1, help="default: a quarter of n_heads (at least 1)")
    q_capacity: float = _field(0.125, gt=0.0, le=1.0)
    kv_capacity: float = _field(0.25, gt=0.0, le=1.0)


@dataclass
class ModelConfig(_Validated):
    """Decoder LM shape and the named component used for each part of a block."""

    vocab_size: int = _field(256, ge=2, help="256 for byte-level text")
    d_model: int = _field(256, ge=8)
    n_layers: int = _field(4, ge=1)
    n_heads: int = _field(4, ge=1)
    d_ff: int | None = _field(None, ge=1, help="FFN hidden size; default 4*d_model (gelu) or 8/3*d_model rounded to 64 (swiglu)")
    seq_len: int = _field(256, ge=2)
    block: str = _field("transformer", choices=_component_names("block"))
    attention: str = _field("causal", choices=_component_names("attention"))
    ffn: str = _field("swiglu", choices=_component_names("ffn"))
    dropout: float = _field(0.0, ge=0.0, lt=1.0)
    norm_eps: float = _field(1e-5, gt=0.0)
    rope_base: float = _field(10000.0, gt=1.0)
    init_std: float = _field(0.02, gt=0.0)
    moe: MoEConfig = _field(default_factory=MoEConfig)
    mod: MoDConfig = _field(default_factory=MoDConfig)
    skip: SkipConfig = _field(default_factory=SkipConfig)
    conditional: ConditionalConfig = _field(default_factory=ConditionalConfig)
    recurrence: RecurrenceConfig = _field(default_factory=RecurrenceConfig)

    def check(self) -> None:
        if self.ffn == "moe" and self.moe.router == "expert_choice" and self.moe.expert_choice_mode == "global":
            raise ConfigError(
                "moe.expert_choice_mode: 'global' expert choice ranks tokens against future positions, so a "
                "decoder would learn to read the future; use expert_choice_mode: per_position")
        if self.block == "srupp":
            attn = self.recurrence.attn_size or max(self.recurrence.attn_heads, self.d_model // 4)
            if attn % self.recurrence.attn_heads:
                raise ConfigError(f"recurrence.attn_heads: {self.recurrence.attn_heads} does not divide the "
                                  f"attention width {attn} (recurrence.attn_size, default d_model / 4)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"n_heads: head size d_model/n_heads = {self.d_model // self.n_heads} must be even for rotary positions"
            )

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if (self.ffn == "gelu" or (self.ffn == "moe" and self.moe.activation == "gelu")
                or (self.ffn == "conditional" and self.conditional.activation == "gelu")):
            return 4 * self.d_model
        # SwiGLU keeps the parameter count of a 4x GELU FFN: 2/3 * 4d, rounded up to 64.
        return 64 * ((8 * self.d_model // 3 + 63) // 64)


@dataclass
class DataConfig(_Validated):
    """Where the training text comes from and how it is split."""

    source: str = _field("stdlib", help="'stdlib' (the running Python's standard library source) or a path to a text file or folder")
    val_fraction: float = _field(0.05, gt=0.0, lt=0.5)
    test_fraction: float = _field(0.05, gt=0.0, lt=0.5)
    cache_dir: str | None = _field(None, help="default: $CONDCOMP_CACHE or ~/.cache/condcomp")


@dataclass
class TrainConfig(_Validated):
    """Optimisation, evaluation, logging and checkpointing."""

    steps: int = _field(1000, ge=1, help="training steps; with max_flops/max_seconds, an upper bound")
    max_flops: float | None = _field(None, gt=0.0, help="stop when the executed training FLOPs reach this budget; "
                                     "the LR schedule follows the fraction spent")
    max_seconds: float | None = _field(None, gt=0.0, help="stop after this much training time (wall clock); "
                                       "the LR schedule follows the fraction spent")
    batch_size: int = _field(16, ge=1, help="sequences per step, over all ranks together (each of N ranks takes 1/N)")
    lr: float = _field(3e-3, gt=0.0)
    min_lr_ratio: float = _field(0.1, ge=0.0, le=1.0, help="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = _field(100, ge=0)
    weight_decay: float = _field(0.1, ge=0.0)
    beta1: float = _field(0.9, ge=0.0, lt=1.0)
    beta2: float = _field(0.95, ge=0.0, lt=1.0)
    grad_clip: float | None = _field(1.0, gt=0.0)
    precision: str = _field("fp32", choices=("fp32", "bf16"), help="bf16 = autocast on CPU")
    seed: int = _field(0, ge=0)
    eval_every: int = _field(200, ge=1)
    eval_batches: int = _field(16, ge=1)
    log_every: int = _field(10, ge=1)
    checkpoint_every: int = _field(200, ge=1)
    keep_checkpoints: int = _field(2, ge=1)
    flops_every: int = _field(1, ge=1, help="count executed FLOPs exactly every N steps; steps in between reuse the last count")
    threads: int | None = _field(None, ge=1, help="torch intra-op threads; default: all cores")
    expert_parallel: int = _field(1, ge=1, help="under torchrun: spread each MoE's experts over this many ranks "
                                  "(must divide the number of ranks and model.moe.num_experts); 1 = data parallel only")
    aux_loss_weights: dict[str, float] = _field(
        default_factory=lambda: {"load_balance": 0.01, "z_loss": 0.001, "router_bce": 0.1, "predictor_bce": 1.0,
                                 "skip_rate": 1.0},
        help="weight of each auxiliary loss a layer returns, by name",
    )
    progress: bool = _field(True, help="show a progress bar")

    def check(self) -> None:
        if self.max_flops is not None and self.max_seconds is not None:
            raise ConfigError("max_flops: set a FLOPs budget or a time budget (max_seconds), not both")
        for name, w in self.aux_loss_weights.items():
            if w < 0:
                raise ConfigError(f"aux_loss_weights.{name}: must be >= 0, got {w}")


@dataclass
class RunConfig(_Validated):
    model: ModelConfig = _field(default_factory=ModelConfig)
    data: DataConfig = _field(default_factory=DataConfig)
    train: TrainConfig = _field(default_factory=TrainConfig)
    run_dir: str = _field("runs/default")

    def check(self) -> None:
        ep = self.train.expert_parallel
        if ep > 1 and self.model.ffn != "moe":
            raise ConfigError(f"train.expert_parallel: {ep} needs MoE layers, but model.ffn is {self.model.ffn!r}; "
                              "set model.ffn: moe, or train.expert_parallel: 1")
        if ep > 1 and self.model.moe.num_experts % ep:
            raise ConfigError(f"train.expert_parallel: {ep} must divide model.moe.num_experts="
                              f"{self.model.moe.num_experts} (each rank holds the same number of experts)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str):
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k_tp, k, f"{key}.{k}"): _coerce(v_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a plain mapping, naming the full key path in any error."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.steps=100")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with model/data/train sections")
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    return from_dict(RunConfig, raw)


def config_from_saved(d: dict) -> RunConfig:
    """Rebuild a RunConfig from ``RunConfig.to_dict()`` output (as stored in checkpoints)."""
    return from_dict(RunConfig, d)
