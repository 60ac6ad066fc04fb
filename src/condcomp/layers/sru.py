"""SRU (Lei et al., 2017) and SRU++ (Lei, 2021): one matmul for all time steps, then a light
element-wise recurrence (``sru_recurrence``, fused on CPU).

Shapes: x [seq, batch, input_size] (or [batch, seq, input_size] with batch_first);
padding_mask with x's two leading dims, True = real; c0 / c_n [num_layers, batch, hidden * dirs].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.sdpa import attention
from condcomp.layers.sru_recurrence import sru_recurrence


class SRULayer(nn.Module):
    """One SRU layer. ``input_proj`` (when given) replaces the linear input projection: SRU++ passes
    its attention sub-layer here. It is called as input_proj(x [T, B, input_size], real [T, B] or
    None) and must return [T, B, dirs * k * hidden].

    k = 3 (candidate, forget, reset) when input_size == hidden * dirs, so the highway adds the input
    itself, scaled by alpha = sqrt(1 + 2 exp(highway_bias)); otherwise k = 4 and the fourth output is
    the highway's projection of the input.
    """

    owns_init = True  # the model's generic init must leave the paper's initialisation alone

    def __init__(self, input_size: int, hidden_size: int, *, bidirectional: bool = False, layer_norm: bool = False,
                 highway_bias: float = 0.0, input_proj: nn.Module | None = None, fast: bool = True):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.dirs = 2 if bidirectional else 1
        self.k = 3 if input_size == hidden_size * self.dirs else 4
        self.fast = fast
        self.norm = nn.LayerNorm(input_size) if layer_norm else None
        out = self.dirs * self.k * hidden_size
        self.attends = input_proj is not None
        self.input_proj = input_proj if input_proj is not None else nn.Linear(input_size, out, bias=False)
        self.v = nn.Parameter(torch.empty(self.dirs, 2, hidden_size))      # [dirs, (forget, reset), hidden]
        self.b = nn.Parameter(torch.empty(self.dirs, 2, hidden_size))
        self.highway_bias = highway_bias
        self.alpha = math.sqrt(1 + 2 * math.exp(highway_bias)) if self.k == 3 else 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: W ~ U(+-sqrt(3 / d_in)) (for SRU++, each projection of the
        attention sub-layer likewise), v ~ U(+-sqrt(3)) * sqrt(0.5), forget bias 0, reset bias =
        highway_bias."""
        # Unit-variance projections, so the cells start at the scale of the input (also for SRU++'s
        # attention projections: with a small init its cells start near 0 and the layer learns slowly).
        for linear in self.input_proj.modules():
            if isinstance(linear, nn.Linear):
                bound = math.sqrt(3.0 / linear.in_features)
                nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.uniform_(self.v, -math.sqrt(3.0), math.sqrt(3.0))
        with torch.no_grad():
            self.v.mul_(math.sqrt(0.5))
            self.b[:, 0].zero_()
            self.b[:, 1].fill_(self.highway_bias)

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None, real: torch.Tensor | None = None):
        """x: [T, B, input_size]; c0: [B, hidden * dirs]; real: [T, B] bool.
        Returns (h [T, B, hidden * dirs], c_last [B, hidden * dirs])."""
        t, b, _ = x.shape
        hd = self.hidden_size
        inp = self.norm(x) if self.norm is not None else x
        u = (self.input_proj(inp, real) if self.attends else self.input_proj(inp)).view(t, b, self.dirs, self.k, hd)
        if self.k == 3:
            xs = (x * self.alpha).view(t, b, self.dirs, hd)
        else:
            xs = u[:, :, :, 3]
        c0 = x.new_zeros(b, self.dirs * hd) if c0 is None else c0
        if self.dirs == 1:
            return sru_recurrence(u[:, :, 0, :3], xs[:, :, 0], self.v[0], self.b[0], c0, real, fast=self.fast)
        # Both directions in one recurrence: the backward direction's inputs are reversed in time and
        # laid next to the forward ones along the feature axis (padding then comes first and, as
        # padded steps leave the cell alone, the reverse pass starts at each sequence's last token).
        def both(z):  # [T, B, 2, ..., hd] -> [T, B, ..., 2 * hd]
            return torch.cat([z[:, :, 0], z[:, :, 1].flip(0)], -1)

        mask = None
        if real is not None:
            mask = torch.cat([real[..., None].expand(t, b, hd), real.flip(0)[..., None].expand(t, b, hd)], -1)
        vb = (torch.cat([self.v[0], self.v[1]], -1), torch.cat([self.b[0], self.b[1]], -1))  # [2, 2 * hd]
        h, c = sru_recurrence(both(u[:, :, :, :3]), both(xs), *vb, c0, mask, fast=self.fast)
        h = torch.cat([h[..., :hd], h[..., hd:].flip(0)], -1)
        return h, c


class _StackedLayers(nn.Module):
    """Runs ``self.layers`` (SRULayer) in turn; dropout between layers. Subclasses build the layers
    and set batch_first, num_layers, hidden_size, dirs and dropout."""

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None):
        if x.dim() != 3:
            raise ValueError(f"SRU input must be 3-D ([seq, batch, features] or batch_first), got {tuple(x.shape)}")
        if self.batch_first:
            x = x.transpose(0, 1)
            padding_mask = None if padding_mask is None else padding_mask.transpose(0, 1)
        if padding_mask is not None and padding_mask.shape != x.shape[:2]:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} must match the input's leading dims")
        expect = (self.num_layers, x.shape[1], self.hidden_size * self.dirs)
        if c0 is not None and tuple(c0.shape) != expect:
            raise ValueError(f"c0 must have shape [num_layers, batch, hidden * dirs] = {expect}, got {tuple(c0.shape)}")
        cells = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, None if c0 is None else c0[i], padding_mask)
            cells.append(c)
            if self.dropout and self.training and i < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out = x.transpose(0, 1) if self.batch_first else x
        return out, torch.stack(cells)


class SRU(_StackedLayers):
    """Multi-layer SRU (Lei et al., 2017). forward(x, c0=None, padding_mask=None) -> (output, c_n).

    Args:
        input_size, hidden_size: feature sizes; each direction has hidden_size cells.
        num_layers: stacked layers; dropout applies between layers.
        bidirectional: outputs [..., 2 * hidden_size] (forward then backward direction).
        layer_norm: LayerNorm on each layer's input.
        highway_bias: initial reset-gate bias (0 in the SRU paper).
        batch_first: x is [batch, seq, input_size].
        fast: use the fused recurrence (default); False runs the autograd reference.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, *, bidirectional: bool = False,
                 layer_norm: bool = False, highway_bias: float = 0.0, dropout: float = 0.0, batch_first: bool = False,
                 fast: bool = True):
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(f"input_size, hidden_size and num_layers must be >= 1, got {input_size}, {hidden_size}, "
                             f"{num_layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.batch_first, self.num_layers = batch_first, num_layers
        self.hidden_size, self.dirs = hidden_size, 2 if bidirectional else 1
        self.layers = nn.ModuleList(
            SRULayer(input_size if i == 0 else hidden_size * self.dirs, hidden_size, bidirectional=bidirectional,
                     layer_norm=layer_norm, highway_bias=highway_bias, fast=fast) for i in range(num_layers))
        self.dropout = dropout

class SRUppAttention(nn.Module):
    """SRU++'s input projection: z = W1 x (d -> d'), q = z, [k, v] = W2 z,
    u = W3 LayerNorm(alpha * Attention(q, k, v) + z), alpha starting at 0 (so SRU++ starts as a
    low-rank SRU). [T, B, d] -> [T, B, out]. Causal (a language model) unless causal=False."""

    def __init__(self, input_size: int, attn_size: int, out_size: int, *, n_heads: int = 1, causal: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if attn_size % n_heads:
            raise ValueError(f"attn_size {attn_size} must be divisible by n_heads {n_heads}")
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.w1 = nn.Linear(input_size, attn_size, bias=False)
        self.w2 = nn.Linear(attn_size, 2 * attn_size, bias=False)
        self.w3 = nn.Linear(attn_size, out_size, bias=False)
        self.norm = nn.LayerNorm(attn_size)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, B, d]; real: [T, B] bool (True = real token) or None."""
        t, b, _ = x.shape
        z = self.w1(x)                                             # [T, B, d']
        k, v = self.w2(z).chunk(2, -1)

        def heads(y):  # [T, B, d'] -> [B, H, T, d'/H]
            return y.view(t, b, self.n_heads, -1).permute(1, 2, 0, 3)

        mask = None
        if real is not None:
            keys = real.t()[:, None, None, :]                 # [B, 1, 1, T]
            mask = keys & torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if self.causal else keys
            mask = mask | torch.eye(t, dtype=torch.bool, device=x.device)  # padded queries attend to themselves
        a = attention(heads(z), heads(k), heads(v), attn_mask=mask, is_causal=self.causal and mask is None,
                      dropout_p=self.dropout if self.training else 0.0)
        a = a.permute(2, 0, 1, 3).reshape(t, b, -1)
        return self.w3(self.norm(self.alpha * a + z))


class SRUpp(_StackedLayers):
    """SRU++ (Lei, 2021): SRU layers whose input projection is an attention sub-layer, on every
    ``attn_every``-th layer (the others keep the linear projection). Unidirectional.

    forward(x, c0=None, padding_mask=None) -> (output [.., hidden_size], c_n), shapes as SRU's.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, *, attn_size: int | None = None,
                 n_heads: int = 1, attn_every: int = 1, causal: bool = True, highway_bias: float = -2.0,
                 dropout: float = 0.0, batch_first: bool = False, fast: bool = True):
        super().__init__()
        if attn_every < 1:
            raise ValueError(f"attn_every must be >= 1, got {attn_every}")
        attn_size = attn_size or max(n_heads, hidden_size // 4)
        self.batch_first, self.num_layers, self.hidden_size, self.dirs = batch_first, num_layers, hidden_size, 1
        self.dropout = dropout
        layers = []
        for i in range(num_layers):
            d_in = input_size if i == 0 else hidden_size
            k = 3 if d_in == hidden_size else 4
            proj = (SRUppAttention(d_in, attn_size, k * hidden_size, n_heads=n_heads, causal=causal, dropout=dropout)
                    if (i + 1) % attn_every == 0 else None)
            layers.append(SRULayer(d_in, hidden_size, highway_bias=highway_bias, input_proj=proj, fast=fast))
        self.layers = nn.ModuleList(layers)
