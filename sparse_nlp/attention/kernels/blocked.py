"""The blocked kernel: banded attention from dense operations, so it runs (and trains) under autograd.

For a window pattern plus global tokens (Longformer, StreamingLLM), queries are cut into blocks of `c`;
each block attends, in one batched SDPA call, to the keys of its band (``c + left + right`` of them) and
to the global keys; the global queries then attend to every key in a second, small call. Work and memory
grow as N * (c + left + right + globals) instead of N * N, and every operation has a backward pass.

Without attention dropout the band runs through torch's CPU flash-attention op, which also returns each
row's log-sum-exp: the band (key windows are overlapping *views* of one zero-padded copy of the keys) and the global
key columns are computed apart and merged by their log-sum-exps, and the backward pass calls the op's own
backward with the merged output and log-sum-exp (`_BandAttention`). With dropout, and on devices other than the
CPU (the op is CPU-only), the global columns are concatenated to every window and one SDPA call does both
(`_concat_attention`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import KernelUnsupported
from ...registry import ATTENTION_KERNELS
from ..patterns import BandStructure
from ..spec import MaskSpec
from . import native
from .reference import masked_sdpa, repeat_kv, revive_rows

# Query block of the forward pass and of the backward pass (when the config leaves block_size at 0). The
# forward prefers small blocks (less of each key window is masked out); the backward prefers large ones, because
# the flash op's backward returns a gradient for every key *window* (c + left + right keys per block of c), so
# small blocks multiply that buffer (timed here at 4,096 tokens, 12 heads x 64: forward 61 / 68 / 84 ms with
# blocks of 32 / 64 / 128, forward + backward 712 ms with 32 against 630 ms with 128, both under load).
DEFAULT_BLOCK = 32
DEFAULT_BACKWARD_BLOCK = 128


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
    native: tuple | None = None  # the native kernel's masks: band, column ranges, global columns, global rows


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
@torch.compiler.disable  # eager under torch.compile: its plans and in-place native ops are not traceable
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
    # The flash op is CPU-only: with dropout, without the op, or on another device (a GPU), the blocks run through
    # masked SDPA under autograd, whose backward's block size suits it
    if dropout or not _FLASH_LSE or query.device.type != "cpu":
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


def _workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch buffer reused from call to call (see `_padded` for why); its contents are not kept."""
    buffers = _WORKSPACE.__dict__
    x = buffers.get(name)
    if x is None or x.shape != shape or x.dtype != like.dtype or x.device != like.device:
        x = buffers[name] = like.new_empty(shape)
    return x


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
    xp = _workspace(name, shape, x) if name else x.new_empty(shape)
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
        rows.append(
            masked_sdpa(q_b, k_b, v_b, mask[b], scaling, dropout, alive=a_b).reshape(heads, n_pad, dim)
        )
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


# Global tokens at most this many use block-diagonal matrix products for their columns and rows: one (N, H*D) x
# (H*D, H*g) product for all heads, where a per-head batched product of width g runs at a fraction of the speed
# (2.1 ms against about 0.3 ms for one global token at 12 x 4,096 x 32). The cost grows as H * g, so more
# global tokens take per-head products.
BLOCK_DIAGONAL_MAX = 8


def _block_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(H, g, D) -> (H*D, H*g) with x[h].T as its h-th diagonal block and zeros elsewhere."""
    heads, g, dim = x.shape
    out = x.new_zeros(heads, dim, heads, g)
    torch.diagonal(out, dim1=0, dim2=2).copy_(x.permute(2, 1, 0))  # the diagonal view is (D, g, H)
    return out.view(heads * dim, heads * g)


def _head_scores(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rows (L, H, D), x (H, g, D) -> (L, H, g): each row's dot products with its own head's g vectors."""
    heads, g, dim = x.shape
    if g <= BLOCK_DIAGONAL_MAX:
        return torch.mm(rows.reshape(rows.shape[0], heads * dim), _block_diagonal(x)).view(-1, heads, g)
    return torch.einsum("lhd,hgd->lhg", rows, x)


def _add_head_mix(out: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> None:
    """out (L, H, D) += sum_j p[:, :, j] * x[:, j]: p (L, H, g) weights each head's g vectors x (H, g, D)."""
    heads, g, dim = x.shape
    if g <= BLOCK_DIAGONAL_MAX:
        out.view(-1, heads * dim).addmm_(p.reshape(-1, heads * g), _block_diagonal(x).t())
    else:
        out.add_(torch.einsum("lhg,hgd->lhd", p, x))


def _head_gather(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """p (L, H, g), rows (L, H, D) -> (H, g, D): sum over L of p[l, h, j] * rows[l, h]."""
    length, heads, g = p.shape
    dim = rows.shape[2]
    if g <= BLOCK_DIAGONAL_MAX:  # all head pairs in one product, then the diagonal blocks
        full = torch.mm(p.reshape(length, heads * g).t(), rows.reshape(length, heads * dim))
        return torch.diagonal(full.view(heads, g, heads, dim), dim1=0, dim2=2).permute(2, 0, 1)
    return torch.einsum("lhg,lhd->hgd", p, rows)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(H, L, D) -> (L, H, D); a view for transformers' layout, whose (B, H, N, D) inputs are transposed views."""
    return x.transpose(0, 1)


def _key_source(x: torch.Tensor, start: int, stop: int, name: str) -> torch.Tensor:
    """Raw rows [start, stop) of (H, N, D) `x`, zero outside [0, N): a view when they lie inside, else a padded
    copy in the per-thread workspace (see `_padded`)."""
    n = x.shape[1]
    if start >= 0 and stop <= n:
        return x[:, start:stop]
    xp = _workspace(name, (x.shape[0], stop - start, x.shape[2]), x)
    lo, hi = min(max(start, 0), n), max(min(stop, n), 0)
    xp[:, : max(lo - start, 0)].zero_()
    xp[:, max(hi - start, 0) :].zero_()
    if hi > lo:
        xp[:, lo - start : hi - start].copy_(x[:, lo:hi])
    return xp


def _band_pieces(q_b, k_b, v_b, band_mask, left: int, right: int, c: int, scaling: float):
    """The band alone, in up to three flash-op calls: (first query block, end block, out, lse) per call.

    Interior blocks, whose key windows lie inside [0, N), read their windows as views of the keys and values as
    they come (no copy: the op reads strided rows as fast as contiguous ones); the border blocks at each end read
    a small zero-padded copy. Each call runs in block-major order (the op's batch is the block, its heads are
    the heads), so one block's (c, W) mask serves all heads while it is in cache (about 8% faster than head-major
    at 12 x 4,096 x 32). `out` is (blocks, H, c, D), `lse` (blocks, H, c).
    """
    n = k_b.shape[1]
    nb = q_b.shape[1] // c
    width = c + left + right
    lo = min(nb, -(-left // c))  # block b is interior iff b*c - left >= 0 and b*c + c + right <= N
    hi = max(lo, min(nb, (n - right) // c))
    q_blocks = q_b.view(q_b.shape[0], nb, c, q_b.shape[2])
    pieces = []
    for b0, b1, tag in ((0, lo, "head"), (lo, hi, ""), (hi, nb, "tail")):
        if b1 <= b0:
            continue
        start, stop = b0 * c - left, b1 * c + right
        k_src = _key_source(k_b, start, stop, "key" + tag)
        v_src = _key_source(v_b, start, stop, "value" + tag)
        o, lse = _FLASH(
            q_blocks[:, b0:b1].transpose(0, 1),
            _windows(k_src, width, c).transpose(0, 1),
            _windows(v_src, width, c).transpose(0, 1),
            attn_mask=band_mask[:, b0:b1].transpose(0, 1),
            scale=scaling,
        )
        pieces.append((b0, b1, o, lse))
    return pieces


def _flash_forward(
    query, key, value, plan: _Plan, b: int, left: int, right: int, scaling: float, out: torch.Tensor
):
    """Batch row `b` through the flash op: the band and global key columns into `out` (N_pad, H, D), then the
    global query rows. Returns the log-sum-exp (N_pad, H), +inf on rows with no allowed key (their output is 0)."""
    k_b, v_b = key[b], value[b]
    q_b = _pad_rows(query[b], plan.nb * plan.c)
    heads, n_pad, dim = q_b.shape
    c, g = plan.c, plan.g
    inf = float("inf")
    pieces = _band_pieces(q_b, k_b, v_b, plan.band_mask[b], left, right, c, scaling)
    band_alive = plan.band_alive[b].reshape(n_pad, 1)
    # the op reports a log-sum-exp of 0 for rows whose band keys are all masked: -inf there
    lse = torch.cat([p[3].transpose(1, 2).reshape(-1, heads) for p in pieces]).masked_fill_(~band_alive, -inf)
    if g:  # the global key columns of every row, merged by log-sum-exp
        idx = plan.order[b]
        k_g, v_g = k_b[:, idx], v_b[:, idx]  # (H, g, D)
        s = _head_scores(_rows_view(q_b), k_g).mul_(scaling)  # (N_pad, H, g)
        s.masked_fill_(~plan.g_cols[b].reshape(n_pad, 1, g), -inf)
        total = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        total.masked_fill_(torch.isneginf(total), inf)  # no allowed key: weights all 0
        weight = torch.exp(lse - total)  # (N_pad, H): the band's share of each row
        p = torch.exp(s.sub_(total.unsqueeze(-1)))
    else:
        total = lse.masked_fill_(torch.isneginf(lse), inf)
        weight = band_alive.to(q_b.dtype)
    for b0, b1, o, _ in pieces:  # out = band output x its share, written in place into the output
        rows = out[b0 * c : b1 * c].view(b1 - b0, c, heads, dim)
        torch.mul(o.transpose(1, 2), weight[b0 * c : b1 * c].view(b1 - b0, c, -1, 1), out=rows)
    if g:
        _add_head_mix(out, p, v_g)
        # global queries see every allowed key: their rows are replaced
        s = _head_scores(_rows_view(k_b), q_b[:, idx]).mul_(scaling)  # (N, H, g)
        s.add_(plan.row_mask[b, 0].t().unsqueeze(1))  # (g, N) additive mask, dead rows opened
        lse_g = torch.logsumexp(s, dim=0)  # (H, g)
        o_g = _head_gather(torch.exp(s.sub_(lse_g)), _rows_view(v_b))  # (H, g, D)
        open_ = plan.row_open[b]  # (1, g)
        o_g = o_g * open_.unsqueeze(-1)
        lse_g = lse_g.masked_fill(~open_, inf)
        valid = plan.g_valid[b]
        out[idx[valid]] = o_g[:, valid].transpose(0, 1)
        total[idx[valid]] = lse_g[:, valid].t()
    return total


def _native_inputs(plan: _Plan) -> None:
    """The native kernel's per-row views of the plan's masks, built once per plan."""
    if plan.native is not None:
        return
    bsz, nb, c, width = plan.band_bool.shape
    mask = plan.band_bool.reshape(bsz, nb * c, width).contiguous()
    # each row's first and last + 1 allowed column (argmax gives the first maximum; (0, 0) when none), and
    # whether every column between them is allowed (the kernel then reads no mask inside the range)
    alive = mask.any(dim=-1)
    first = mask.to(torch.uint8).argmax(dim=-1)
    last = width - mask.flip(-1).to(torch.uint8).argmax(dim=-1)
    solid = mask.sum(dim=-1) == last - first
    ranges = (
        torch.stack([first, last, solid.long()], dim=-1).mul_(alive.unsqueeze(-1)).contiguous()
    )  # (B, N, 3)
    if plan.g:
        g_mask = plan.g_cols.reshape(bsz, nb * c, plan.g).contiguous()
        rows = (plan.row_mask[:, 0] == 0) & plan.row_open[:, 0].unsqueeze(-1)  # (B, g, N), dead rows closed
    else:
        g_mask = torch.zeros(bsz, nb * c, 0, dtype=torch.bool, device=mask.device)
        rows = None
    plan.native = (mask, ranges, g_mask, rows)


def _native_forward(
    ops, query, key, value, plan: _Plan, b: int, left: int, scaling: float, out: torch.Tensor
):
    """Batch row `b` in native calls (`native.ops`): the band and global key columns into `out` (N_pad, H, D),
    then the global query rows. Returns the log-sum-exp (N_pad, H), +inf on rows with no allowed key."""
    q_b, k_b, v_b = (x if x.stride(-1) == 1 else x.contiguous() for x in (query[b], key[b], value[b]))
    heads, n, dim = k_b.shape
    n_pad = plan.nb * plan.c
    q_b = _pad_rows(q_b, n_pad)
    _native_inputs(plan)
    mask, ranges, g_mask, rows = plan.native
    g = plan.g
    if g:
        idx = plan.order[b]
        k_g, v_g = k_b[:, idx], v_b[:, idx]
    else:
        k_g = v_g = k_b.new_empty(heads, 0, dim)
    chunk = 16  # keys per chunk of the kernel's key layout
    k_t = _workspace("native_keys", (heads, -(-n // chunk), dim, chunk), k_b)
    k_gt = _workspace("native_global_keys", (heads, max(1, -(-g // chunk)), dim, chunk), k_b)
    lse = q_b.new_empty(n_pad, heads)
    ops.band_forward(q_b, k_b, v_b, mask[b], ranges[b], k_g, v_g, g_mask[b], k_t, k_gt, out.transpose(0, 1),
                     lse.t(), plan.c, left, scaling)  # fmt: skip
    if g:  # global queries see every allowed key: their rows are replaced
        valid = plan.g_valid[b]
        q_g = q_b[:, idx[valid]]
        o_g, lse_g = q_g.new_empty(q_g.shape), q_g.new_empty(heads, q_g.shape[1])
        ops.global_rows(q_g, k_t, v_b, rows[b][valid].contiguous(), o_g, lse_g, scaling)
        out[idx[valid]] = o_g.transpose(0, 1)
        lse[idx[valid]] = lse_g.t()
    return lse.masked_fill_(torch.isneginf(lse), float("inf"))


class _BandAttention(torch.autograd.Function):
    """Band (flash op over key-window views) + global key columns + global query rows, merged by log-sum-exp.

    Forward keeps the merged output and log-sum-exp (+inf on rows with no allowed key, whose output is 0);
    backward hands them to the flash op's backward for each piece, which then yields exactly that piece's
    share of the gradients. The forward runs in the native kernel where it can (`native.usable`), else through the
    flash op; the values are the same within float rounding.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan: _Plan, backward_plan, left: int, right: int, scaling: float):
        bsz, heads, n, dim = query.shape
        n_pad = plan.nb * plan.c
        ops = native.ops() if native.usable(query, key, value) else None
        # rows-major (B, N, H, D) output: transformers transposes it back to (B, N, H*D) without a copy
        out_rows = query.new_empty(bsz, n_pad, heads, dim)
        lses = []
        for b in range(bsz):
            if ops is not None:
                total = _native_forward(ops, query, key, value, plan, b, left, scaling, out_rows[b])
            else:
                total = _flash_forward(query, key, value, plan, b, left, right, scaling, out_rows[b])
            lses.append(total[:n].t())
        out = out_rows[:, :n].transpose(1, 2)
        lse = torch.stack(lses)
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
