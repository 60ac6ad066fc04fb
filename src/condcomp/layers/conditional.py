"""CoLT5 conditional computation (Ainslie et al., 2023): a light branch for
every token plus a heavy branch only for the tokens a router picks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.dispatch import dispatch
from condcomp.dispatch.sequences import gather_pack, pack_sequences, scatter_pack
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.layers.local_attention import LocalAttention
from condcomp.layers.rotary import Rotary
from condcomp.layers.traits import RoutedParameters, RouterTraits, count_parameters
from condcomp.routing import Router, RoutingError, TokenSelectRouter


def colt5_router(*, d_model: int, capacity: float, causal: bool) -> TokenSelectRouter:
    """CoLT5's router for one branch. Encoders: soft top-k weights (the paper). Decoders: per-token
    sigmoid weights, the router logit trained to predict top-k membership and thresholded at inference."""
    return TokenSelectRouter(d_model=d_model, capacity=capacity, weighting="sigmoid" if causal else "soft_top_k",
                             causal_scheme="aux_loss" if causal else None)


def _check_router(router: Router, d_model: int, what: str) -> Router:
    if not isinstance(router, Router):
        raise RoutingError(f"{what} must be a Router (e.g. TokenSelectRouter), got {type(router).__name__}")
    if router.d_model != d_model:
        raise RoutingError(f"{what} was built for d_model={router.d_model}, the layer has d_model={d_model}")
    return router


class ConditionalFeedForward(RouterTraits, nn.Module):
    """y_i = FF_light(x_i) + w_i * FF_heavy(x_i), the heavy FFN run only on the routed tokens.

        cff = ConditionalFeedForward(d_model=512, light_d_ff=1024, heavy_d_ff=8192, capacity=1/8)
        y, info = cff(x)            # x: [batch, seq, 512]; 1/8 of each sequence gets the heavy FFN

    Args:
        d_model; light_d_ff, heavy_d_ff: hidden sizes (the paper: d_ff/2 and 4*d_ff).
        capacity: fraction of each sequence's tokens routed to the heavy FFN.
        causal: the default router's form: False (encoder: soft top-k weights) or True (decoder: sigmoid
            weights, router logit trained to predict top-k membership and thresholded at inference).
        router: a ready one-group Router (TokenSelectRouter) instead of the default. activation: of both FFNs.
    """

    def __init__(self, *, d_model: int, light_d_ff: int, heavy_d_ff: int, capacity: float = 0.125,
                 causal: bool = False, router: Router | None = None, activation: str = "gelu",
                 dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.router = (_check_router(router, d_model, "router") if router is not None
                       else colt5_router(d_model=d_model, capacity=capacity, causal=causal))
        self.light = FeedForward(d_model=d_model, d_ff=light_d_ff, activation=activation, dropout=dropout)
        self.heavy = FeedForward(d_model=d_model, d_ff=heavy_d_ff, activation=activation, dropout=dropout)

    selects_tokens = True  # the heavy FFN may get no token in a step

    def routed_parameters(self) -> dict[str, RoutedParameters]:
        return {"router": RoutedParameters(count_parameters(self.heavy))}

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        """x: [batch, seq, d_model] -> (y, LayerInfo with router losses and metrics)."""
        routing = self.router(x, padding_mask)
        flat = x.reshape(-1, self.d_model)
        y = dispatch(flat, routing, lambda g, xs: self.heavy(xs)[0], into=self.light(flat)[0])
        return y.view(x.shape), LayerInfo(aux_losses=routing.aux_losses, metrics=routing.metrics)


class ConditionalAttention(nn.Module):
    """x_i <- A_light(x_i, X) + wq_i * A_heavy(x_i, wkv (.) X_kv) (CoLT5).

    Light: local attention (``window``) with ``light_heads`` heads on every token. Heavy: full
    attention in which the q_capacity fraction of routed queries attend to the kv_capacity fraction
    of routed keys/values; the key/value tokens are scaled by their routing weights before
    projection, so both routers get gradient. Three independent routers in CoLT5 (FFN, queries,
    keys/values); here the query and key/value routers.

    causal=True is the decoder form: local attention looks back only; a routed query attends to
    routed keys at positions <= its own (none: its heavy output is 0); the default routers use
    per-token weights and are thresholded at inference (see TokenSelectRouter).
    q_router, kv_router: ready one-group Routers instead of the defaults (``colt5_router``).
    x: [batch, seq, d_model] -> (y, LayerInfo).
    """

    def __init__(self, *, d_model: int, n_heads: int, max_len: int, causal: bool = False, window: int = 128,
                 light_heads: int | None = None, q_capacity: float = 0.125, kv_capacity: float = 0.25,
                 rope_base: float = 10000.0, dropout: float = 0.0, q_router: Router | None = None,
                 kv_router: Router | None = None):
        super().__init__()
        if d_model % n_heads:
            raise RoutingError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        light_heads = light_heads or max(1, n_heads // 4)
        self.light = LocalAttention(d_model=d_model, n_heads=light_heads, head_dim=self.head_dim, window=window,
                                    causal=causal, max_len=max_len, rope_base=rope_base, dropout=dropout)
        self.q_router = (_check_router(q_router, d_model, "q_router") if q_router is not None
                         else colt5_router(d_model=d_model, capacity=q_capacity, causal=causal))
        self.kv_router = (_check_router(kv_router, d_model, "kv_router") if kv_router is not None
                          else colt5_router(d_model=d_model, capacity=kv_capacity, causal=causal))
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, max_len, rope_base)
        self._causal_mask = causal

    selects_tokens = True  # the heavy branch may get no query or key in a step

    @property
    def causal(self) -> bool:
        return self.q_router.causal and self.kv_router.causal and self._causal_mask

    @property
    def causal_in_training(self) -> bool:
        return self.q_router.causal_in_training and self.kv_router.causal_in_training and self._causal_mask

    @property
    def aux_loss_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.q_router.aux_loss_names + self.kv_router.aux_loss_names))

    def routed_parameters(self) -> dict[str, RoutedParameters]:
        return {"q_router": RoutedParameters(count_parameters(self.q, self.out)),
                "kv_router": RoutedParameters(count_parameters(self.kv))}

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache=None) -> tuple[torch.Tensor, LayerInfo]:
        if positions is not None or cache is not None:
            raise ValueError("ConditionalAttention runs on whole sequences: it cannot sit inside a token-selecting "
                             "block or decode incrementally (Transformer.generate recomputes the context instead)")
        b, t, d = x.shape
        h, hd = self.n_heads, self.head_dim
        light = self.light(x, padding_mask)
        q_routing = self.q_router(x, padding_mask)
        kv_routing = self.kv_router(x, padding_mask)
        info = LayerInfo().add("q_router", LayerInfo(q_routing.aux_losses, q_routing.metrics))
        info.add("kv_router", LayerInfo(kv_routing.aux_losses, kv_routing.metrics))
        qp, kvp = pack_sequences(q_routing, b, t), pack_sequences(kv_routing, b, t)
        if qp.index.shape[1] == 0 or kvp.index.shape[1] == 0:
            return light, info
        # Key/value tokens scaled by their routing weights before projection.
        w_kv = torch.zeros(kvp.valid.shape, dtype=kv_routing.combine_weights.dtype, device=x.device)
        w_kv = w_kv.masked_scatter(kvp.valid, kv_routing.combine_weights)
        x_kv = gather_pack(x, kvp) * w_kv[..., None].to(x.dtype)
        k, v = self.kv(x_kv).view(b, -1, 2, h, hd).permute(2, 0, 3, 1, 4)  # [b, h, m_kv, hd]
        q = self.q(gather_pack(x, qp)).view(b, -1, h, hd).transpose(1, 2)  # [b, h, m_q, hd]
        q, k = self.rotary.apply_at(q, qp.positions), self.rotary.apply_at(k, kvp.positions)
        mask = kvp.valid[:, None, :]  # [b, 1, m_kv]
        if self._causal_mask:
            mask = mask & (kvp.positions[:, None, :] <= qp.positions[:, :, None])
        has_key = mask.any(-1)  # [b, m_q]; a causal query may precede every routed key
        mask = mask | ~has_key[..., None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(b, -1, d)) * has_key[..., None].to(x.dtype)
        heavy = scatter_pack(y, qp, q_routing)
        return light + heavy.view(b, t, d).to(light.dtype), info
