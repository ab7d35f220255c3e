"""The blocked kernel's engines: the band through torch's CPU flash op or the native kernel, and masked SDPA.

- `flash_forward` / `native_forward`: the band (key windows as overlapping views of one padded copy of the keys),
  the global key columns and the global query rows computed apart and merged by their log-sum-exps;
- `concat_attention`: the global columns concatenated to every window and one SDPA call under autograd (the
  path for attention dropout and for devices other than the CPU).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..patterns import BandStructure
from .band_plan import BandPlan, concat_mask
from .reference import masked_sdpa

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
FLASH_LSE = _FLASH is not None and FLASH_BACKWARD is not None


def pad_rows(x: torch.Tensor, n_pad: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of (H, N, ...) up to n_pad rows."""
    if x.shape[1] == n_pad:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, n_pad - x.shape[1]]
    return F.pad(x, pad, value=value)


_WORKSPACE = threading.local()  # per thread: name -> the last padded key/value buffer


def _workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch buffer reused from call to call (see `padded` for why); its contents are not kept."""
    buffers = _WORKSPACE.__dict__
    x = buffers.get(name)
    if x is None or x.shape != shape or x.dtype != like.dtype or x.device != like.device:
        x = buffers[name] = like.new_empty(shape)
    return x


def padded(x: torch.Tensor, left: int, right: int, c: int, nb: int, name: str = "") -> torch.Tensor:
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


def windows(xp: torch.Tensor, width: int, c: int) -> torch.Tensor:
    """Padded (H, left + nb*c + right, D) -> (H, nb, width, D) overlapping views: block b's raw keys
    [b*c - left, b*c + c + right)."""
    return xp.unfold(1, width, c).transpose(-1, -2)


def fold_windows(grad: torch.Tensor, left: int, n: int, c: int) -> torch.Tensor:
    """Adjoint of `windows`: add (H, nb, W, D) window gradients back onto (H, n, D) (overlaps summed)."""
    heads, nb, width, dim = grad.shape
    acc = grad.new_zeros(heads, nb * c + width, dim)
    for o in range(0, width, c):  # for a fixed offset the blocks' slices tile the rows without overlap
        w = min(c, width - o)
        acc[:, o : o + nb * c].view(heads, nb, c, dim)[:, :, :w] += grad[:, :, o : o + w]
    return acc[:, left : left + n]


def concat_attention(query, key, value, plan: BandPlan, band: BandStructure, scaling: float, dropout: float):
    """One SDPA call per batch row over each block's window with the global key columns appended."""
    bsz, heads, n, dim = query.shape
    c, nb, left, right = plan.c, plan.nb, band.left, band.right
    n_pad = nb * c
    concat_mask(plan)

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
        q_b = pad_rows(query[b], n_pad).view(heads, nb, c, dim)
        k_b = windows(padded(key[b], left, right, c, nb), width, c)  # (H, nb, W, D)
        v_b = windows(padded(value[b], left, right, c, nb), width, c)
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
    copy in the per-thread workspace (see `padded`)."""
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
            windows(k_src, width, c).transpose(0, 1),
            windows(v_src, width, c).transpose(0, 1),
            attn_mask=band_mask[:, b0:b1].transpose(0, 1),
            scale=scaling,
        )
        pieces.append((b0, b1, o, lse))
    return pieces


def flash_forward(
    query, key, value, plan: BandPlan, b: int, left: int, right: int, scaling: float, out: torch.Tensor
):
    """Batch row `b` through the flash op: the band and global key columns into `out` (N_pad, H, D), then the
    global query rows. Returns the log-sum-exp (N_pad, H), +inf on rows with no allowed key (their output is 0)."""
    k_b, v_b = key[b], value[b]
    q_b = pad_rows(query[b], plan.nb * plan.c)
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


def _native_inputs(plan: BandPlan) -> None:
    """The native kernel's per-row views of the plan's masks, built once per plan."""
    if plan.native is not None:
        return
    bsz, nb, c, width = plan.band_bool.shape
    mask = plan.band_bool.reshape(bsz, nb * c, width).contiguous()
    # each row's first and last + 1 allowed column ((0, 0) when none), and whether every column between them is
    # allowed (the kernel then reads no mask inside the range). Query i of a block sees the window columns i to
    # i + span that its block's key_ok allows: found from per-block scans of key_ok, not from the (N, W) mask.
    key_ok, span = plan.key_ok, plan.span  # (B, nb, W) bool
    col = torch.arange(width, device=mask.device)
    after = torch.where(key_ok, col, width).flip(-1).cummin(dim=-1).values.flip(-1)  # first allowed >= j
    before = torch.where(key_ok, col, -1).cummax(dim=-1).values  # last allowed <= j
    seen = F.pad(key_ok.cumsum(dim=-1), (1, 0))  # (B, nb, W + 1) allowed columns before j
    i = torch.arange(c, device=mask.device)
    first, last = after[..., i], before[..., i + span] + 1  # (B, nb, c)
    count = seen[..., i + span + 1] - seen[..., i]
    alive = count > 0
    solid = count == last - first
    ranges = (
        torch.stack([first, last, solid.long()], dim=-1).mul_(alive.unsqueeze(-1)).reshape(bsz, nb * c, 3)
    )  # (B, N, 3)
    if plan.g:
        g_mask = plan.g_cols.reshape(bsz, nb * c, plan.g).contiguous()
        rows = (plan.row_mask[:, 0] == 0) & plan.row_open[:, 0].unsqueeze(-1)  # (B, g, N), dead rows closed
    else:
        g_mask = torch.zeros(bsz, nb * c, 0, dtype=torch.bool, device=mask.device)
        rows = None
    plan.native = (mask, ranges, g_mask, rows)


def native_forward(
    ops, query, key, value, plan: BandPlan, b: int, left: int, scaling: float, out: torch.Tensor
):
    """Batch row `b` in native calls (`native.ops`): the band and global key columns into `out` (N_pad, H, D),
    then the global query rows. Returns the log-sum-exp (N_pad, H), +inf on rows with no allowed key."""
    q_b, k_b, v_b = (x if x.stride(-1) == 1 else x.contiguous() for x in (query[b], key[b], value[b]))
    heads, n, dim = k_b.shape
    n_pad = plan.nb * plan.c
    q_b = pad_rows(q_b, n_pad)
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
