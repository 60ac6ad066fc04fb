"""SRU's element-wise recurrence over time, with a fused CPU path and a plain reference twin.

For every time step t, with u = [ux, uf, ur] the input projection ([T, batch, 3, d]), v = [v_f, v_r]
and b = [b_f, b_r] ([2, d]):

    f_t = sigmoid(uf_t + v_f * c_{t-1} + b_f)          forget gate
    r_t = sigmoid(ur_t + v_r * c_{t-1} + b_r)          reset (highway) gate
    c_t = f_t * c_{t-1} + (1 - f_t) * ux_t             cell
    h_t = r_t * c_t + (1 - r_t) * xs_t                 output (xs: the highway input, already scaled)

Only c depends on the previous step, and only through f, so the fast path loops over time doing
three element-wise kernels per step (addcmul, sigmoid, lerp) and computes r and h for all steps at
once afterwards. Its backward is written by hand: every gate is recomputed from the saved cells in
one vectorised pass, and the only sequential part left is the linear carry of dL/dc, two kernels per
step. No autograd graph is recorded per step, which is what makes a per-step loop slow. The
gradient of u is written into one [T, batch, 3, d] tensor (no per-slice scatter by autograd), and
intermediates are updated in place where they are not needed again. Both directions work through
the sequence in chunks of CHUNK steps, so each chunk's tensors stay in cache.

On the CPU a compiled kernel (sru_native, built on first use; float32 arithmetic, u read in float32
or bfloat16) runs both directions instead: one pass over time per direction with every gate computed
in registers. NATIVE = "never" selects the PyTorch path above (the benchmark's comparison row and the
fallback).

Padding (real [T, batch] or [T, batch, d] bool, False = padded) leaves the cell unchanged and outputs 0, so a
sequence's final cell is the one after its last real step. The fast path does this by forcing
f = 1 and ux = 0 on padded steps (c = lerp(0, c, 1) = c exactly).
"""

from __future__ import annotations

import torch

from condcomp.layers import sru_native

NATIVE = "auto"
""""auto": the compiled kernel for float32 CPU recurrences when it builds; "never": the PyTorch path."""

CHUNK = 64
"""Time steps per chunk: the vectorised work runs chunk by chunk so that a chunk's tensors
([CHUNK, batch, d]) stay in cache; whole-sequence passes made long sequences memory-bound."""


def _forget_and_reset(u, b, v, c_before, cells, real):
    """Gates of a chunk from the cells before each step: f, r [t, B, d] (f = 1 on padded steps).
    c_before: [B, d], the cell before the chunk's first step; cells: the chunk's cells."""
    f, r = u[:, :, 1] + b[0], u[:, :, 2] + b[1]
    for gate, w in ((f, v[0]), (r, v[1])):
        gate[0].addcmul_(w, c_before)
        gate[1:].addcmul_(w, cells[:-1])
    if real is not None:
        f.masked_fill_(~real, float("inf"))
    return f.sigmoid_(), r.sigmoid_()


def _candidate(u, real):
    """ux with padded steps zeroed (with f = 1 there, c = lerp(0, c, 1) = c exactly)."""
    return u[:, :, 0] if real is None else u[:, :, 0].masked_fill(~real, 0.0)


def _chunks(n: int):
    return [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]


class _SRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, xs, v, b, c0, real):
        cells = torch.empty_like(xs)
        h = torch.empty_like(xs)
        c = c0
        for s, e in _chunks(u.shape[0]):
            uc, rc, before = u[s:e], None if real is None else real[s:e], c
            ux = _candidate(uc, rc)
            pf = uc[:, :, 1] + b[0]
            if rc is not None:
                pf.masked_fill_(~rc, float("inf"))
            for t in range(e - s):
                f = torch.addcmul(pf[t], v[0], c).sigmoid_()
                c = torch.lerp(ux[t], c, f, out=cells[s + t])  # ux + f * (c - ux)
            r = uc[:, :, 2] + b[1]
            r[0].addcmul_(v[1], before)
            r[1:].addcmul_(v[1], cells[s:e - 1])
            torch.lerp(xs[s:e], cells[s:e], r.sigmoid_(), out=h[s:e])
            if rc is not None:
                h[s:e].masked_fill_(~rc, 0.0)
        # Saved: the inputs (the projection already exists) and the cells; gates are recomputed.
        ctx.save_for_backward(u, xs, v, b, c0, real, cells)
        return h, cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_h, grad_c_last):
        u, xs, v, b, c0, real, cells = ctx.saved_tensors
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        d_xs = torch.empty_like(xs)
        dv = torch.zeros_like(v)
        carry = grad_c_last if grad_c_last is not None else torch.zeros_like(c0)
        for s, e in reversed(_chunks(u.shape[0])):
            uc, cc, rc = u[s:e], cells[s:e], None if real is None else real[s:e]
            before = c0 if s == 0 else cells[s - 1]
            f, r = _forget_and_reset(uc, b, v, before, cc, rc)
            gh = grad_h[s:e] if rc is None else grad_h[s:e].masked_fill(~rc, 0.0)
            d_ux, d_fpre, d_rpre = du[s:e, :, 0], du[s:e, :, 1], du[s:e, :, 2]
            # reset gate: h = xs + r (c - xs)
            torch.sub(cc, xs[s:e], out=d_rpre).mul_(gh)
            one_minus = torch.rsub(r, 1)
            torch.mul(gh, one_minus, out=d_xs[s:e])
            d_rpre.mul_(one_minus.mul_(r))                  # dL/d(reset pre-activation)
            from_h = r.mul_(gh)                             # dL/dc_t through h_t
            from_r = torch.mul(d_rpre, v[1], out=one_minus)  # dL/dc_{t-1} through r_t
            # forget gate: c_t = ux + f (c_{t-1} - ux)
            ux = _candidate(uc, rc)
            slope = torch.empty_like(cc)                    # d c_t / d(forget pre-activation)
            torch.sub(before, ux[0], out=slope[0])
            torch.sub(cc[:-1], ux[1:], out=slope[1:])
            d_ux.fill_(1).sub_(f)                           # holds 1 - f until the end
            slope.mul_(f).mul_(d_ux)
            through = f.addcmul_(slope, v[0])               # d c_t / d c_{t-1}
            d_cells = torch.empty_like(cc)
            for t in range(e - s - 1, -1, -1):
                dc = torch.add(carry, from_h[t], out=d_cells[t])
                carry = torch.addcmul(from_r[t], dc, through[t])
            torch.mul(d_cells, slope, out=d_fpre)
            d_ux.mul_(d_cells)
            # recurrent weights: sum over steps and batch of dL/d(pre-activation) * c_{t-1}
            for i, d_pre in ((0, d_fpre), (1, d_rpre)):
                prod = torch.mul(d_pre[1:], cc[:-1], out=d_cells[1:])
                dv[i] += prod.sum((0, 1)) + (d_pre[0] * before).sum(0)
        return du, d_xs, dv, du[:, :, 1:].sum((0, 1)), carry, None


class _NativeSRURecurrence(torch.autograd.Function):
    """The same function as _SRURecurrence, computed by the compiled kernel (float32 arithmetic on the
    CPU; u may be bfloat16, and its gradient is then bfloat16)."""

    @staticmethod
    def forward(ctx, u, xs, v, b, c0, real):
        h, cells = sru_native.forward(u, xs, v, b, c0, real)
        ctx.save_for_backward(u, xs, v, b, c0, real, cells)
        return h, cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_h, grad_c_last):
        u, xs, v, b, c0, real, cells = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(xs)
        du, d_xs, dv, db, dc0 = sru_native.backward(u, xs, v, b, c0, real, cells, grad_h, grad_c_last)
        return du, d_xs, dv, db, dc0, None


def _use_native(u) -> bool:
    return NATIVE != "never" and sru_native.applies(u) and sru_native.kernel() is not None


def sru_recurrence(u, xs, v, b, c0, real=None, *, fast: bool = True):
    """Run the recurrence.

    u: [T, batch, 3, d] (candidate, forget and reset pre-activations; a view is fine).
    xs: [T, batch, d] highway input. v, b: [2, d] recurrent weights and biases (forget, reset).
    c0: [batch, d]. real: [T, batch] or [T, batch, d] bool (False = padded) or None.
    Returns (h [T, batch, d], c_last [batch, d]) in float32 (float64 if u is): the recurrence never
    runs in bf16, whose rounding would compound over time steps (a bf16 u is only read in bf16).
    """
    if real is not None:
        real = real.to(torch.bool)
        if real.dim() == 2:
            real = real[..., None]
    if fast and _use_native(u):
        # The kernel reads a bfloat16 u as is (no float32 copy) and computes in float32.
        with torch.autocast(u.device.type, enabled=False):
            return _NativeSRURecurrence.apply(u, *(a.float() for a in (xs, v, b, c0)), real)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, xs, v, b, c0 = (a.to(dtype) for a in (u, xs, v, b, c0))
    with torch.autocast(u.device.type, enabled=False):
        if fast:
            return _SRURecurrence.apply(u, xs, v, b, c0, real)
        return sru_recurrence_reference(u, xs, v, b, c0, real)


def sru_recurrence_reference(u, xs, v, b, c0, real=None):
    """The same recurrence step by step, differentiated by autograd (the reference twin).
    real: [T, batch, 1] or [T, batch, d] bool or None."""
    c, outputs = c0, []
    for t in range(u.shape[0]):
        f = torch.sigmoid(u[t, :, 1] + v[0] * c + b[0])
        r = torch.sigmoid(u[t, :, 2] + v[1] * c + b[1])
        c_new = f * c + (1 - f) * u[t, :, 0]
        h = r * c_new + (1 - r) * xs[t]
        if real is not None:
            keep = real[t]
            c_new = torch.where(keep, c_new, c)
            h = torch.where(keep, h, torch.zeros_like(h))
        c = c_new
        outputs.append(h)
    return torch.stack(outputs), c
