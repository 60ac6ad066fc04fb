"""Typed, validated run configuration.

A run is described by a YAML file with three sections (``model``, ``data``, ``train``) plus
``run_dir``. Loading checks every key against the dataclasses below and fails at once, naming the
key, on an unknown key, a wrong type or an out-of-range value, so a typo never trains silently with a
default.

    cfg = load_config("configs/dense.yaml", overrides=["train.steps=100", "model.ffn=gelu"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condcomp import registry
from condcomp.data.domains import DOMAINS
from condcomp.device import DeviceError, check_device_spec
from condcomp.settings import ConfigError, Settings, from_dict, read_yaml, setting

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "config_from_saved", "from_dict",
           "load_config"]


def _technique_names(kind: str):
    return lambda: registry.names(kind)


@dataclass
class RopeScaling(Settings):
    """Rotary frequency scaling for long contexts (``model.rope_scaling``); Llama 3.1 uses llama3."""

    type: str = setting("none", choices=("none", "llama3"))
    factor: float = setting(8.0, gt=0.0)
    low_freq_factor: float = setting(1.0, gt=0.0)
    high_freq_factor: float = setting(4.0, gt=0.0)
    original_max_len: int = setting(8192, ge=1, help="the context length the model was pretrained with")

    def check(self) -> None:
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"high_freq_factor: must exceed low_freq_factor={self.low_freq_factor}, "
                              f"got {self.high_freq_factor}")

    def rotary_kwargs(self) -> dict:
        """Keyword arguments of ``condcomp.layers.Rotary``."""
        if self.type == "none":
            return {}
        return {"scaling": self.type, "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor, "original_max_len": self.original_max_len}


@dataclass(init=False)
class ModelConfig(Settings):
    """Decoder LM shape and the technique used for each part of a block.

    ``attention``, ``ffn`` and ``block`` name registered techniques (``condcomp techniques`` lists
    them); each technique's settings are a section of this config (``model.moe``, ``model.mod``, ...),
    present with defaults whether or not the technique is used, and reached as attributes
    (``cfg.moe.k``). Sections can be passed by name: ``ModelConfig(ffn="moe", moe=MoESettings(k=2))``.
    """

    vocab_size: int = setting(256, ge=2, le=2**24, help="256 for byte-level text")
    d_model: int = setting(256, ge=8, le=65536)
    n_layers: int = setting(4, ge=1, le=1024)
    n_heads: int = setting(4, ge=1, le=4096)
    n_kv_heads: int | None = setting(None, ge=1, help="key/value heads; default n_heads (fewer: grouped-query attention)")
    head_dim: int | None = setting(None, ge=2, le=65536, help="per-head width; default d_model / n_heads")
    d_ff: int | None = setting(None, ge=1, le=2**20, help="FFN hidden size; default 4*d_model (gelu) or 8/3*d_model rounded to 64 (swiglu)")
    seq_len: int = setting(256, ge=2, le=2**20)
    block: str = setting("transformer", choices=_technique_names("block"))
    attention: str = setting("causal", choices=_technique_names("attention"))
    ffn: str = setting("swiglu", choices=_technique_names("ffn"))
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    norm_eps: float = setting(1e-5, gt=0.0)
    rope_base: float = setting(10000.0, gt=1.0)
    init_std: float = setting(0.02, gt=0.0)
    tie_embeddings: bool = setting(True, help="the output projection shares the input embedding's weights")
    qkv_bias: bool = setting(False, help="biases on the q/k/v projections (Qwen2)")
    out_bias: bool = setting(False, help="bias on the attention output projection")
    rope_scaling: RopeScaling = setting(default_factory=RopeScaling)
    init: str | None = setting(None, help="start from pretrained weights: a Hugging Face model folder, a packaged "
                                          "name (smollm2) or a condcomp run/checkpoint folder")
    sections: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        sections = dict(values.pop("sections", None) or {})
        registered = registry.sections()
        for name in [k for k in values if k in registered]:
            sections[name] = values.pop(name)
        own = {f.name: f for f in dataclasses.fields(self) if f.name != "sections"}
        unknown = sorted(set(values) - set(own) | set(sections) - set(registered))
        if unknown:
            raise ConfigError(f"unknown model setting(s) {unknown}; valid: {sorted(own) + sorted(registered)}")
        for name, f in own.items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, name, values.get(name, default))
        for name, cls in registered.items():
            given = sections.get(name)
            if given is None:
                sections[name] = cls()
            elif not isinstance(given, cls):
                raise ConfigError(f"{name}: expected {cls.__name__}, got {type(given).__name__}")
        self.sections = {name: sections[name] for name in registered}  # registration order
        self.__post_init__()

    @classmethod
    def open_sections(cls) -> dict[str, type]:
        return registry.sections()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a technique's settings section, by name.
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no setting or section {name!r}")

    def parts(self) -> list[registry.Technique]:
        """The techniques this model uses: its block, attention and ffn."""
        return [registry.get(kind, getattr(self, kind)) for kind in ("block", "attention", "ffn")]

    def check(self) -> None:
        for tech in self.parts():
            if tech.validate is not None:
                tech.validate(self)
        for tech in self.parts():
            if not tech.causal(self):
                raise ConfigError(f"{tech.kind}: {tech.name} with these settings lets a token see later tokens, and "
                                  f"a decoder would learn to cheat; choose its causal scheme (condcomp techniques "
                                  f"lists the settings)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)")
        if self.attention_head_dim % 2:
            raise ConfigError(f"n_heads: head size {self.attention_head_dim} (head_dim, default d_model/n_heads) "
                              "must be even for rotary positions")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads: {self.n_kv_heads} must divide n_heads={self.n_heads}")

    @property
    def attention_head_dim(self) -> int:
        """head_dim, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def uses_llama_attention_features(self) -> bool:
        """Whether the attention needs more than plain multi-head attention: grouped-query heads, a
        head size of its own, or biases (only ``attention: causal`` has them)."""
        return (self.n_kv_heads not in (None, self.n_heads) or self.head_dim not in (None, self.d_model // self.n_heads)
                or self.qkv_bias or self.out_bias)

    @property
    def ffn_hidden(self) -> int:
        """The dense FFN's hidden size: d_ff, or the default for the ffn technique's activation."""
        if self.d_ff is not None:
            return self.d_ff
        activation = registry.get("ffn", self.ffn).activation
        if activation is not None and activation(self) == "gelu":
            return 4 * self.d_model
        # SwiGLU keeps the parameter count of a 4x GELU FFN: 2/3 * 4d, rounded up to 64.
        return 64 * ((8 * self.d_model // 3 + 63) // 64)


@dataclass
class DataConfig(Settings):
    """Where the training text comes from and how it is split."""

    source: str = setting("stdlib", help="a named domain (stdlib: the running Python's standard library "
                        "source; python-docs, kjv, bbc-news), a path to a text file or folder, "
                        "or a mixture joined by '+' (stdlib+kjv)")
    val_fraction: float = setting(0.05, gt=0.0, lt=0.5)
    test_fraction: float = setting(0.05, gt=0.0, lt=0.5)
    cache_dir: str | None = setting(None, help="default: $CONDCOMP_CACHE or ~/.cache/condcomp")
    tokenizer: str | None = setting(None, help="'bytes', a Hugging Face tokenizer folder or a packaged model name "
                                               "(smollm2); default: model.init's tokenizer, else bytes")


@dataclass
class TrainConfig(Settings):
    """Optimisation, evaluation, logging and checkpointing."""

    steps: int = setting(1000, ge=1, help="training steps; with max_flops/max_seconds, an upper bound")
    max_flops: float | None = setting(None, gt=0.0, help="stop when the executed training FLOPs reach this budget; "
                                     "the LR schedule follows the fraction spent")
    max_seconds: float | None = setting(None, gt=0.0, help="stop after this much training time (wall clock); "
                                       "the LR schedule follows the fraction spent")
    batch_size: int = setting(16, ge=1, le=2**20, help="sequences per step, over all ranks together (each of N ranks takes 1/N)")
    lr: float = setting(3e-3, gt=0.0)
    min_lr_ratio: float = setting(0.1, ge=0.0, le=1.0, help="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = setting(100, ge=0)
    weight_decay: float = setting(0.1, ge=0.0)
    beta1: float = setting(0.9, ge=0.0, lt=1.0)
    beta2: float = setting(0.95, ge=0.0, lt=1.0)
    grad_clip: float | None = setting(1.0, gt=0.0)
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"),
                             help="bf16 = autocast (bf16 matrix products, fp32 weights); auto = bf16 on CUDA, fp32 on CPU")
    device: str = setting("auto", help="where to train: auto (CUDA when present), cpu, cuda or cuda:N "
                                       "(under torchrun with CUDA: each rank its local GPU)")
    seed: int = setting(0, ge=0, le=2**63 - 1)
    eval_every: int = setting(200, ge=1)
    eval_batches: int = setting(16, ge=1)
    log_every: int = setting(10, ge=1)
    checkpoint_every: int = setting(200, ge=1)
    keep_checkpoints: int = setting(2, ge=1)
    flops_every: int = setting(1, ge=1, help="count executed FLOPs exactly every N steps; steps in between reuse the last count")
    threads: int | None = setting(None, ge=1, help="torch intra-op threads; default: all cores")
    expert_parallel: int = setting(1, ge=1, help="under torchrun: spread each MoE's experts over this many ranks "
                                  "(must divide the number of ranks and model.moe.num_experts); 1 = data parallel only")
    fsdp: bool = setting(False, help="under torchrun: shard parameters, gradients and optimizer state over the ranks "
                                     "(FSDP2, each block a unit) and write sharded checkpoints "
                                     "(torch.distributed.checkpoint) that load on any number of ranks")
    activation_checkpointing: bool = setting(False, help="keep only each block's input in the forward pass and "
                                                         "recompute the block in backward: less activation memory, "
                                                         "more executed FLOPs (1.26x for configs/dense.yaml; "
                                                         "both counts are logged)")
    max_memory_gb: float | None = setting(None, gt=0.0, help="per-rank memory limit for parameters, gradients and "
                                                             "optimizer state: training refuses to start, naming the "
                                                             "world size that would fit, when they exceed it")
    aux_loss_weights: dict[str, float] = setting(
        default_factory=registry.default_aux_loss_weights,
        help="weight of each auxiliary loss a layer returns, by name (defaults: each technique's)",
    )
    progress: bool = setting(True, help="show a progress bar")
    eval_from: int = setting(0, ge=0, help="validation scores targets from this position of each window on (the same "
                                           "for every variant of a grid with input-conditioned pruning, whose "
                                           "models are scored after their prompt)")
    low_memory: bool = setting(False, help="trade speed for resident memory on CPU: large tensors are mapped and "
                                           "unmapped, and the heap is trimmed after every step (routed variants' RSS "
                                           "-45 to -50%, steps 2-2.6x slower: docs/benchmarks.md)")
    fast_allocator: bool = setting(True, help="keep freed host memory in the heap for the next step instead of "
                                              "handing it back and faulting it in again (steps up to 17% faster, "
                                              "peak RSS +2-9%: docs/benchmarks.md); low_memory overrides it")
    distill: float = setting(0.0, ge=0.0, help="weight of the KL divergence from the model.init model's predictions "
                                               "(distillation from the dense model a pruned one starts from); 0 = off")

    def check(self) -> None:
        try:
            check_device_spec(self.device)
        except DeviceError as e:
            raise ConfigError(f"train.device: {e}") from None
        if self.max_flops is not None and self.max_seconds is not None:
            raise ConfigError("max_flops: set a FLOPs budget or a time budget (max_seconds), not both")
        for name, w in self.aux_loss_weights.items():
            if w < 0:
                raise ConfigError(f"aux_loss_weights.{name}: must be >= 0, got {w}")


@dataclass
class RunConfig(Settings):
    model: ModelConfig = setting(default_factory=ModelConfig)
    data: DataConfig = setting(default_factory=DataConfig)
    train: TrainConfig = setting(default_factory=TrainConfig)
    run_dir: str = setting("runs/default")

    def check(self) -> None:
        ep = self.train.expert_parallel
        if ep > 1 and self.model.ffn != "moe":
            raise ConfigError(f"train.expert_parallel: {ep} needs MoE layers, but model.ffn is {self.model.ffn!r}; "
                              "set model.ffn: moe, or train.expert_parallel: 1")
        if ep > 1 and self.model.moe.num_experts % ep:
            raise ConfigError(f"train.expert_parallel: {ep} must divide model.moe.num_experts="
                              f"{self.model.moe.num_experts} (each rank holds the same number of experts)")
        if self.train.eval_from >= self.model.seq_len:
            raise ConfigError(f"train.eval_from: {self.train.eval_from} leaves no position of a "
                              f"{self.model.seq_len}-token window to score; use a value below model.seq_len")



# Input paths a config file may hold. Written in a file, a relative one means relative to that file
# (as a grid's variant configs are to the grid); given with --set or --data, relative to the working
# directory. Output folders (run_dir) are always relative to the working directory.
FILE_RELATIVE_KEYS = (("data", "source"), ("data", "cache_dir"), ("data", "tokenizer"), ("model", "init"))
NOT_PATHS = set(DOMAINS) | {"bytes"}


def resolve_file_paths(raw: dict, base: Path) -> dict:
    """Make the relative input paths of a config mapping read from a file in ``base`` absolute.
    Names that are not paths (stdlib, bytes, a packaged model) stay as they are."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, key in FILE_RELATIVE_KEYS:
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or value in NOT_PATHS or Path(value).expanduser().is_absolute():
            continue
        if key == "source" and "+" in value and not (base / value).exists():  # a mixture: each part on its own
            node[key] = "+".join(p if p in NOT_PATHS or Path(p).expanduser().is_absolute() else str((base / p).resolve())
                                 for p in value.split("+"))
            continue
        candidate = base / value
        if key in ("tokenizer", "init") and not candidate.exists():
            continue  # a packaged model name, not a path
        node[key] = str(candidate.resolve())
    return out


def read_run_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """A config file's mapping with its relative input paths resolved against its folder, then the
    command line's ``key=value`` overrides (whose paths stay relative to the working directory)."""
    raw = read_yaml(path) if path is not None else {}
    if path is not None:
        raw = resolve_file_paths(raw, Path(path).resolve().parent)
    return read_yaml(None, overrides, base=raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    return from_dict(RunConfig, read_run_yaml(path, overrides))


def config_from_saved(d: dict) -> RunConfig:
    """Rebuild a RunConfig from ``RunConfig.to_dict()`` output (as stored in checkpoints)."""
    return from_dict(RunConfig, d)
