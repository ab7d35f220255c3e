"""The blocked kernel: banded attention from dense operations, so it runs (and trains) under autograd.

For a window pattern plus global tokens (Longformer, StreamingLLM), queries are cut into blocks of `c`;
each block attends, in one batched SDPA call, to the keys of its band (``c + left + right`` of them) and
to the global keys; the global queries then attend to every key in a second, small call. Work and memory
grow as N * (c + left + right + globals) instead of N * N, and every operation has a backward pass.

Without attention dropout the band runs through torch's CPU flash-attention op, which also returns each
row's log-sum-exp: the band (key windows are overlapping *views* of one zero-padded copy of the keys) and the global
key columns are computed apart and merged by their log-sum-exps, and the backward pass calls the op's own
backward with the merged output and log-sum-exp (`_BandAttention`). With dropout the global columns are
concatenated to every window and one SDPA call does both (`_concat_attention`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...registry import ATTENTION_KERNELS
from ..patterns import BandStructure
from ..spec import MaskSpec
from .reference import masked_sdpa, repeat_kv, revive_rows

# Query block of the forward pass and of the backward pass (when the config leaves block_size at 0). The
# forward prefers small blocks (less of each key window is masked out); the backward prefers large ones, because
# the flash op's backward returns a gradient for every key *window* (c + left + right keys per block of c), so
# small blocks multiply that buffer (timed here at 4,096 tokens, 12 heads x 64: forward 61 / 68 / 84 ms with
# blocks of 32 / 64 / 128, forward + backward 712 ms with 32 against 630 ms with 128, both under load).
DEFAULT_BLOCK = 32
DEFAULT_BACKWARD_BLOCK = 128


class KernelUnsupported(ValueError):
    """The blocked kernel cannot run this pattern or call (the caller falls back to the reference)."""


def supports(spec: MaskSpec) -> BandStructure | None:
    """The band form of `spec`'s pattern when the blocked kernel can run it, else None."""
    band = spec.pattern.band()
    if band is None or band.left < 0 or spec.extra is not None or not spec.is_self_attention():
        return None
    sinks = getattr(spec.pattern, "sinks", 0)
    if sinks and sinks > getattr(spec.pattern, "window", 0):
        return None  # sink rows then see fewer keys than a global row would
    return band


def _global_flags(band: BandStructure, spec: MaskSpec, n: int, device: torch.device) -> torch.Tensor | None:
    """(B, N) bool: raw indices that are global in each row, or None when the pattern has no globals."""
    if not band.positions and not band.token_ids:
        return None
    flags = torch.zeros(spec.batch, n, dtype=torch.bool, device=device)
    shift = spec.shift if spec.shift is not None else torch.zeros(spec.batch, dtype=torch.long, device=device)
    rows = torch.arange(spec.batch, device=device)
    for p in band.positions:
        raw = shift + p  # (B,)
        ok = raw < n
        flags[rows[ok], raw[ok]] = True
    if band.token_ids:
        if spec.token_flags is None:
            raise KernelUnsupported("global token ids need the input ids")
        flags |= spec.token_flags[:, :n].to(device)
    return flags


@dataclass
class _Plan:
    """Index and mask tensors of one (spec, length, block): built once, used by every layer of a pass."""

    c: int
    nb: int
    width: int  # keys per query block: band (c + left + right) + global columns
    dtype: torch.dtype
    band_bool: torch.Tensor | None = None  # (B, nb, c, c + left + right) bool: band columns of each query
    mask: torch.Tensor | None = None  # (B*nb, 1, c, width) additive, dead rows opened (dropout path only)
    alive: torch.Tensor | bool = True
    g: int = 0
    order: torch.Tensor | None = None  # (B, g) raw indices of the global tokens
    g_valid: torch.Tensor | None = None  # (B, g)
    row_mask: torch.Tensor | None = None  # (B, 1, g, N) additive: what global queries see
    row_alive: torch.Tensor | bool = True
    band_mask: torch.Tensor | None = None  # (B, 1, nb, c, c + left + right) additive, band columns only
    band_alive: torch.Tensor | None = None  # (B, 1, nb, c) rows with an allowed band key
    g_cols: torch.Tensor | None = None  # (B, 1, nb, c, g) bool: global key columns each query sees
    row_open: torch.Tensor | None = None  # (B, 1, g) global query rows with an allowed key


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 where allowed, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _plan(
    spec: MaskSpec,
    band: BandStructure,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    default_block: int = DEFAULT_BLOCK,
) -> _Plan:
    key = ("blocked", n, spec.block_size or default_block, str(device), dtype)
    if key in spec.cache:
        return spec.cache[key]
    bsz, left, right = spec.batch, band.left, band.right
    c = max(1, min(spec.block_size or default_block, n))
    nb = -(-n // c)
    n_pad = nb * c
    width = c + left + right
    flags = _global_flags(band, spec, n, device)
    real = (
        spec.padding.to(device)
        if spec.padding is not None
        else torch.ones(bsz, n, dtype=torch.bool, device=device)
    )
    key_ok = real if flags is None else real & ~flags  # global keys join through their own columns
    key_ok = F.pad(key_ok, (left, n_pad - n + right), value=False).unfold(1, width, c)  # (B, nb, W)
    i = torch.arange(c, device=device).view(c, 1)
    j = torch.arange(width, device=device).view(1, width)
    in_band = (j - i >= 0) & (j - i <= left + right)  # (c, W): key raw = block*c + j - left
    mask = in_band.view(1, 1, c, width) & key_ok.unsqueeze(2)  # (B, nb, c, W)
    plan = _Plan(c=c, nb=nb, width=width, dtype=dtype)
    plan.band_mask = _additive(mask, dtype).unsqueeze(1)
    plan.band_alive = mask.any(dim=-1).unsqueeze(1)
    if flags is not None:
        count = flags.sum(dim=1)  # (B,)
        g = int(count.max())
        order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :g]  # global raw indices first
        g_valid = torch.arange(g, device=device).view(1, g) < count.view(-1, 1)  # (B, g)
        g_mask = (g_valid & real.gather(1, order)).view(bsz, 1, 1, g).expand(bsz, nb, c, g)
        if band.causal:
            q_raw = torch.arange(n_pad, device=device).view(1, nb, c, 1)
            g_mask = g_mask & (order.view(bsz, 1, 1, g) <= q_raw)
        plan.g_cols = g_mask.unsqueeze(1)
        row_mask = g_valid.view(bsz, 1, g, 1) & real.view(bsz, 1, 1, n)
        if band.causal:
            row_mask = row_mask & (
                torch.arange(n, device=device).view(1, 1, 1, n) <= order.view(bsz, 1, g, 1)
            )
        plan.row_open = row_mask.any(dim=-1)  # (B, 1, g)
        row_mask, plan.row_alive = revive_rows(row_mask)
        plan.row_mask = _additive(row_mask, dtype)
        plan.g, plan.order, plan.g_valid = g, order, g_valid
        plan.width = width + g
    plan.band_bool = mask
    spec.cache[key] = plan
    return plan


def _concat_mask(plan: _Plan) -> None:
    """Build the dropout path's additive mask over band + global columns, once per plan (lazily: the flash
    path never needs it)."""
    if plan.mask is not None:
        return
    mask = plan.band_bool  # (B, nb, c, band width), then the global key columns
    if plan.g:
        mask = torch.cat([mask, plan.g_cols.squeeze(1)], dim=3)
    mask = mask.reshape(mask.shape[0] * plan.nb, 1, plan.c, plan.width)
    mask, plan.alive = revive_rows(mask)
    plan.mask = _additive(mask, plan.dtype)  # SDPA would convert a bool mask on every call (every layer)


@ATTENTION_KERNELS.register("blocked")
def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Band + global attention in blocks; equals the reference kernel for the patterns it supports.

    Args:
        query: (B, H, N, D).
        key, value: (B, Hkv, N, D).
        spec: Mask description; its pattern must have a band form (`supports`).
        scaling: Score scale.
        dropout: Attention dropout probability.

    Returns:
        (B, H, N, D).

    Raises:
        KernelUnsupported: the pattern or call has no band form (use the reference kernel).
    """
    band = supports(spec)
    if band is None:
        raise KernelUnsupported(f"pattern {spec.pattern.name!r} has no band form for the blocked kernel")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n = query.shape[2]
    if dropout or not _FLASH_LSE:  # autograd runs through masked SDPA: the backward's block size suits it
        plan = _plan(spec, band, n, query.device, query.dtype, DEFAULT_BACKWARD_BLOCK)
        return _concat_attention(query, key, value, plan, band, scaling, dropout)
    plan = _plan(spec, band, n, query.device, query.dtype, DEFAULT_BLOCK)
    # the backward's plan is built on the first backward call, then cached in the spec for the other layers
    backward_plan = functools.partial(_plan, spec, band, n, query.device, query.dtype, DEFAULT_BACKWARD_BLOCK)
    return _BandAttention.apply(query, key, value, plan, backward_plan, band.left, band.right, scaling)


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_LSE = _FLASH is not None and _FLASH_BACKWARD is not None


def _pad_rows(x: torch.Tensor, n_pad: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of (H, N, ...) up to n_pad rows."""
    if x.shape[1] == n_pad:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, n_pad - x.shape[1]]
    return F.pad(x, pad, value=value)


_WORKSPACE = threading.local()  # per thread: name -> the last padded key/value buffer


def _padded(x: torch.Tensor, left: int, right: int, c: int, nb: int, name: str = "") -> torch.Tensor:
    """(H, N, D) -> a contiguous zero-padded copy (H, left + nb*c + right, D): rows [left, left + N) are `x`.

    With a `name`, the copy lives in a per-thread workspace and is reused by the next call of the same shape
    (every layer of a model, and the next forward pass): a fresh multi-MB buffer per call costs more in page
    faults than the copy itself (measured: 6.5 ms against 2 ms at 12 x 4,096 x 64). Callers use it at once and
    never keep it. The copy is also what the other calls read: transformers hands the kernel (B, H, N, D) views
    of (B, N, H, D) projections, which the flash op would copy on every call (one global query row at
    12 x 4,096 x 32: 2.3 ms from such a view, 0.9 ms from a contiguous copy).
    """
    heads, n, dim = x.shape
    shape = (heads, left + nb * c + right, dim)
    buffers = _WORKSPACE.__dict__
    xp = buffers.get(name) if name else None
    if xp is None or xp.shape != shape or xp.dtype != x.dtype or xp.device != x.device:
        xp = x.new_empty(shape)
        if name:
            buffers[name] = xp
    xp[:, :left].zero_()  # the border rows are few; zeroing them each time keeps a reused buffer exact
    xp[:, left + n :].zero_()
    xp[:, left : left + n].copy_(x)
    return xp


def _windows(xp: torch.Tensor, width: int, c: int) -> torch.Tensor:
    """Padded (H, left + nb*c + right, D) -> (H, nb, width, D) overlapping views: block b's raw keys
    [b*c - left, b*c + c + right)."""
    return xp.unfold(1, width, c).transpose(-1, -2)


def _fold_windows(grad: torch.Tensor, left: int, n: int, c: int) -> torch.Tensor:
    """Adjoint of `_windows`: add (H, nb, W, D) window gradients back onto (H, n, D) (overlaps summed)."""
    heads, nb, width, dim = grad.shape
    acc = grad.new_zeros(heads, nb * c + width, dim)
    for o in range(0, width, c):  # for a fixed offset the blocks' slices tile the rows without overlap
        w = min(c, width - o)
        acc[:, o : o + nb * c].view(heads, nb, c, dim)[:, :, :w] += grad[:, :, o : o + w]
    return acc[:, left : left + n]


def _concat_attention(query, key, value, plan: _Plan, band: BandStructure, scaling: float, dropout: float):
    """One SDPA call per batch row over each block's window with the global key columns appended."""
    bsz, heads, n, dim = query.shape
    c, nb, left, right = plan.c, plan.nb, band.left, band.right
    n_pad = nb * c
    _concat_mask(plan)

    # ---- band part: block b of queries sees raw keys [b*c - left, b*c + c + right) plus the global keys -----
    # Layout (H, nb, ., D) per batch row: query blocks are views of the inputs, key windows overlapping views of
    # one padded copy (a fresh one: autograd keeps these windows), and the mask (1, nb, c, W) is shared by all heads.
    if plan.g:
        idx = plan.order.view(bsz, 1, plan.g, 1).expand(bsz, heads, plan.g, dim)
        k_g, v_g = key.gather(2, idx), value.gather(2, idx)  # (B, H, g, D)
    mask = plan.mask.view(bsz, 1, nb, c, plan.width)
    alive = plan.alive if plan.alive is True else plan.alive.view(bsz, 1, nb, c, 1)
    rows = []
    width = c + left + right
    for b in range(bsz):
        q_b = _pad_rows(query[b], n_pad).view(heads, nb, c, dim)
        k_b = _windows(_padded(key[b], left, right, c, nb), width, c)  # (H, nb, W, D)
        v_b = _windows(_padded(value[b], left, right, c, nb), width, c)
        if plan.g:
            k_b = torch.cat([k_b, k_g[b].unsqueeze(1).expand(heads, nb, plan.g, dim)], dim=2)
            v_b = torch.cat([v_b, v_g[b].unsqueeze(1).expand(heads, nb, plan.g, dim)], dim=2)
        a_b = alive if alive is True else alive[b]
        rows.append(masked_sdpa(q_b, k_b, v_b, mask[b], scaling, dropout, alive=a_b).view(heads, n_pad, dim))
    out = torch.stack(rows) if bsz > 1 else rows[0].unsqueeze(0)  # (B, H, Np, D)
    if n_pad != n:
        out = out[:, :, :n]

    # ---- global queries attend to every allowed key --------------------------------------------------------
    if plan.g:
        q_g = query.gather(2, idx)  # (B, H, g, D)
        out_g = masked_sdpa(q_g, key, value, plan.row_mask, scaling, dropout, alive=plan.row_alive)
        if not bool(plan.g_valid.all()):
            out_g = torch.where(plan.g_valid.view(bsz, 1, plan.g, 1), out_g, out.gather(2, idx))
        out = out.scatter(2, idx, out_g)
    return out


class _BandAttention(torch.autograd.Function):
    """Band (flash op over key-window views) + global key columns + global query rows, merged by log-sum-exp.

    Forward keeps the merged output and log-sum-exp (+inf on rows with no allowed key, whose output is 0);
    backward hands them to the flash op's backward for each piece, which then yields exactly that piece's
    share of the gradients.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan: _Plan, backward_plan, left: int, right: int, scaling: float):
        bsz, heads, n, dim = query.shape
        c, nb, g = plan.c, plan.nb, plan.g
        n_pad = nb * c
        inf = float("inf")
        outs, lses = [], []
        width = c + left + right
        for b in range(bsz):
            q_b = _pad_rows(query[b], n_pad).view(heads, nb, c, dim)
            k_pad = _padded(key[b], left, right, c, nb, "key")
            v_pad = _padded(value[b], left, right, c, nb, "value")
            k_b, v_b = k_pad[:, left : left + n], v_pad[:, left : left + n]  # contiguous key[b], value[b]
            o, lse = _FLASH(
                q_b,
                _windows(k_pad, width, c),
                _windows(v_pad, width, c),
                attn_mask=plan.band_mask[b],
                scale=scaling,
            )
            lse = lse.masked_fill(~plan.band_alive[b], -inf)  # the op reports 0 for fully masked rows
            if g:
                idx = plan.order[b]
                # scores against the global keys for all rows in one (H, Np, D) x (H, D, g) product
                k_g, v_g = k_b[:, idx], v_b[:, idx]  # (H, g, D)
                # (the unpadded query directly when it needs no padding: reshaping transformers' strided view
                # of it would copy it)
                q_f = query[b] if n == n_pad else q_b.reshape(heads, n_pad, dim)
                s = torch.matmul(q_f, k_g.transpose(-1, -2))
                s = s.mul_(scaling).view(heads, nb, c, g).masked_fill_(~plan.g_cols[b], -inf)
                total = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
                total.masked_fill_(torch.isneginf(total), inf)  # no allowed key: weights all 0
                # in place on the op's output (a view on torch >= 2.5, whose output follows the query's
                # layout; older versions copy here): no new (H, Np, D) buffer
                o = o.mul_(torch.exp(lse - total).unsqueeze(-1)).reshape(heads, n_pad, dim)
                p = torch.exp(s.sub_(total.unsqueeze(-1))).view(heads, n_pad, g)
                if g <= 4:  # a few rank-1 updates: baddbmm would run one small product per head
                    for j in range(g):
                        o.addcmul_(p[:, :, j : j + 1], v_g[:, j : j + 1])
                else:
                    o = o.baddbmm_(p, v_g)
                lse = total
            else:
                lse = lse.masked_fill(torch.isneginf(lse), inf)
                o = o.mul_(plan.band_alive[b].unsqueeze(-1))
            o, lse = o.reshape(heads, n_pad, dim)[:, :n], lse.reshape(heads, n_pad)[:, :n]
            if g:  # global queries see every allowed key: their rows are replaced
                o_g, lse_g = _FLASH(
                    query[b, :, idx].unsqueeze(0),
                    k_b.unsqueeze(0),
                    v_b.unsqueeze(0),
                    attn_mask=plan.row_mask[b : b + 1],
                    scale=scaling,
                )
                open_ = plan.row_open[b]  # (1, g)
                o_g = o_g[0] * open_.unsqueeze(-1)
                lse_g = lse_g[0].masked_fill(~open_, inf)
                valid = plan.g_valid[b]
                o[:, idx[valid]] = o_g[:, valid]
                lse[:, idx[valid]] = lse_g[:, valid]
            outs.append(o)
            lses.append(lse)
        out, lse = (torch.stack(outs), torch.stack(lses)) if bsz > 1 else (outs[0][None], lses[0][None])
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.left, ctx.right, ctx.scaling = backward_plan, left, right, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        plan, left, right, scaling = ctx.plan(), ctx.left, ctx.right, ctx.scaling
        bsz, heads, n, dim = query.shape
        c, nb, g = plan.c, plan.nb, plan.g
        n_pad = nb * c
        grad_out = grad_out.contiguous()
        width = c + left + right
        dqs, dks, dvs = [], [], []
        for b in range(bsz):
            go = grad_out[b]
            if g:
                idx = plan.order[b]
                valid_idx = idx[plan.g_valid[b]]
                go = go.clone()
                go[:, valid_idx] = 0  # global query rows come from their own piece below
            go_b = _pad_rows(go, n_pad).view(heads, nb, c, dim)
            o_b = _pad_rows(out[b], n_pad).view(heads, nb, c, dim)
            lse_b = _pad_rows(lse[b], n_pad, value=float("inf")).view(heads, nb, c)
            q_b = _pad_rows(query[b], n_pad).view(heads, nb, c, dim)
            k_pad = _padded(key[b], left, right, c, nb, "key")
            v_pad = _padded(value[b], left, right, c, nb, "value")
            k_b, v_b = k_pad[:, left : left + n], v_pad[:, left : left + n]  # contiguous key[b], value[b]
            dq, dkw, dvw = _FLASH_BACKWARD(
                go_b,
                q_b,
                _windows(k_pad, width, c),
                _windows(v_pad, width, c),
                o_b,
                lse_b,
                0.0,
                False,
                attn_mask=plan.band_mask[b],
                scale=scaling,
            )
            dk = _fold_windows(dkw, left, n, c)
            dv = _fold_windows(dvw, left, n, c)
            if g:  # the global key columns, on (H, Np, .) views: a few small matrix products
                k_g, v_g = k_b[:, idx], v_b[:, idx]  # (H, g, D)
                q_f, go_f = q_b.reshape(heads, n_pad, dim), go_b.reshape(heads, n_pad, dim)
                s = torch.matmul(q_f, k_g.transpose(-1, -2)).mul_(scaling).view(heads, nb, c, g)
                p = torch.exp(s.masked_fill_(~plan.g_cols[b], float("-inf")).sub_(lse_b.unsqueeze(-1)))
                p = p.view(heads, n_pad, g)
                d_sum = (go_f * o_b.reshape(heads, n_pad, dim)).sum(dim=-1, keepdim=True)
                ds = p * (torch.matmul(go_f, v_g.transpose(-1, -2)) - d_sum)  # (H, Np, g)
                dq = dq + (torch.matmul(ds, k_g) * scaling).view(heads, nb, c, dim)
                dk = dk.index_add(1, idx, torch.matmul(ds.transpose(-1, -2), q_f).mul_(scaling))
                dv = dv.index_add(1, idx, torch.matmul(p.transpose(-1, -2), go_f))
            dq = dq.reshape(heads, n_pad, dim)[:, :n]
            if g:
                go_g = grad_out[b, :, idx] * plan.g_valid[b].view(1, g, 1)
                dq_g, dk_r, dv_r = _FLASH_BACKWARD(
                    go_g.unsqueeze(0),
                    query[b, :, idx].unsqueeze(0),
                    k_b.unsqueeze(0),
                    v_b.unsqueeze(0),
                    out[b, :, idx].unsqueeze(0),
                    lse[b, :, idx].unsqueeze(0),
                    0.0,
                    False,
                    attn_mask=plan.row_mask[b : b + 1],
                    scale=scaling,
                )
                dq = dq.clone()
                dq[:, valid_idx] = dq_g[0][:, plan.g_valid[b]]
                dk, dv = dk + dk_r[0], dv + dv_r[0]
            dqs.append(dq)
            dks.append(dk)
            dvs.append(dv)
        return torch.stack(dqs), torch.stack(dks), torch.stack(dvs), None, None, None, None, None
