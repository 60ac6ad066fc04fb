"""The routing vocabulary every technique shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from condcomp.device import can_read_back


@dataclass
class Routing:
    """Which (token, group) pairs are computed, and with what weight.

    A "group" is whatever runs once on a set of tokens: an expert, a block, a heavy branch.
    Assignments are sorted by group, so the tokens of group g are the contiguous run
    ``token_index[offsets[g] : offsets[g] + group_sizes[g]]`` — the dispatcher's only contract.

    token_index:     [a] int64, indices into the flattened tokens [n] of the layer input.
    group_sizes:     [g] int64, assignments per group; sums to a. No capacity padding is included.
    combine_weights: [a] float, scales each group's output for that token (carries router gradient).
    num_tokens:      n, the number of flattened tokens (real and padded).
    dropped:         [n] bool, real tokens that chose groups but got none (capacity overflow).
    aux_losses:      name -> scalar tensor (load_balance, z_loss, ...), padded tokens excluded.
    metrics:         name -> detached tensor (tokens_per_expert, fraction_dropped, ...).
    group_size:      set when every group has exactly this many assignments (expert choice without
                     padding): dispatch can then run all groups as one batched matmul.
    tokens_per_sequence: set by a one-group sequence router when every sequence selected exactly this
                     many tokens (ascending ``token_index``): sequence dispatch then packs them by a
                     reshape, without reading counts back from the device.
    """

    token_index: torch.Tensor
    group_sizes: torch.Tensor
    combine_weights: torch.Tensor
    num_tokens: int
    dropped: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    group_size: int | None = None
    tokens_per_sequence: int | None = None

    @property
    def num_groups(self) -> int:
        return self.group_sizes.numel()

    def group_of_assignment(self) -> torch.Tensor:
        """[a] int64: the group of each assignment."""
        return torch.repeat_interleave(torch.arange(self.num_groups, device=self.group_sizes.device), self.group_sizes)


class RoutingError(ValueError):
    """Invalid router settings or inputs; the message says what to change."""


def flatten_tokens(x: torch.Tensor, padding_mask: torch.Tensor | None, d_model: int):
    """[batch, seq, d] or [n, d] -> (x [n, d], real [n] bool, position_major_order [n] int64).

    position_major_order lists token indices position by position across the batch
    (all tokens at position 0, then position 1, ...): a priority order in which no token's
    treatment can depend on a token that comes later in its own sequence.
    """
    if x.shape[-1] != d_model:
        raise RoutingError(f"input feature size {x.shape[-1]} does not match the router's d_model={d_model}")
    if x.dim() == 3:
        b, t, _ = x.shape
        order = torch.arange(b * t, device=x.device).view(b, t).t().reshape(-1)
    elif x.dim() == 2:
        order = torch.arange(x.shape[0], device=x.device)
    else:
        raise RoutingError(f"router input must be [batch, seq, d] or [tokens, d], got shape {tuple(x.shape)}")
    flat = x.reshape(-1, d_model)
    if padding_mask is None:
        real = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
    else:
        if padding_mask.shape != x.shape[:-1]:
            raise RoutingError(f"padding_mask shape {tuple(padding_mask.shape)} must equal the input's "
                               f"leading shape {tuple(x.shape[:-1])} (True = real token)")
        real = padding_mask.reshape(-1).to(torch.bool)
    return flat, real, order


def check_finite(scores: torch.Tensor) -> None:
    """Raise if router scores are NaN/inf. Checking the scores (not the [n, d] input) is d/e times
    cheaper, and any NaN or inf in the input reaches them.

    Only where reading back is free (``can_read_back``: CPU): on an accelerator the check would stall
    the forward pass; a NaN there reaches the loss, which the trainer checks once per step (the same
    clean stop)."""
    if not can_read_back(scores):
        return
    if not torch.isfinite(scores).all():
        raise RoutingError("router input contains NaN or inf; check the layers before it (or lower the learning rate)")


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """Routing runs in at least fp32 (bf16 top-k ties and softmax are too coarse), float64 kept."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def count_per_value(values: torch.Tensor, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[bins] int64: how many entries of ``values`` (int64, each in [0, bins)) equal each value, each
    counted ``weights`` times (int or bool, default 1). ``torch.bincount`` without its read-back of
    the maximum to the host (a synchronisation on CUDA)."""
    ones = torch.ones_like(values) if weights is None else weights.to(torch.int64)
    return torch.zeros(bins, dtype=torch.int64, device=values.device).scatter_add_(0, values, ones)
