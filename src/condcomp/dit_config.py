"""The configuration of a DiT run (``condcomp dit train --config``): model, data and training
sections, validated at construction, read from YAML with ``key=value`` overrides. The image-model
counterpart of ``condcomp.config`` (the language model's).

    data: {dataset: mnist}
    model: {d_model: 128, n_layers: 4, patch: 7, ffn: moe, moe: {num_experts: 8, d_ff: 256}}
    train: {steps: 5000, batch_size: 64, lr: 1.0e-3, precision: bf16}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from condcomp import registry
from condcomp.data.digits import DATASETS, image_shape
from condcomp.device import DeviceError, check_device_spec
from condcomp.models.flow import TIME_SAMPLING
from condcomp.settings import ConfigError, Settings, from_dict, read_yaml, setting
from condcomp.techniques.moe import MoESettings


@dataclass
class DiTMoESettings(MoESettings):
    """``model.moe`` of a DiT: the LM's MoE settings with EC-DiT's defaults (expert choice per image,
    capacity factor 2, GELU experts like the DiT's dense FFN); ``router: top_k`` gives the token-choice
    baseline."""

    router: str = setting("expert_choice", choices=("top_k", "expert_choice"))
    capacity_factor: float | None = setting(2.0, gt=0.0, help="expert choice: slots per expert = factor x patches "
                                                              "/ experts; top_k: null = dropless")
    expert_choice_mode: str = setting("per_sequence", choices=("per_sequence", "global", "per_position"),
                                      help="per_sequence: each image's patches are ranked on their own (batch-invariant)")
    activation: str = setting("gelu", choices=("gelu", "swiglu"),
                              help="of the experts: GELU like the DiT's default dense FFN (ffn: gelu), as in EC-DiT")


@dataclass
class DiTConfig(Settings):
    """The model section of a DiT run (``condcomp dit train --config``)."""

    image_size: int = setting(28, ge=2, help="side of the square input image in pixels")
    channels: int = setting(1, ge=1)
    patch: int = setting(7, ge=1, help="patch side; must divide image_size (7 for 28x28 digits: 16 tokens; 4 gives 49 tokens and learns far more slowly, docs/dit.md)")
    d_model: int = setting(128, ge=8)
    n_layers: int = setting(4, ge=1)
    n_heads: int = setting(4, ge=1)
    num_classes: int = setting(10, ge=1)
    ffn: str = setting("gelu", choices=lambda: registry.names("ffn"),
                       help="feed-forward technique: gelu, swiglu, moe (token or expert choice), ...")
    d_ff: int | None = setting(None, ge=1, help="dense FFN hidden size; default 4 d_model")
    moe: DiTMoESettings = field(default_factory=DiTMoESettings)
    dropout: float = setting(0.0, ge=0.0, lt=1.0)

    def check(self) -> None:
        if self.image_size % self.patch:
            raise ConfigError(f"patch: {self.patch} does not divide image_size {self.image_size}; pick a patch "
                              f"size that divides it (e.g. {max(d for d in range(1, self.patch + 1) if self.image_size % d == 0)})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: {self.n_heads} does not divide d_model {self.d_model}")
        if self.d_model % 4:
            raise ConfigError(f"d_model: {self.d_model} must be a multiple of 4 (2-D sin-cos positions)")

    @property
    def ffn_hidden(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2



@dataclass
class DiTDataConfig(Settings):
    dataset: str = setting("mnist", choices=DATASETS, help="mnist (28x28, 4k train / 1k held out) or mnist8 (8x8)")


@dataclass
class DiTTrainConfig(Settings):
    steps: int = setting(5000, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(1e-3, gt=0.0)
    weight_decay: float = setting(0.0, ge=0.0)
    warmup_steps: int = setting(100, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0.0, le=1.0)
    grad_clip: float | None = setting(1.0, gt=0.0)
    precision: str = setting("bf16", choices=("fp32", "bf16"))
    device: str = setting("auto", help="where to train: auto (CUDA when present), cpu, cuda or cuda:N")
    seed: int = setting(0, ge=0)
    label_dropout: float = setting(0.1, ge=0.0, le=1.0, help="classifier-free guidance: share of null labels")
    time_sampling: str = setting("uniform", choices=TIME_SAMPLING, help="training times t: uniform, or "
                                 "logit_normal (SD3: more mid-range t)")
    ema: float = setting(0.999, ge=0.0, lt=1.0, help="EMA decay of the weights samples are drawn from")
    max_flops: float | None = setting(None, gt=0.0, help="stop when the executed training FLOPs reach this")
    flops_every: int = setting(25, ge=1, help="count FLOPs every this many steps (the count in between is reused)")
    eval_every: int = setting(1000, ge=1)
    eval_samples: int = setting(200, ge=10, help="samples for the judge's accuracy and Fréchet distance")
    sample_steps: int = setting(20, ge=1, help="Euler steps of the sampler")
    guidance: float = setting(2.0, ge=0.0, help="classifier-free guidance scale (1 = conditional only)")
    checkpoint_every: int = setting(1000, ge=1)
    log_every: int = setting(50, ge=1)
    progress: bool = setting(True)


@dataclass
class DiTRunConfig(Settings):
    model: DiTConfig = field(default_factory=DiTConfig)
    data: DiTDataConfig = field(default_factory=DiTDataConfig)
    train: DiTTrainConfig = field(default_factory=DiTTrainConfig)
    run_dir: str = setting("runs/dit")
    kind: str = setting("dit", choices=("dit",), help="marks a DiT run (an LM checkpoint is refused by dit commands)")

    def check(self) -> None:
        try:
            check_device_spec(self.train.device)
        except DeviceError as e:
            raise ConfigError(f"train.device: {e}") from None
        channels, side = image_shape(self.data.dataset)
        if (self.model.image_size, self.model.channels) != (side, channels):
            raise ConfigError(f"model.image_size: {self.model.image_size} (channels {self.model.channels}) does not "
                              f"match data.dataset {self.data.dataset!r} ({side}x{side}, {channels} channel); "
                              f"set model.image_size={side}")


def load_dit_config(path=None, overrides: list[str] | None = None, *, base: dict | None = None) -> DiTRunConfig:
    """A DiT run config from YAML (or the mapping ``base``) and ``key=value`` overrides; an image size
    and patch left out follow the data (28 and 7 for mnist, 8 and 2 for mnist8)."""
    raw = read_yaml(path, overrides, base=base)
    data = raw.get("data") or {}
    model = raw.setdefault("model", {}) if isinstance(raw.get("model", {}), dict) else raw.get("model")
    if isinstance(data, dict) and isinstance(model, dict) and "image_size" not in model:
        dataset = data.get("dataset", "mnist")
        if dataset in DATASETS:
            model["image_size"] = image_shape(dataset)[1]
            model.setdefault("patch", 7 if dataset == "mnist" else 2)
    return from_dict(DiTRunConfig, raw)
