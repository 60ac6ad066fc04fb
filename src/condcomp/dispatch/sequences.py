"""Dispatch for computations that need sequence structure (attention among the selected tokens).

A one-group Routing whose ``token_index`` is ascending (as sequence routers produce) lists, for each
sequence, its selected tokens in position order. ``gather_sequences`` packs them into a
[batch, m, d] tensor (m = most tokens any sequence selected; shorter rows padded and marked
invalid) with their original positions, so a block can run attention among them with the right
rotary positions and causal order. ``dispatch_sequences`` runs a function on that pack and
scatters the results back through the same weighted scatter as ``dispatch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from condcomp.dispatch.grouped import WeightedScatter, size_class
from condcomp.routing.types import Routing


@dataclass
class SequencePack:
    """index: [b, m] flat token index (0 where invalid); positions: [b, m] (0 where invalid);
    valid: [b, m] bool;
    all_valid: True when every row selected m tokens (no padding in the pack)."""

    index: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    all_valid: bool


def pack_sequences(routing: Routing, batch: int, seq: int) -> SequencePack:
    """Arrange a one-group, ascending routing of [batch * seq] tokens by sequence (positions 0..seq-1)."""
    if routing.num_groups != 1:
        raise ValueError(f"sequence dispatch needs a one-group routing, got {routing.num_groups} groups")
    if routing.num_tokens != batch * seq:
        raise ValueError(f"routing made for {routing.num_tokens} tokens, input has {batch}x{seq}")
    idx = routing.token_index
    if routing.tokens_per_sequence is not None:  # m tokens in every row: a reshape, no read-back
        m = routing.tokens_per_sequence
        index = idx.view(batch, m)
        positions = index - torch.arange(batch, device=idx.device)[:, None] * seq
        return SequencePack(index=index, positions=positions, valid=torch.ones_like(index, dtype=torch.bool),
                            all_valid=True)
    row = torch.div(idx, seq, rounding_mode="floor")
    counts = torch.bincount(row, minlength=batch)
    # Rows are padded to the longest row's size class, so the pack's shape repeats across steps
    # (resident memory: grouped.py, "Size classes").
    m = size_class(int(counts.max())) if idx.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(idx.numel(), device=idx.device) - starts[row]
    index = torch.zeros(batch, m, dtype=torch.int64, device=idx.device)
    valid = torch.zeros(batch, m, dtype=torch.bool, device=idx.device)
    index[row, slot] = idx
    valid[row, slot] = True
    positions = torch.where(valid, index - torch.arange(batch, device=idx.device)[:, None] * seq, 0)
    return SequencePack(index=index, positions=positions, valid=valid, all_valid=bool(valid.all()))


SequenceFn = Callable[[torch.Tensor, SequencePack], torch.Tensor]
"""(xs [b, m, d_in], pack) -> ys [b, m, d_out]; rows where pack.valid is False are ignored."""


def gather_pack(x: torch.Tensor, pack: SequencePack) -> torch.Tensor:
    """x [batch, seq, d] -> [batch, m, d]: each sequence's selected tokens (padding rows hold token 0)."""
    b, t, d = x.shape
    return x.reshape(b * t, d).index_select(0, pack.index.reshape(-1)).view(b, -1, d)


def scatter_pack(ys: torch.Tensor, pack: SequencePack, routing: Routing) -> torch.Tensor:
    """ys [batch, m, d] -> [batch * seq, d]: weight * ys added at each selected token, zeros elsewhere."""
    flat = ys.reshape(-1, ys.shape[-1])
    if not pack.all_valid:
        flat = flat[pack.valid.reshape(-1)]  # row-major, slots in order == routing.token_index order
    return WeightedScatter.apply(flat, routing.combine_weights, routing.token_index, routing.num_tokens)


def dispatch_sequences(x: torch.Tensor, routing: Routing, fn: SequenceFn) -> torch.Tensor:
    """y[token] = weight * fn(selected tokens of its sequence)[token]; zeros for unselected tokens.

    x: [batch, seq, d]. Returns [batch * seq, d_out] flattened.
    """
    b, t, d = x.shape
    pack = pack_sequences(routing, b, t)
    if pack.index.shape[1] == 0:
        return x.new_zeros(b * t, d)
    return scatter_pack(fn(gather_pack(x, pack), pack), pack, routing)


def dispatch_sequences_reference(x: torch.Tensor, routing: Routing, fn: SequenceFn) -> torch.Tensor:
    """The same, one sequence at a time with plain indexing (tests only)."""
    b, t, d = x.shape
    out = x.new_zeros(b * t, d)
    idx = routing.token_index
    for row in range(b):
        in_row = (idx // t) == row
        tok = idx[in_row]
        if tok.numel() == 0:
            continue
        pos = tok - row * t
        pack = SequencePack(index=tok[None], positions=pos[None], valid=torch.ones_like(tok, dtype=torch.bool)[None],
                            all_valid=True)
        ys = fn(x[row, pos][None], pack)[0]
        out = out.index_put((tok,), out[tok] + routing.combine_weights[in_row].to(ys.dtype)[:, None] * ys)
    return out
