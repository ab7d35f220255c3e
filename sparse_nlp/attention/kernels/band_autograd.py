"""The blocked kernel's autograd function: forward by an engine, backward by the flash op's own backward."""

from __future__ import annotations

import torch

from . import native
from .band_engines import (
    FLASH_BACKWARD,
    flash_forward,
    fold_windows,
    native_forward,
    pad_rows,
    padded,
    windows,
)
from .band_plan import BandPlan


class BandAttention(torch.autograd.Function):
    """Band (flash op over key-window views) + global key columns + global query rows, merged by log-sum-exp.

    Forward keeps the merged output and log-sum-exp (+inf on rows with no allowed key, whose output is 0);
    backward hands them to the flash op's backward for each piece, which then yields exactly that piece's
    share of the gradients. The forward runs in the native kernel where it can (`native.usable`), else through the
    flash op; the values are the same within float rounding.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan: BandPlan, backward_plan, left: int, right: int, scaling: float):
        bsz, heads, n, dim = query.shape
        n_pad = plan.nb * plan.c
        ops = native.ops() if native.usable(query, key, value) else None
        # rows-major (B, N, H, D) output: transformers transposes it back to (B, N, H*D) without a copy
        out_rows = query.new_empty(bsz, n_pad, heads, dim)
        lses = []
        for b in range(bsz):
            if ops is not None:
                total = native_forward(ops, query, key, value, plan, b, left, scaling, out_rows[b])
            else:
                total = flash_forward(query, key, value, plan, b, left, right, scaling, out_rows[b])
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
            go_b = pad_rows(go, n_pad).view(heads, nb, c, dim)
            o_b = pad_rows(out[b], n_pad).view(heads, nb, c, dim)
            lse_b = pad_rows(lse[b], n_pad, value=float("inf")).view(heads, nb, c)
            q_b = pad_rows(query[b], n_pad).view(heads, nb, c, dim)
            k_pad = padded(key[b], left, right, c, nb, "key")
            v_pad = padded(value[b], left, right, c, nb, "value")
            k_b, v_b = k_pad[:, left : left + n], v_pad[:, left : left + n]  # contiguous key[b], value[b]
            dq, dkw, dvw = FLASH_BACKWARD(
                go_b,
                q_b,
                windows(k_pad, width, c),
                windows(v_pad, width, c),
                o_b,
                lse_b,
                0.0,
                False,
                attn_mask=plan.band_mask[b],
                scale=scaling,
            )
            dk = fold_windows(dkw, left, n, c)
            dv = fold_windows(dvw, left, n, c)
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
                dq_g, dk_r, dv_r = FLASH_BACKWARD(
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
