"""SPLA: exact softmax attention on the key blocks that matter, linear attention on the rest
(Wang, Friedman, Lei, Wang, 2026); its block-sparse baseline (no residual); and pure causal linear
attention, all on the projections and rotary positions of ``Attention`` (so a dense model's weights
load unchanged).

One query block of ``block`` positions reads, exactly, its own block (causal inside) and the top-k
completed past blocks chosen by ``routing.block_select`` (scored by the previous block's queries,
so the choice never reads the future). Every other completed past block is covered by linear
attention with the positive feature map phi(x) = elu(x) + 1, computed from block states
S_j = phi(K_j)^T V_j and z_j = sum phi(K_j) as

    R_i = sum_{j < i} S_j - sum_{j selected} S_j        (numerator state; z likewise, separately)

so unselected keys are never read. States accumulate in fp32.

One normaliser. The linear kernel stands in for the exponential of the unselected keys' logits:
a key's weight is exp(q.k / sqrt(d)) if it is read exactly and alpha_h phi(q).phi(k) if not, and

    y = (sum_exact e^{s} v + alpha_h phi(q)^T R_i) / (sum_exact e^{s} + alpha_h phi(q)^T z_i)

computed stably by scaling both sums by e^{-m} (m the row's largest exact logit; it cancels). The
learned per-head alpha_h (initialised 1 / head_dim, so the kernel starts near e^0 = 1 for small
logits; fitted to the data by ``calibrate`` when pretrained weights are loaded) calibrates the
kernel against the exponential. With every past block selected R = 0 and
the output is dense causal attention. One normaliser keeps the output a convex combination of
values, unlike adding two separately normalised outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from condcomp.layers.attention import Attention
from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache
from condcomp.routing.block_select import block_summaries, log_block_mass, select_past_blocks, top_blocks

SELECTIONS = {"second_order": 2, "first_order": 1}
RESIDUALS = ("linear", "none")
MODES = ("sparse", "linear")


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _rows(x: torch.Tensor, groups: int, n_blocks: int, block: int) -> torch.Tensor:
    """[b, h, T, hd] -> [b, g, nb, r*block, hd]: a query block's rows are every head of the key/value
    group (r = h / g) at every position of the block, head-major."""
    b, h, _, hd = x.shape
    r = h // groups
    return x.view(b, groups, r, n_blocks, block, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, groups, n_blocks, r * block, hd)


def _unrows(y: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """The inverse of ``_rows``: [b, g, nb, r*block, hd] -> [b, h, nb*block, hd]."""
    b, g, nb, rows, hd = y.shape
    r = heads // g
    block = rows // r
    return y.view(b, g, nb, r, block, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, heads, nb * block, hd)[:, :, :length]


# A masked key gets this added to its logit through an extra coordinate: exp underflows to exactly
# 0, and, unlike -inf, a row whose keys are all masked (a padded query) stays finite.
MASKED_LOGIT = -1.0e4
# Without gradients, or with recompute, the exact part runs on chunks of query blocks holding about
# this many gathered key numbers (8 MiB in fp32): the gathered blocks never all exist at once.
CHUNK_ELEMENTS = 1 << 21


def _pad_to_blocks(q, k, v, real, block: int):
    """Pad the length of q [b, h, t, hd], k, v [b, g, t, hd] and real [b, t] (None: all real) up to
    a multiple of ``block``; padded positions are not real. Returns (n_blocks, q, k, v, real)."""
    t = q.shape[2]
    nb = -(-t // block)
    pad = nb * block - t
    real = torch.ones(q.shape[0], t, dtype=torch.bool, device=q.device) if real is None else real.bool()
    if pad:
        q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
        real = F.pad(real, (0, pad), value=False)
    return nb, q, k, v, real


def sparse_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None, *,
                            block: int, top_k: int, order: int = 2, log_alpha: torch.Tensor | None = None,
                            selection: tuple[torch.Tensor, torch.Tensor] | None = None,
                            recompute: bool = False) -> torch.Tensor:
    """Causal SPLA over whole sequences (the module docstring); ``log_alpha=None`` drops the residual
    (block-sparse attention).

    q: [b, h, t, hd]; k, v: [b, g, t, hd] (g divides h; rotary applied); real: [b, t] bool or None.
    selection: (index, valid) [b, g, nb, top_k] to use instead of choosing (tests). recompute:
    keep activation memory O(t hd) like a fused dense kernel, at the price of gathering and running
    the exact part twice in training. Returns [b, h, t, hd]. The length is padded up to a multiple
    of ``block`` with masked keys.

    How it runs: one fused SDPA call does the exact part and the combination. Each query block is a
    batch entry whose keys are its chosen blocks followed by its own block, gathered in one copy, so
    the kernel sees a small [B, keys] lower-right causal mask, never a [t, t] one. Every block is
    stored with one extra slot in front, the "linear key", and keys and queries get two extra
    coordinates:
      - a masked key (padding; the all-masked block that unused choice slots point at) has
        MASKED_LOGIT / scale in the last coordinate, which every query multiplies by 1;
      - a linear key is [0, 1, 0] with value [0, 1] (a marker channel), and a query row carries
        (log(alpha phi(q).z_R) - log n) / scale in that coordinate, n being the number of linear
        keys it reads (one per gathered block), so together they hold exactly the residual's mass.
    The kernel's softmax then gives, per row, the exact keys' share of the one normaliser times
    their values, and the residual's share in the marker channel:
    y = exact + share * (phi(q).R / phi(q).z_R).
    """
    b, h, t, hd = q.shape
    g = k.shape[1]
    r = h // g
    nb, q, k, v, real = _pad_to_blocks(q, k, v, real, block)
    scale = hd ** -0.5
    kb, vb = k.view(b, g, nb, block, hd), v.view(b, g, nb, block, hd)
    key_real = real.view(b, 1, nb, block)
    index, valid = _choose_blocks(q, kb, key_real, top_k, order) if selection is None else selection
    n_sel = index.shape[-1]
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype

    # Blocks with their linear-key slot: [b, g, nb + 1, 1 + B, hd + 2]; block nb is all masked.
    keys = kb.new_zeros(b, g, nb + 1, 1 + block, hd + 2, dtype=dtype)
    keys[:, :, :nb, 1:, :hd] = kb
    keys[:, :, :nb, 1:, hd + 1] = (~key_real).to(dtype) * (MASKED_LOGIT / scale)
    keys[:, :, :, 0, hd] = 1.0
    keys[:, :, nb, :, hd + 1] = MASKED_LOGIT / scale
    values = vb.new_zeros(b, g, nb + 1, 1 + block, hd + 2, dtype=dtype)  # one head size for the fused kernel
    values[:, :, :nb, 1:, :hd] = vb
    values[:, :, :, 0, hd] = 1.0
    own = torch.arange(nb, device=q.device).expand(b, g, nb)[..., None]
    gather = torch.cat([torch.where(valid, index, nb), own], dim=-1)  # [b, g, nb, k + 1]: chosen, then own
    n_keys = (n_sel + 1) * (1 + block)
    # index_select on a flat block axis: its backward is index_add_, far faster on CPU than the
    # accumulating index_put_ that advanced indexing's backward runs.
    rows = (gather + torch.arange(b * g, device=q.device).view(b, g, 1, 1) * (nb + 1)).view(b * g * nb, n_sel + 1)
    keys = keys.view(b * g * (nb + 1), 1 + block, hd + 2)
    values = values.view(b * g * (nb + 1), 1 + block, hd + 2)

    qb = q.view(b, g, r, nb, block, hd).transpose(2, 3)  # [b, g, nb, r, B, hd]
    if log_alpha is None:
        slot_logit = qb.new_full((*qb.shape[:-1], 1), MASKED_LOGIT)
    else:
        lin_num, lin_den = linear_residual(q, kb, vb, key_real, index, valid)  # [b, g, nb, r, B, hd | 1]
        n_linear = (valid.sum(-1) + 1).to(lin_den.dtype)[:, :, :, None, None, None]  # linear keys each row reads
        slot_logit = (log_alpha.view(1, g, 1, r, 1, 1) + torch.log(lin_den.clamp(min=1e-30))
                      - torch.log(n_linear)).clamp(min=MASKED_LOGIT)
    qx = torch.cat([qb.to(dtype), (slot_logit / scale).to(dtype), qb.new_ones(*qb.shape[:-1], 1, dtype=dtype)], -1)
    visible = torch.ones(block, n_keys, dtype=torch.bool, device=q.device)
    visible[:, n_keys - block :] = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    qx = qx.view(b * g * nb, r, block, hd + 2)
    n_entries = b * g * nb
    # Query blocks in chunks of about CHUNK_ELEMENTS gathered key numbers when nothing is kept for a
    # backward (inference) or with ``recompute`` (each chunk's gathered keys are dropped after the
    # forward and gathered again in the backward); in one piece otherwise (fastest training).
    chunked = recompute or not torch.is_grad_enabled()
    step = max(1, CHUNK_ELEMENTS // (n_keys * (hd + 2))) if chunked else n_entries
    outs = []
    for start in range(0, n_entries, step):
        part = (qx[start : start + step], keys, values, rows[start : start + step], visible, scale, r)
        if recompute and torch.is_grad_enabled():
            outs.append(checkpoint(_exact_attention, *part, use_reentrant=False))
        else:
            outs.append(_exact_attention(*part))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(b, g, nb, r, block, hd + 2)
    y = out[..., :hd]
    if log_alpha is not None:
        share = _fp32(out[..., hd : hd + 1])
        y = _fp32(y) + share * (lin_num / lin_den.clamp(min=1e-30))
    return y.permute(0, 1, 3, 2, 4, 5).reshape(b, h, nb * block, hd)[:, :, :t].to(q.dtype)


def _choose_blocks(q, kb, key_real, top_k: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block's top-k completed past key blocks: q [b, h, T, hd] (T = nb * B, rotated);
    kb [b, g, nb, B, hd]; key_real [b, 1, nb, B]. Returns (index, valid) [b, g, nb, top_k]."""
    b, g, nb, block, hd = kb.shape
    r = q.shape[1] // g
    with torch.autocast(q.device.type, enabled=False):
        row_real = key_real[:, :, :, None, :].expand(b, 1, nb, r, block).reshape(b, 1, nb, r * block)
        return select_past_blocks(_fp32(_rows(q, g, nb, block)), row_real, _fp32(kb) * hd ** -0.5, key_real,
                                  top_k, order)


def unread_blocks(index: torch.Tensor, valid: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """unread[..., i, j] = 1 for the completed past blocks j < i that query block i did not choose:
    the blocks its linear residual covers. index, valid: [..., n_blocks, k] -> [..., n_blocks, n_blocks]."""
    lead = index.shape[:-2]
    unread = torch.ones(n_blocks, n_blocks + 1, device=index.device).tril(-1).expand(*lead, n_blocks, n_blocks + 1)
    return unread.clone().scatter_(-1, torch.where(valid, index, n_blocks), 0.0)[..., :n_blocks]


# Candidate offsets (natural log) from the mass-matched alpha that ``fit_log_alpha`` tries, and the
# value it reports when dropping the residual fits best (alpha ~ 0: block-sparse attention).
ALPHA_OFFSETS = torch.arange(-24.0, 4.01, 0.5)
NO_RESIDUAL = -60.0


def _read_and_unread(q, k, real, block: int, top_k: int, order: int):
    """Masks [b, g, T, T] of the keys each query reads exactly (own block causally, chosen blocks) and
    of those the residual stands in for (unread completed past blocks), real keys of real queries only;
    with q, k padded to T = nb * block and cast to fp32."""
    b, h, t, hd = q.shape
    g = k.shape[1]
    nb, q, k, _, real = _pad_to_blocks(q, k, k, real, block)
    q, k = _fp32(q), _fp32(k)
    index, valid = _choose_blocks(q, k.view(b, g, nb, block, hd), real.view(b, 1, nb, block), top_k, order)
    unread_b = unread_blocks(index, valid, nb).bool()
    read_b = ~unread_b & torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()  # own and chosen blocks
    both = real[:, None, None, :] & real[:, None, :, None]
    expand = lambda m: m.repeat_interleave(block, -2).repeat_interleave(block, -1) & both  # noqa: E731
    causal = torch.ones(nb * block, nb * block, dtype=torch.bool, device=q.device).tril()
    return q, k, expand(read_b) & causal, expand(unread_b), real


def mass_matched_log_alpha(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor | None, *, block: int, top_k: int,
                           order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head log alpha at which the linear kernel carries the softmax's mass on the keys SPLA
    leaves unread: for each real query row with unread keys U,

        d = log sum_{s in U} exp(q.k_s / sqrt(hd)) - log sum_{s in U} phi(q).phi(k_s)

    and log alpha_h is the mean of d over the head's rows (the geometric mean of the mass ratio).
    Brute force over [T, T] per head (a one-off on a calibration batch, fp32).

    q: [b, h, t, hd]; k: [b, g, t, hd] (rotated); real: [b, t] or None. Returns (log_alpha [h], rows
    [h]: how many query rows had unread keys; a head with 0 rows has log_alpha nan).
    """
    q, k, _, unread, _ = _read_and_unread(q, k, real, block, top_k, order)
    return _mass_matched(q, k, unread)


def _mass_matched(q, k, unread) -> tuple[torch.Tensor, torch.Tensor]:
    """``mass_matched_log_alpha`` on padded fp32 q, k and the unread mask of ``_read_and_unread``."""
    h, hd = q.shape[1], q.shape[-1]
    r = h // k.shape[1]
    log_alpha, rows = q.new_full((h,), float("nan")), torch.zeros(h, dtype=torch.int64)
    for head in range(h):
        qh, kh, mask = q[:, head], k[:, head // r], unread[:, head // r]  # [b, T, hd], [b, T, hd], [b, T, T]
        has = mask.any(-1)
        if not has.any():
            continue
        exact = (qh @ kh.transpose(-1, -2) * hd ** -0.5).masked_fill(~mask, float("-inf")).logsumexp(-1)
        linear = ((feature_map(qh) @ feature_map(kh).transpose(-1, -2)) * mask).sum(-1)
        log_alpha[head] = (exact - torch.log(linear.clamp(min=1e-30)))[has].mean()
        rows[head] = int(has.sum())
    return log_alpha, rows


def fit_log_alpha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None, *, block: int,
                  top_k: int, order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head log alpha whose SPLA output is closest to dense causal attention on this input.

    Matching the mass (``mass_matched_log_alpha``) is right for the normaliser but not for the
    output: the linear kernel spreads its weight almost evenly over the unread keys, so its values
    average is a poor stand-in for what a peaked softmax reads there, and a residual carrying all of
    that mass pulls outputs towards the mean value. Per row the SPLA output is

        y(alpha) = (E_v + alpha e^{-m} L_v) / (E + alpha e^{-m} L)

    (E: exact mass and values sum over the keys read; L: the kernel's over the unread ones; m the row
    max), so every candidate costs O(T hd) once the [T, T] sums exist. Tried: the mass-matched value
    plus ``ALPHA_OFFSETS``, and no residual (reported as ``NO_RESIDUAL``); the one with the least
    squared error against the dense output over the rows with unread keys wins.

    q: [b, h, t, hd]; k, v: [b, g, t, hd] (rotated); real: [b, t] or None. Returns (log_alpha [h],
    rows [h]); a head with no rows with unread keys has log_alpha nan.
    """
    b, h, t, hd = q.shape
    r = h // k.shape[1]
    _, _, _, vp, _ = _pad_to_blocks(q, k, v, real, block)
    vp = _fp32(vp)
    q, k, read, unread, real = _read_and_unread(q, k, real, block, top_k, order)
    centre, rows = _mass_matched(q, k, unread)
    log_alpha = q.new_full((h,), float("nan"))
    for head in range(h):
        if rows[head] == 0:
            continue
        qh, kh, vh = q[:, head], k[:, head // r], vp[:, head // r]
        rd, un = read[:, head // r], unread[:, head // r]
        logits = (qh @ kh.transpose(-1, -2)) * hd ** -0.5
        m = logits.masked_fill(~(rd | un), float("-inf")).amax(-1, keepdim=True).clamp(min=-1e4)  # [b, T, 1]
        p = torch.exp(logits - m)
        exact_w, unread_w = p * rd, p * un
        kernel = (feature_map(qh) @ feature_map(kh).transpose(-1, -2)) * un
        e_v, e = exact_w @ vh, exact_w.sum(-1, keepdim=True)
        target = (e_v + unread_w @ vh) / (e + unread_w.sum(-1, keepdim=True)).clamp(min=1e-30)
        l_v, l = kernel @ vh, kernel.sum(-1, keepdim=True)
        has = un.any(-1)
        candidates = torch.cat([centre[head] + ALPHA_OFFSETS.to(q.dtype), q.new_tensor([NO_RESIDUAL])])
        errors = []
        for a in candidates:
            c = torch.exp((a - m).clamp(max=80.0))
            y = (e_v + c * l_v) / (e + c * l).clamp(min=1e-30)
            errors.append(((y - target) ** 2).sum(-1)[has].mean())
        log_alpha[head] = candidates[int(torch.stack(errors).argmin())]
    return log_alpha, rows


def _exact_attention(qx, keys, values, rows, visible, scale, r):
    """One chunk of query blocks: gather each one's blocks (rows [n, k + 1]) and attend.
    qx [n, r, B, hd + 2]; keys, values [blocks, 1 + B, hd + 2] -> [n, r, B, hd + 2]."""
    n = rows.shape[0]
    keys = keys.index_select(0, rows.reshape(-1)).view(n, 1, -1, keys.shape[-1])
    values = values.index_select(0, rows.reshape(-1)).view(n, 1, -1, values.shape[-1])
    return F.scaled_dot_product_attention(qx, keys, values, attn_mask=visible, scale=scale, enable_gqa=r > 1)


def linear_residual(q, kb, vb, key_real, index, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention of every query over the completed past blocks its block did not choose, from
    per-block states in fp32 (prefix minus chosen): unchosen keys are never read.

    q: [b, h, T, hd] (T = nb * B); kb, vb: [b, g, nb, B, hd]; key_real: [b, 1, nb, B]; index, valid:
    [b, g, nb, k]. Returns (numerator [b, g, nb, r, B, hd], normaliser [b, g, nb, r, B, 1]).
    """
    b, g, nb, block, hd = kb.shape
    r = q.shape[1] // g
    with torch.autocast(q.device.type, enabled=False):
        phi_k = feature_map(_fp32(kb)) * key_real[..., None]  # [b, g, nb, B, hd]
        states = phi_k.transpose(-1, -2) @ _fp32(vb)  # [b, g, nb, hd, hd]
        sums = phi_k.sum(-2)  # [b, g, nb, hd]
        # The residual state is prefix minus chosen, summed as one matrix product with the unread
        # blocks (no cancellation, no [.., k, hd, hd] copy).
        unread = unread_blocks(index, valid, nb).to(states.dtype)
        residual = (unread @ states.reshape(b, g, nb, hd * hd)).view(b, g, nb, hd, hd)
        residual_sum = unread @ sums
        phi_q = feature_map(_fp32(q)).view(b, g, r, nb, block, hd).transpose(2, 3)  # [b, g, nb, r, B, hd]
        num = phi_q @ residual[:, :, :, None]
        # Subtraction can leave -1e-16 where nothing remains; the mass is >= 0 by construction.
        den = (phi_q * residual_sum[:, :, :, None, None, :]).sum(-1, keepdim=True).clamp(min=0)
        return num, den


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None, *,
                            block: int) -> torch.Tensor:
    """Pure causal linear attention, phi = elu + 1, in chunks of ``block``: exact kernel sums inside
    a block, prefix states across blocks (fp32). Shapes as ``sparse_linear_attention``."""
    b, h, t, hd = q.shape
    g = k.shape[1]
    r = h // g
    nb, q, k, v, real = _pad_to_blocks(q, k, v, real, block)
    with torch.autocast(q.device.type, enabled=False):
        key_real = real.view(b, 1, nb, block)
        phi_q = feature_map(_fp32(_rows(q, g, nb, block)))  # [b, g, nb, rB, hd]
        phi_k = feature_map(_fp32(k.view(b, g, nb, block, hd))) * key_real[..., None]
        vb = _fp32(v.view(b, g, nb, block, hd))
        pos = torch.arange(block, device=q.device)
        own_causal = (pos[None, :] <= pos[:, None]).repeat(r, 1).to(phi_q.dtype)  # [rB, B]
        kernel = (phi_q @ phi_k.transpose(-1, -2)) * own_causal
        states = phi_k.transpose(-1, -2) @ vb
        sums = phi_k.sum(-2)
        num = kernel @ vb + phi_q @ (states.cumsum(2) - states)
        den = kernel.sum(-1, keepdim=True) + (phi_q * (sums.cumsum(2) - sums)[:, :, :, None, :]).sum(-1, keepdim=True)
        row_real = key_real[:, :, :, None, :].expand(b, 1, nb, r, block).reshape(b, 1, nb, r * block, 1)
        den = den + (~row_real).to(den.dtype)  # a padded row with nothing to read divides by 1, not 0
        return _unrows(num / den, h, t).to(q.dtype)


class SparseAttentionCache:
    """What SPLA keeps to decode one token in O(k * block + head_dim^2), not O(tokens read so far).

    keys/values of every token (``kv``: the chosen blocks are read exactly); per completed block its
    key summary (mean, var, count) for choosing; the fp32 linear-attention prefix state and sum over
    completed blocks; the current block's choice (index, valid) and residual state and sum; and the
    current block's queries, which choose the next block's keys when it completes. Uniform only:
    every sequence of the batch at the same position.
    """

    uniform = True

    def __init__(self) -> None:
        self.kv = KVCache()
        self.size = 0
        self.mean = self.var = self.count = None  # [b, g, n_completed, hd], count [b, g, n_completed]
        self.prefix = self.prefix_sum = None  # [b, g, hd, hd], [b, g, hd]
        self.index = self.valid = None  # [b, g, k]
        self.residual = self.residual_sum = None
        self.queries = None  # [b, g, r, filled, hd]


class SparseLinearAttention(Attention):
    """Causal sparse attention over key blocks, with (SPLA) or without (block-sparse) the linear
    residual; or, with ``mode="linear"``, pure causal linear attention. Same interface, projections
    and parameters as ``Attention`` plus ``log_alpha`` [n_heads] when the residual is on.

    x: [batch, seq, d_model] -> (y [batch, seq, d_model], LayerInfo()). padding_mask [b, t] (True =
    real): padded keys are never read, exactly or linearly. Decoding with a cache costs
    O(top_k * block * head_dim + head_dim^2) per token.

    Args (besides Attention's): block: block size B (the length is padded up to a multiple);
    top_k: completed past blocks read exactly per query block (k larger than the number of past
    blocks takes all); selection: "second_order" (mean and diagonal variance of the keys) or
    "first_order" (mean key only); residual: "linear" or "none"; mode: "sparse" or "linear";
    recompute: gather the chosen blocks again in the backward instead of keeping them (activation
    memory O(t hd) instead of O(t k B hd / B), about 30% more time in training).
    """

    supports_cache = True
    # Weights a dense attention has no counterpart for: they keep their initialisation when a
    # pretrained dense model's weights are loaded (condcomp.convert.hf.load_dense_state).
    added_parameters = ("log_alpha",)

    def __init__(self, *, d_model: int, n_heads: int, max_len: int, block: int = 64, top_k: int = 8,
                 selection: str = "second_order", residual: str = "linear", mode: str = "sparse",
                 recompute: bool = False, rope_base: float = 10000.0, dropout: float = 0.0, n_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, out_bias: bool = False, rope: dict | None = None):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {tuple(SELECTIONS)}, got {selection!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dropout:
            raise ValueError("sparse and linear attention have no attention dropout; set dropout: 0")
        super().__init__(d_model=d_model, n_heads=n_heads, max_len=max_len, causal=True, rope_base=rope_base,
                         n_kv_heads=n_kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias, rope=rope)
        self.block, self.top_k, self.selection, self.residual, self.mode = block, top_k, selection, residual, mode
        self.recompute = recompute
        self.log_alpha = None
        if mode == "sparse" and residual == "linear":
            self.log_alpha = nn.Parameter(torch.full((n_heads,), -math.log(self.head_dim)))

    def new_cache(self) -> SparseAttentionCache:
        return SparseAttentionCache()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: SparseAttentionCache | None = None):
        if positions is not None:
            raise ValueError(f"{type(self).__name__} reads whole sequences in blocks: it cannot run on tokens gathered "
                             "from a longer sequence (block: mod) or decode a padded batch; use a dense attention there")
        if cache is not None and padding_mask is not None:
            raise ValueError("decoding with sparse/linear attention needs an unpadded batch")
        if cache is not None and not isinstance(cache, SparseAttentionCache):
            raise TypeError(f"{type(self).__name__} decodes with its own cache (new_cache()), got {type(cache).__name__}")
        q, k, v = self._project(x)
        if cache is not None and cache.size > 0:
            ys = [self._decode_token(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache)
                  for i in range(x.shape[1])]
            return self._merge_heads(torch.cat(ys, dim=2), None), LayerInfo()
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        y = self._attend_all(q, k, v, padding_mask)
        if cache is not None:
            self._prefill(q, k, v, cache)
        return self._merge_heads(y, None), LayerInfo()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fit ``log_alpha`` to this input (x [b, t, d_model]): per head, the value whose output is
        closest to dense attention's (``fit_log_alpha``). Called on a few training windows when a
        pretrained dense model's weights are loaded: the default 1 / head_dim suits training from
        scratch but gives a pretrained model's unread keys far more weight than its peaked softmax
        does. Heads with no unread keys in x (inputs of at most top_k + 1 blocks) keep their value.
        Returns the fitted log_alpha, or None without a residual."""
        if self.log_alpha is None:
            return None
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = self._project(x.to(self.qkv.weight.dtype))
            q, k = self.rotary.apply(q), self.rotary.apply(k)
            fitted, rows = fit_log_alpha(q, k, v, padding_mask, block=self.block, top_k=self.top_k,
                                         order=SELECTIONS[self.selection])
        self.log_alpha.copy_(torch.where(rows.to(fitted.device) > 0, fitted.to(self.log_alpha.dtype), self.log_alpha))
        return self.calibrate_result()

    # The per-head fit above minimises each layer's own output error, which measured on SmolLM2 gives
    # the residual more weight than is best for the model's predictions (docs/long_context.md); the
    # model-level calibration then tries these common shifts of log alpha end to end.
    calibration_shifts = (0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0)

    @torch.no_grad()
    def shift_calibration(self, delta: float) -> None:
        if self.log_alpha is not None:
            self.log_alpha.add_(delta)

    def calibrate_result(self) -> torch.Tensor | None:
        return None if self.log_alpha is None else self.log_alpha.detach().clone()

    def _attend_all(self, q, k, v, padding_mask):
        if self.mode == "linear":
            return causal_linear_attention(q, k, v, padding_mask, block=self.block)
        return sparse_linear_attention(q, k, v, padding_mask, block=self.block, top_k=self.top_k,
                                       order=SELECTIONS[self.selection], log_alpha=self.log_alpha,
                                       recompute=self.recompute)

    # ---- incremental decoding -------------------------------------------------------------------

    def _prefill(self, q, k, v, cache: SparseAttentionCache) -> None:
        """Fill an empty cache from a whole prompt's rotated q, k [b, h|g, t, hd] and v."""
        b, h, t, hd = q.shape
        g, B = self.n_kv_heads, self.block
        cache.kv.append(k, v)
        cache.size = t
        completed = t // B
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            kf = _fp32(k[:, :, : completed * B]).view(b, g, completed, B, hd)
            real = torch.ones(b, 1, completed, B, dtype=torch.bool, device=q.device)
            cache.mean, cache.var, count = block_summaries(kf * hd ** -0.5, real)
            cache.count = count.expand(b, g, completed)
            phi = feature_map(kf)
            cache.prefix = (phi.transpose(-1, -2) @ _fp32(v[:, :, : completed * B]).view(b, g, completed, B, hd)).sum(2)
            cache.prefix_sum = phi.sum((2, 3))
        qr = q.view(b, g, h // g, t, hd)
        if completed:
            self._choose(cache, qr[:, :, :, (completed - 1) * B : completed * B])
        else:
            self._choose(cache, None)
        cache.queries = qr[:, :, :, completed * B :]

    def _choose(self, cache: SparseAttentionCache, scoring_queries: torch.Tensor | None) -> None:
        """The current block's choice of past blocks and its residual state, from the previous
        block's queries [b, g, r, B, hd] (None for the first block: nothing to choose)."""
        b, g, n_done = cache.count.shape
        hd = self.head_dim
        with torch.no_grad(), torch.autocast(cache.count.device.type, enabled=False):
            if scoring_queries is None or n_done == 0:
                scores = cache.count.new_full((b, g, 0), float("-inf"))
            else:
                rows = _fp32(scoring_queries).reshape(b, g, 1, -1, hd)
                real = torch.ones(rows.shape[:-1], dtype=torch.bool, device=rows.device)
                q_mean, q_var, _ = block_summaries(rows, real)  # [b, g, 1, hd]
                scores = log_block_mass(q_mean, q_var, cache.mean, cache.var, cache.count,
                                        SELECTIONS[self.selection])[:, :, 0]
            # No padding slots here (forward pads to top_k with invalid ones; they read nothing).
            cache.index, cache.valid = top_blocks(scores, min(self.top_k if self.mode == "sparse" else 0, n_done))
            cache.residual, cache.residual_sum = cache.prefix.clone(), cache.prefix_sum.clone()
            if cache.index.shape[-1]:
                k_sel, v_sel = self._selected_blocks(cache)
                phi = feature_map(_fp32(k_sel)) * cache.valid.repeat_interleave(self.block, -1)[..., None].to(k_sel.dtype)
                cache.residual -= phi.transpose(-1, -2) @ _fp32(v_sel)
                cache.residual_sum -= phi.sum(-2)

    def _selected_blocks(self, cache: SparseAttentionCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the chosen blocks: [b, g, k * B, hd] each."""
        b, g, n = cache.index.shape
        B, hd = self.block, self.head_dim
        done = cache.count.shape[-1]
        blocks_k = cache.kv.k[:, :, : done * B].view(b, g, done, B, hd)
        blocks_v = cache.kv.v[:, :, : done * B].view(b, g, done, B, hd)
        bi = torch.arange(b, device=cache.index.device)[:, None, None]
        gi = torch.arange(g, device=cache.index.device)[None, :, None]
        return (blocks_k[bi, gi, cache.index].reshape(b, g, n * B, hd),
                blocks_v[bi, gi, cache.index].reshape(b, g, n * B, hd))

    def _decode_token(self, q, k, v, cache: SparseAttentionCache) -> torch.Tensor:
        """One new token of every sequence: q [b, h, 1, hd], k, v [b, g, 1, hd] -> y [b, h, 1, hd]."""
        b, h, _, hd = q.shape
        g, B = self.n_kv_heads, self.block
        r = h // g
        t = cache.size
        q, k = self.rotary.apply(q, t), self.rotary.apply(k, t)
        all_k, all_v = cache.kv.append(k.to(cache.kv.k.dtype), v.to(cache.kv.v.dtype))
        start = (t // B) * B
        qg = q.view(b, g, r, hd)
        cache.queries = torch.cat([cache.queries, qg[:, :, :, None]], dim=3)
        scale = hd ** -0.5
        if self.mode == "linear":
            y = self._decode_linear(qg, all_k[:, :, start:], all_v[:, :, start:], cache)
        else:
            keys, values = all_k[:, :, start:], all_v[:, :, start:]
            mask = torch.ones(b, g, keys.shape[2], dtype=torch.bool, device=q.device)
            if cache.index.shape[-1]:
                k_sel, v_sel = self._selected_blocks(cache)
                keys, values = torch.cat([k_sel, keys], 2), torch.cat([v_sel, values], 2)
                mask = torch.cat([cache.valid.repeat_interleave(B, -1), mask], -1)
            logits = _fp32(qg @ keys.transpose(-1, -2).to(qg.dtype)) * scale  # [b, g, r, L]
            logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
            m = logits.amax(-1, keepdim=True)
            p = torch.exp(logits - m)
            num, den = _fp32(p.to(values.dtype) @ values), p.sum(-1, keepdim=True)
            if self.log_alpha is not None:
                phi_q = feature_map(_fp32(qg))
                c = torch.exp((self.log_alpha.view(g, r, 1) - m).clamp(max=60.0))
                num = num + c * (phi_q @ cache.residual)
                den = den + c * (phi_q * cache.residual_sum[:, :, None]).sum(-1, keepdim=True)
            y = num / den
        if (t + 1) % B == 0:
            self._complete_block(cache, all_k[:, :, start:], all_v[:, :, start:])
        cache.size = t + 1
        return y.to(q.dtype).view(b, h, 1, hd)

    def _decode_linear(self, qg, own_k, own_v, cache) -> torch.Tensor:
        """Pure linear attention for one query: the open block's keys plus the completed prefix state."""
        phi_q = feature_map(_fp32(qg))  # [b, g, r, hd]
        phi_k = feature_map(_fp32(own_k))  # [b, g, n, hd]
        kernel = phi_q @ phi_k.transpose(-1, -2)  # [b, g, r, n]
        num = kernel @ _fp32(own_v) + phi_q @ cache.prefix
        den = kernel.sum(-1, keepdim=True) + (phi_q * cache.prefix_sum[:, :, None]).sum(-1, keepdim=True)
        return num / den

    def _complete_block(self, cache: SparseAttentionCache, block_k, block_v) -> None:
        """The open block just filled: add its summary and state, and choose for the next block."""
        b, g, B, hd = block_k.shape
        with torch.no_grad(), torch.autocast(block_k.device.type, enabled=False):
            kf = _fp32(block_k)
            real = torch.ones(b, 1, 1, B, dtype=torch.bool, device=kf.device)
            mean, var, count = block_summaries(kf[:, :, None] * hd ** -0.5, real)
            cache.mean = torch.cat([cache.mean, mean], 2)
            cache.var = torch.cat([cache.var, var], 2)
            cache.count = torch.cat([cache.count, count.expand(b, g, 1)], 2)
            phi = feature_map(kf)
            cache.prefix = cache.prefix + phi.transpose(-1, -2) @ _fp32(block_v)
            cache.prefix_sum = cache.prefix_sum + phi.sum(2)
        self._choose(cache, cache.queries)
        cache.queries = cache.queries[:, :, :, :0]
