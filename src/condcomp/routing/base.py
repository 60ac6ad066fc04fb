"""The Router base: the steps every router shares, so each router writes only its selection.

    class MyRouter(Router):
        causal = True                       # inference decisions never read later positions
        def select(self, logits, tokens):   # logits [n, outputs] fp32; tokens: RouterTokens
            ...                             # -> Routing

``Router.forward(x, padding_mask)`` flattens x to tokens, marks padding, computes the scores in at
least fp32 with autocast off (bf16 top-k ties and softmax are too coarse), applies multiplicative
jitter in training, refuses NaN/inf scores, and calls ``select`` — still with autocast off, so
softmax, top-k and any small predictor run in full precision too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from condcomp.routing.types import Routing, RoutingError, check_finite, flatten_tokens, router_dtype


@dataclass
class RouterTokens:
    """What ``select`` knows about the tokens besides their scores.

    hidden: [n, d] the router input in routing precision (fp32, or float64 when the input is).
    real:   [n] bool, False for padding.
    order:  [n] int64, token indices position by position across the batch (all position-0 tokens,
            then position 1, ...): a priority in which no token depends on a later position.
    shape:  the input's leading shape, (batch, seq) or (n,).
    all_real: True when no padding mask was given (every token is real): known without reading
            ``real``, so a router can pick fixed-size outputs with no host-device synchronisation.
    """

    hidden: torch.Tensor
    real: torch.Tensor
    order: torch.Tensor
    shape: tuple[int, ...]
    all_real: bool = False

    @property
    def num_tokens(self) -> int:
        return self.real.numel()


class Router(nn.Module):
    """Scores -> Routing. Subclasses set ``self.gate`` (an nn.Linear from d_model to their score
    width) or override ``scores``, and implement ``select``.

    Class attributes (read by models, tests and ``condcomp techniques``):
        causal:             at inference (``eval()``), no decision depends on a later position of any
                            sequence. A decoder refuses to build with a router that is not.
        causal_in_training: the same in training mode. False for routers whose training selection is a
                            top-k over the whole sequence (the mixture-of-depths scheme): a known, small
                            leak during training that inference never has. Defaults to ``causal``.
    Subclasses whose causality depends on their settings make these properties.
    Tests perturb only the future and check both declarations against what the model does.

    Args:
        d_model: input feature size.
        jitter: multiplicative input noise U(1 - jitter, 1 + jitter) in training (Switch); 0 = off.
    """

    causal: bool = True
    # Names of the aux losses its Routing carries (the trainer checks each has a weight).
    aux_loss_names: tuple[str, ...] = ()

    def __init__(self, *, d_model: int, jitter: float = 0.0):
        super().__init__()
        if d_model < 1:
            raise RoutingError(f"d_model must be >= 1, got {d_model}")
        if not 0 <= jitter < 1:
            raise RoutingError(f"jitter must be in [0, 1), got {jitter}")
        self.d_model = d_model
        self.jitter = jitter

    @property
    def causal_in_training(self) -> bool:
        return self.causal

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, d] (routing precision) -> scores [n, outputs]: the gate's linear map."""
        logits = hidden @ self.gate.weight.to(hidden.dtype).t()
        return logits if self.gate.bias is None else logits + self.gate.bias.to(hidden.dtype)

    def select(self, logits: torch.Tensor, tokens: RouterTokens) -> Routing:
        """logits [n, outputs] in routing precision -> Routing. The one method a router must write."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Routing:
        """x: [batch, seq, d_model] or [n, d_model]; padding_mask: x's leading shape, True = real token."""
        flat, real, order = flatten_tokens(x, padding_mask, self.d_model)
        with torch.autocast(flat.device.type, enabled=False):
            h = flat.to(router_dtype(flat))
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = self.scores(h)
            check_finite(logits)
            return self.select(logits, RouterTokens(hidden=h, real=real, order=order, shape=tuple(x.shape[:-1]),
                                                    all_real=padding_mask is None))
