"""CoDA: conditional adapters on a frozen pretrained encoder (Lei, Bai, Brahma et al., 2023).

Each converted layer computes, for x: [batch, seq, d]

    y = x + adapter(x) + w * scatter(layer(x_sel) - x_sel)

where a router picks k = ceil(n / r) of the n real tokens of each sequence, the frozen pretrained
layer runs only on those (attention among the selected tokens), w are their soft top-k weights
(the router's gradient), and the small parallel adapter runs on every token. With r = 1 every
real token is selected with w = 1 exactly, so a zero adapter gives back the pretrained layer.

The same wrapper gives the baselines: ``method="adapter"`` (parallel adapter, every token through
the frozen layer), ``"probe"`` (frozen encoder, only the head trains) and ``"finetune"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from condcomp.dispatch.sequences import SequencePack, dispatch_sequences
from condcomp.routing.token_select import TokenSelectRouter
from condcomp.settings import ConfigError, Settings, setting

METHODS = ("coda", "adapter", "probe", "finetune")


class ConvertError(ConfigError):
    """Invalid conversion options; the message says what to change."""


@dataclass
class CodaConfig(Settings):
    """How a pretrained encoder is converted and what head sits on it.

    method: "coda" (routed frozen layers + adapters), "adapter" (dense frozen layers + adapters),
        "probe" (frozen encoder), "finetune" (everything trains).
    reduction: r; each converted layer computes ceil(n / r) tokens per sequence (method "coda").
    adapter_dim: hidden width of each parallel adapter (methods "coda" and "adapter").
    layers: indices of the layers to convert; None = all.
    eps: soft top-k temperature. num_labels / label_names: the classification head.
    base_model: where the pretrained weights came from (a packaged name or a folder), for the record.
    max_length: tokens per example the model was trained with (inputs are cut to it).
    dropout: keep the pretrained layers' dropout in training. Off by default: frozen layers are
        feature extractors, and on CPU the attention-dropout path is about 5x slower than SDPA without it.
    """

    error = ConvertError

    method: str = setting("coda", choices=METHODS)
    reduction: int = setting(4, ge=1, help="k = n / r tokens computed per converted layer")
    adapter_dim: int = setting(64, ge=0)
    layers: list[int] | None = setting(None)
    eps: float = setting(0.1, gt=0.0)
    num_labels: int = setting(2, ge=2)
    label_names: list[str] = setting(default_factory=list)
    base_model: str = setting("minilm")
    max_length: int = setting(512, ge=2)
    dropout: bool = setting(False)

    def check(self) -> None:
        if not isinstance(self.reduction, int):
            raise ConvertError(f"reduction r must be an integer >= 1 (k = n / r tokens computed), got {self.reduction!r}")
        if self.method in ("coda", "adapter") and self.adapter_dim < 1:
            raise ConvertError(f"adapter_dim must be >= 1 for method {self.method!r}, got {self.adapter_dim}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ConvertError(f"{len(self.label_names)} label names for num_labels={self.num_labels}")


class ParallelAdapter(nn.Module):
    """down-project, GELU, up-project: [..., d] -> [..., d]. The up-projection starts at zero, so a
    new adapter adds nothing and the converted model starts as the pretrained one."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(d_model, hidden)
        self.up = nn.Linear(hidden, d_model)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def attention_mask_for(layer: nn.Module, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """[batch, m] bool (True = real) -> the mask a Hugging Face BERT layer takes, or None if all real.

    SDPA takes a boolean [batch, 1, 1, m] mask (True = attend); the eager kernel adds a float mask.
    """
    if bool(valid.all()):
        return None
    impl = getattr(getattr(layer.attention.self, "config", None), "_attn_implementation", "eager")
    mask = valid[:, None, None, :]
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=valid.device).masked_fill(~mask, torch.finfo(dtype).min)


class FrozenLayer(nn.Module):
    """A pretrained layer with the encoder's interface: (x [b, t, d], real [b, t] bool) -> (y, metrics)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, real: torch.Tensor):
        return self.layer(x, attention_mask_for(self.layer, real, x.dtype)), {}


class AdapterLayer(nn.Module):
    """y = layer(x) + adapter(x): a standard parallel adapter on a (frozen) dense layer."""

    def __init__(self, layer: nn.Module, d_model: int, adapter_dim: int):
        super().__init__()
        self.layer = layer
        self.adapter = ParallelAdapter(d_model, adapter_dim)

    def forward(self, x: torch.Tensor, real: torch.Tensor):
        return self.layer(x, attention_mask_for(self.layer, real, x.dtype)) + self.adapter(x), {}


class CodaLayer(nn.Module):
    """y = x + adapter(x) + w * scatter(layer(x_sel) - x_sel), k = ceil(real tokens / r) per sequence.

    layer: a pretrained layer, (hidden [b, m, d], attention mask) -> [b, m, d], position-free (BERT's
    positions are added at the embeddings), so it can run on any subset of tokens.
    Padding is never selected: the router sees ``real`` and only real tokens are candidates.
    """

    def __init__(self, layer: nn.Module, d_model: int, *, reduction: int, adapter_dim: int, eps: float = 0.1):
        super().__init__()
        self.layer = layer
        self.reduction = reduction
        self.router = TokenSelectRouter(d_model=d_model, capacity=1.0 / reduction, weighting="soft_top_k", eps=eps)
        self.adapter = ParallelAdapter(d_model, adapter_dim)

    def _update(self, xs: torch.Tensor, pack: SequencePack) -> torch.Tensor:
        """The frozen layer's change to each selected token, attention only among the selected."""
        return self.layer(xs, attention_mask_for(self.layer, pack.valid, xs.dtype)) - xs

    def forward(self, x: torch.Tensor, real: torch.Tensor):
        """x: [batch, seq, d]; real: [batch, seq] bool. Returns (y [batch, seq, d], metrics)."""
        routing = self.router(x, real)
        update = dispatch_sequences(x, routing, self._update).view_as(x)
        return x + self.adapter(x) + update.to(x.dtype), routing.metrics


class CodaClassifier(nn.Module):
    """A converted encoder with a mean-pooling classification head.

    forward(input_ids [b, t] int64, attention_mask [b, t] 0/1) -> logits [b, num_labels].
    ``classify`` returns the logits with each layer's routing metrics ("layer{i}.fraction_selected",
    ...), for logging.
    """

    def __init__(self, base: nn.Module, config: CodaConfig):
        super().__init__()
        self.config = config
        self.embeddings = base.embeddings
        layers = list(base.encoder.layer)
        d_model = base.config.hidden_size
        chosen = range(len(layers)) if config.layers is None else config.layers
        bad = [i for i in chosen if not 0 <= i < len(layers)]
        if bad:
            raise ConvertError(f"layers {bad} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
        self.base_config = base.config
        wrapped = []
        for i, layer in enumerate(layers):
            if i in chosen and config.method == "coda":
                wrapped.append(CodaLayer(layer, d_model, reduction=config.reduction, adapter_dim=config.adapter_dim,
                                         eps=config.eps))
            elif i in chosen and config.method == "adapter":
                wrapped.append(AdapterLayer(layer, d_model, config.adapter_dim))
            else:
                wrapped.append(FrozenLayer(layer))
        self.layers = nn.ModuleList(wrapped)
        self.head = nn.Linear(d_model, config.num_labels)
        self._freeze()

    def _freeze(self) -> None:
        """Pretrained weights train only when fine-tuning; routers, adapters and the head always train."""
        pretrained = {id(p) for p in self.embeddings.parameters()}
        for layer in self.layers:
            pretrained |= {id(p) for p in layer.layer.parameters()}
        for p in self.parameters():
            p.requires_grad_(self.config.method == "finetune" or id(p) not in pretrained)

    def train(self, mode: bool = True) -> "CodaClassifier":
        super().train(mode)
        if mode and not self.config.dropout:
            self.embeddings.eval()
            for layer in self.layers:
                layer.layer.eval()
        return self

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """-> last hidden states [batch, seq, d]."""
        return self._encode(input_ids, attention_mask, token_type_ids)[0]

    def _encode(self, input_ids, attention_mask, token_type_ids=None):
        real = attention_mask.to(torch.bool)
        if not bool(real.any(dim=1).all()):
            raise ConvertError("every sequence needs at least one real token (attention_mask all zero in a row)")
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        metrics = {}
        for i, layer in enumerate(self.layers):
            h, layer_metrics = layer(h, real)
            metrics.update({f"layer{i}.{k}": v for k, v in layer_metrics.items()})
        return h, metrics

    def pretrained_encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The original dense model's last hidden states [batch, seq, d]: every pretrained layer on
        every token, no adapters, no routing (the teacher of ``distillation_loss``)."""
        real = attention_mask.to(torch.bool)
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        for layer in self.layers:
            h = layer.layer(h, attention_mask_for(layer.layer, real, h.dtype))
        return h

    def distillation_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean squared distance, per real token and feature, between this model's last hidden states
        and the dense pretrained model's. CoDA's light training phase: it teaches routers and adapters
        to reproduce the pretrained model before the task is learned (no labels needed)."""
        with torch.no_grad():
            target = self.pretrained_encode(input_ids, attention_mask)
        h = self.encode(input_ids, attention_mask)
        real = attention_mask.to(torch.bool)
        return (h[real].float() - target[real].float()).pow(2).mean()

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (logits [batch, num_labels], routing metrics by layer)."""
        h, metrics = self._encode(input_ids, attention_mask, token_type_ids)
        m = attention_mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(pooled), metrics

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(input_ids, attention_mask, token_type_ids)[0]


def convert(base: nn.Module, config: CodaConfig | None = None, **options) -> CodaClassifier:
    """Turn a Hugging Face BERT-family encoder (``BertModel``) into a classifier of the given method.

    The base model's modules are reused (not copied); its weights are frozen unless fine-tuning.
    Options are CodaConfig fields: ``convert(bert, reduction=4, adapter_dim=64, num_labels=5)``.
    """
    if config is not None and options:
        raise ConvertError("pass either a CodaConfig or keyword options, not both")
    config = config or CodaConfig(**options)
    if not (hasattr(base, "embeddings") and hasattr(base, "encoder") and hasattr(base.encoder, "layer")):
        raise ConvertError(f"convert expects a BERT-family encoder (embeddings + encoder.layer), got {type(base).__name__}")
    return CodaClassifier(base, config)
