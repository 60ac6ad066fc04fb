"""A bank of independent feed-forward experts stored as stacked weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.expert_loop import activate, expert_loop
from condcomp.layers.feedforward import ACTIVATIONS


class Experts(nn.Module):
    """e feed-forward experts. ``forward(g, x [m, d_model]) -> [m, d_model]`` runs expert g.

    up:   [e, d_model, d_ff] (GELU) or [e, d_model, 2*d_ff] (SwiGLU: gate and up fused).
    down: [e, d_ff, d_model].
    """

    def __init__(self, *, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.up = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    @classmethod
    def from_weights(cls, up: torch.Tensor, down: torch.Tensor, *, activation: str) -> "Experts":
        """Experts holding the given weights (copied), e.g. a slice of a bigger bank for expert
        parallelism. up: [e, d_model, width], down: [e, d_ff, d_model]. Uses no random numbers."""
        with torch.device("meta"):
            experts = cls(num_experts=up.shape[0], d_model=up.shape[1], d_ff=down.shape[1], activation=activation)
        experts.up = nn.Parameter(up.detach().clone(), requires_grad=up.requires_grad)
        experts.down = nn.Parameter(down.detach().clone(), requires_grad=down.requires_grad)
        return experts

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default for each expert.
        nn.init.uniform_(self.up, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.up[g], self.down[g])

    def groups(self) -> "ExpertGroups":
        """The group function of one dispatch: ``(g, x) -> expert g of x``, and ``grouped`` for all
        experts at once (dispatch's GroupedFn)."""
        return ExpertGroups(self)

    def grouped(self, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor | None:
        """Every expert on its rows in two grouped GEMMs (``torch.nn.functional.grouped_mm``).

        xs: [a, d_model], rows sorted by expert; group_sizes: [e] int64 rows per expert, on xs's
        device (never read on the host). Returns [a, d_model], or None where this PyTorch or device
        has no grouped GEMM for these operands (the caller then loops over experts). Under autocast
        the operands are cast to its dtype, as autocast would cast a matmul.
        """
        dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
        key = (xs.device.type, dtype, tuple(self.up.shape[1:]))
        if _GROUPED_UNSUPPORTED.get(key) or _grouped_mm is None:
            return None
        offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
        with torch.autocast(xs.device.type, enabled=False):
            try:
                h = _grouped_mm(xs.to(dtype), self.up.to(dtype), offs=offsets)
            except (RuntimeError, NotImplementedError):  # e.g. a dtype or an alignment the kernel lacks
                _GROUPED_UNSUPPORTED[key] = True
                return None
            h = activate(h, self.activation)
            return _grouped_mm(h, self.down.to(dtype), offs=offsets)

    def batched(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [e, m, d_model]: m rows for each expert -> [e, m, d_model], as two batched matmuls."""
        return self._run(xs, self.up, self.down)

    def _run(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """x [..., m, d_model] @ up [..., d_model, width] -> activation -> @ down: [..., m, d_model]."""
        return activate(x @ up, self.activation) @ down

    def looped(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """xs [a, d_model], rows sorted by expert, sizes[g] rows for expert g -> [a, d_model]: every
        expert on its rows in one autograd node (``expert_loop``); the same as ``forward`` per run."""
        return expert_loop(xs, self.up, self.down, sizes, self.activation)


class ExpertGroups:
    """One dispatch's view of an expert bank: ``(g, x)`` runs expert g, ``grouped`` runs them all.

    The per-expert weights are split off once (``unbind``). Indexing ``up[g]`` per expert instead
    makes each expert's backward zero-fill and add a gradient the size of the whole bank: e times
    the traffic, 14 ms of a 42 ms EC-DiT step (benchmarks.md, "DiT"). Outputs and gradients are the same.
    """

    def __init__(self, experts: Experts):
        self.experts = experts
        self._split = None

    def __call__(self, g: int, x: torch.Tensor) -> torch.Tensor:
        if self._split is None:
            self._split = (self.experts.up.unbind(0), self.experts.down.unbind(0))
        ups, downs = self._split
        return self.experts._run(x, ups[g], downs[g])

    def grouped(self, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor | None:
        return self.experts.grouped(xs, group_sizes)

    def looped(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return self.experts.looped(xs, sizes)

    def batched(self, xs: torch.Tensor) -> torch.Tensor:
        return self.experts.batched(xs)


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_UNSUPPORTED: dict[tuple, bool] = {}  # (device type, dtype, expert shape) the kernel refused

