"""Packed sparse weights for inference: compressed rows (CSR) or blocks of rows (BSR), fp32 values.

Compressed rows (`CSRWeight`): a weight (out_features, in_features) with keep-mask M is stored as
- ``rowptr``: int32 (out_features + 1,), the start of each row's entries;
- ``cols``: uint16 (nnz,) when in_features <= 65535, else int32, the kept columns, ascending in each row;
- ``vals``: fp32 (nnz,), the kept weights.
At 90% sparsity that is 6 bytes per kept weight, 0.15x of the dense fp32 bytes.

Blocks (`BSRWeight`): where the mask is made of whole, aligned R x C blocks (R in 2, 4, 8; the pattern
``block:RxC`` of the pruner), the kept blocks are stored block row by block row:
- ``rowptr``: int32 (out_features / R + 1,), the first block of each block row;
- ``cols``: uint16 / int32 (blocks,), the block column (input column / C);
- ``vals``: fp32 (blocks, C, R), each block column by column.
The block kernel reuses each input it loads for R output rows, so it is faster than the compressed-rows kernel at
the same sparsity (docs/results/runtime.md).

N:M (`NMWeight`): where every group of M consecutive inputs (M in 4, 8) of every row keeps exactly N weights (N <= M /
2: 1:4, 2:4, 1:8 ... 4:8), the rows are stored in blocks of 8:
- ``vals``: fp32 (ceil(out_features / 8), in_features / M, N, 8), the s-th kept weight of each group for each of the
  block's 8 rows (padding rows past the last hold zeros);
- ``idx``: int32 (ceil(out_features / 8), in_features / M, N), their positions in the group, 4 bits per row.
That is 4.5 bytes per kept weight (0.56x of dense at 2:4). The N:M kernel gives the 8 rows of a block their inputs by
vector permutes instead of gathering them, and runs at any token count without packing the tokens.

`pack_weight` picks the format from the mask: blocks, then N:M, then compressed rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from . import kernels

NARROW_LIMIT = 65535
BLOCK_ROWS = (8, 4, 2)
"""Block heights the block kernel runs, in order of preference (more rows share each input load)."""
BLOCK_COLS = (8, 4, 2, 1)


class _Packed:
    """What every packed format shares: its tensors (`FIELDS`, ``vals`` among them) and `shape` (out_features,
    in_features)."""

    FIELDS: tuple[str, ...] = ("rowptr", "cols", "vals")
    """The names of the format's tensors (a packed layer holds them as buffers)."""
    vals: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        """Kept weights (kept exact zeros included)."""
        return int(self.vals.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors by name (`FIELDS`)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self):
        """A copy with its own index and value tensors."""
        return replace(self, **{name: t.clone() for name, t in self.tensors().items()})


@dataclass
class CSRWeight(_Packed):
    """A packed weight; `shape` is (out_features, in_features)."""

    rowptr: torch.Tensor  # (out + 1,) int32
    cols: torch.Tensor  # (nnz,) uint16 or int32
    vals: torch.Tensor  # (nnz,) fp32
    shape: tuple[int, int]

    kind = "csr"

    def run(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int, activation: int = 0) -> torch.Tensor:
        """y = act(x W^T + b) by the native kernel; x (..., in) fp32 -> (..., out). `activation` is a code of
        `kernels.ACTIVATIONS` (0: none)."""
        return kernels.sparse_linear()(
            x, self.rowptr, self.cols, self.vals, bias, self.shape[1], isa, activation
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> CSRWeight:
        """Pack `weight` (out, in), keeping the entries of `mask` (default: the nonzeros). A kept exact zero stays
        an entry, so the mask comes back from `mask_dense`."""
        w, keep = _keep_mask(weight, mask)
        out_f, in_f = w.shape
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending columns within each row
        # per-row counts from the kept rows: a sum over the (out, in) mask would make an int64 copy of it first
        counts = torch.bincount(rows, minlength=out_f)  # (out,)
        rowptr = torch.zeros(out_f + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(counts, 0)
        if int(rowptr[-1]) >= 2**31:
            raise ValueError(f"weight {tuple(w.shape)} has too many kept entries for int32 row offsets")
        vals = w[rows, cols].contiguous()  # (nnz,), in the same order as w[keep]
        del rows
        col_dtype = torch.uint16 if in_f <= NARROW_LIMIT else torch.int32
        return cls(
            rowptr=rowptr.to(torch.int32),
            cols=cols.to(torch.int32).to(col_dtype).contiguous(),
            vals=vals,
            shape=(int(out_f), int(in_f)),
        )

    def row_indices(self) -> torch.Tensor:
        """The row of each entry (nnz,) int64."""
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0]), counts)

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight (out, in) fp32."""
        dense = torch.zeros(self.shape, dtype=torch.float32)
        dense[self.row_indices(), self.cols.to(torch.int64)] = self.vals
        return dense

    def mask_dense(self) -> torch.Tensor:
        """The keep-mask (out, in) bool."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[self.row_indices(), self.cols.to(torch.int64)] = True
        return mask

    def to_torch_csr(self) -> torch.Tensor:
        """torch's own sparse CSR tensor of the same weight (int64 indices), for the torch CSR path."""
        with warnings.catch_warnings():  # torch's "beta" and "invariant checks" notices, once per process
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.rowptr.to(torch.int64), self.cols.to(torch.int64), self.vals, size=self.shape
            )


def _keep_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"a packed weight must be 2-D, got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    keep = (w != 0) if mask is None else mask.detach().to(device="cpu", dtype=torch.bool)
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match weight shape {tuple(w.shape)}")
    return w, keep


def block_shape(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest (R, C) with R in `BLOCK_ROWS`, C in `BLOCK_COLS` such that `mask` (out, in) is a union of whole
    aligned R x C blocks (with at least one kept block), or None."""
    out_f, in_f = mask.shape
    if not bool(mask.any()):
        return None
    for rows in BLOCK_ROWS:
        if out_f % rows:
            continue
        for cols in BLOCK_COLS:
            if in_f % cols:
                continue
            blocks = mask.reshape(out_f // rows, rows, in_f // cols, cols)
            if torch.equal(blocks.any(dim=3).any(dim=1), blocks.all(dim=3).all(dim=1)):
                return rows, cols
    return None


@dataclass
class BSRWeight(_Packed):
    """A weight packed as kept R x C blocks; `shape` is (out_features, in_features), `block` is (R, C)."""

    rowptr: torch.Tensor  # (out / R + 1,) int32
    cols: torch.Tensor  # (blocks,) uint16 or int32: block columns
    vals: torch.Tensor  # (blocks, C, R) fp32
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def kind(self) -> str:
        return f"bsr{self.block[0]}x{self.block[1]}"

    def run(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int, activation: int = 0) -> torch.Tensor:
        """y = act(x W^T + b) by the native block kernel; x (..., in) fp32 -> (..., out)."""
        rows, cols = self.block
        return kernels.block_linear()(
            x, self.rowptr, self.cols, self.vals, bias, self.shape[1], rows, cols, isa, activation
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None, block: tuple[int, int]) -> BSRWeight:
        """Pack `weight` (out, in) whose keep-mask is made of whole aligned `block` (R, C) blocks."""
        w, keep = _keep_mask(weight, mask)
        out_f, in_f = w.shape
        rows, cols = block
        if rows not in BLOCK_ROWS or out_f % rows or in_f % cols:
            raise ValueError(
                f"block {block} does not tile weight {tuple(w.shape)} (block rows: {BLOCK_ROWS})"
            )
        blocks_keep = keep.reshape(out_f // rows, rows, in_f // cols, cols).any(dim=3).any(dim=1)  # (rb, cb)
        values = (
            (w * keep).reshape(out_f // rows, rows, in_f // cols, cols).permute(0, 2, 3, 1)
        )  # (rb, cb, C, R)
        rb, cb = blocks_keep.nonzero(as_tuple=True)  # row-major: ascending block columns in each block row
        rowptr = torch.zeros(out_f // rows + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(blocks_keep.sum(dim=1), 0)
        col_dtype = torch.uint16 if in_f // cols <= NARROW_LIMIT else torch.int32
        return cls(
            rowptr=rowptr.to(torch.int32),
            cols=cb.to(torch.int32).to(col_dtype).contiguous(),
            vals=values[rb, cb].contiguous(),
            shape=(int(out_f), int(in_f)),
            block=(int(rows), int(cols)),
        )

    def mask_dense(self) -> torch.Tensor:
        """The keep-mask (out, in) bool."""
        out_f, in_f = self.shape
        rows, cols = self.block
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        rb = torch.repeat_interleave(torch.arange(out_f // rows), counts)
        blocks = torch.zeros(out_f // rows, in_f // cols, dtype=torch.bool)
        blocks[rb, self.cols.to(torch.int64)] = True
        return blocks.repeat_interleave(rows, 0).repeat_interleave(cols, 1)

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight (out, in) fp32."""
        out_f, in_f = self.shape
        rows, cols = self.block
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        rb = torch.repeat_interleave(torch.arange(out_f // rows), counts)
        dense = torch.zeros(out_f // rows, in_f // cols, cols, rows)
        dense[rb, self.cols.to(torch.int64)] = self.vals
        return dense.permute(0, 3, 1, 2).reshape(out_f, in_f).contiguous()

    def to_torch_csr(self) -> torch.Tensor:
        """torch's own sparse CSR tensor of the same weight, for the torch CSR path."""
        return CSRWeight.from_dense(self.to_dense(), self.mask_dense()).to_torch_csr()


NM_GROUPS = (4, 8)
"""The group sizes M the N:M kernel runs, in order of preference (a 2:4 mask is also 4:8; 2:4 runs faster)."""
NM_SHIFTS = torch.arange(8, dtype=torch.int64) * 4
"""Bit offset of each row's position in an `NMWeight` ``idx`` entry."""


def nm_pattern(mask: torch.Tensor) -> tuple[int, int] | None:
    """(N, M) when every group of M consecutive inputs of every row of `mask` (out, in) keeps exactly N entries,
    with M in `NM_GROUPS` and 1 <= N <= M / 2; else None."""
    out_f, in_f = mask.shape
    for m in NM_GROUPS:
        if in_f % m or out_f == 0:
            continue
        n = int(mask[0, :m].sum())
        if _is_nm(mask, n, m):
            return n, m
    return None


def _is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether `mask` (out, in) keeps exactly `n` of every `m` consecutive inputs of every row (1 <= n <= m / 2)."""
    out_f, in_f = mask.shape
    if not (m in NM_GROUPS and 1 <= n <= m // 2) or in_f % m or out_f == 0:
        return False
    counts = mask.reshape(out_f, in_f // m, m).sum(dim=2, dtype=torch.int32)  # (out, in / M)
    return bool((counts == n).all())


@dataclass
class NMWeight(_Packed):
    """A weight whose keep-mask is N:M along the inputs, in blocks of 8 rows; `shape` is (out_features,
    in_features), `pattern` is (N, M)."""

    idx: torch.Tensor  # (ceil(out / 8), in / M, N) int32: 4 bits per row, row r in bits 4r..4r+3
    vals: torch.Tensor  # (ceil(out / 8), in / M, N, 8) fp32
    shape: tuple[int, int]
    pattern: tuple[int, int]

    FIELDS = ("idx", "vals")

    @property
    def kind(self) -> str:
        return f"nm{self.pattern[0]}:{self.pattern[1]}"

    @property
    def nnz(self) -> int:
        """Kept weights (kept exact zeros included; the padding rows of the last block not)."""
        n, m = self.pattern
        return self.shape[0] * self.shape[1] // m * n

    def run(self, x: torch.Tensor, bias: torch.Tensor | None, isa: int, activation: int = 0) -> torch.Tensor:
        """y = act(x W^T + b) by the native N:M kernel; x (..., in) fp32 -> (..., out)."""
        n, m = self.pattern
        return kernels.nm_linear()(
            x, self.idx, self.vals, bias, self.shape[1], self.shape[0], n, m, isa, activation
        )

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None, pattern: tuple[int, int]
    ) -> NMWeight:
        """Pack `weight` (out, in) whose keep-mask keeps exactly N of every M consecutive inputs of every row."""
        w, keep = _keep_mask(weight, mask)
        out_f, in_f = w.shape
        n, m = pattern
        if not _is_nm(keep, n, m):
            raise ValueError(f"the mask of weight {tuple(w.shape)} is not {n}:{m} along its inputs")
        groups, blocks = in_f // m, -(-out_f // 8)
        # the kept positions of each group, ascending (a stable sort of the kept flags puts them first)
        pos = keep.reshape(out_f, groups, m).to(torch.uint8).argsort(dim=2, descending=True, stable=True)
        pos = pos[..., :n]  # (out, G, N)
        vals = torch.gather(w.reshape(out_f, groups, m), 2, pos)  # (out, G, N)
        pad = blocks * 8 - out_f
        if pad:
            vals = torch.cat([vals, vals.new_zeros(pad, groups, n)])
            pos = torch.cat([pos, pos.new_zeros(pad, groups, n)])
        vals = vals.reshape(blocks, 8, groups, n).permute(0, 2, 3, 1).contiguous()  # (B, G, N, 8)
        packed = (pos.reshape(blocks, 8, groups, n).permute(0, 2, 3, 1) << NM_SHIFTS).sum(dim=3)  # (B, G, N)
        packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits
        return cls(
            idx=packed.contiguous(), vals=vals, shape=(int(out_f), int(in_f)), pattern=(int(n), int(m))
        )

    def _positions(self) -> torch.Tensor:
        """The kept positions (out, G, N) int64, each within its group."""
        pos = (self.idx.to(torch.int64).unsqueeze(3) >> NM_SHIFTS) & 15  # (B, G, N, 8)
        blocks, groups, n, _ = pos.shape
        return pos.permute(0, 3, 1, 2).reshape(blocks * 8, groups, n)[: self.shape[0]]

    def _scatter(self, src: torch.Tensor) -> torch.Tensor:
        out_f, in_f = self.shape
        n, m = self.pattern
        dense = torch.zeros(out_f, in_f // m, m, dtype=src.dtype)
        return dense.scatter_(2, self._positions(), src).reshape(out_f, in_f)

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight (out, in) fp32."""
        blocks, groups, n, _ = self.vals.shape
        vals = self.vals.permute(0, 3, 1, 2).reshape(blocks * 8, groups, n)[: self.shape[0]]
        return self._scatter(vals)

    def mask_dense(self) -> torch.Tensor:
        """The keep-mask (out, in) bool."""
        n = self.pattern[0]
        return self._scatter(torch.ones(self.shape[0], self.shape[1] // self.pattern[1], n, dtype=torch.bool))

    def to_torch_csr(self) -> torch.Tensor:
        """torch's own sparse CSR tensor of the same weight, for the torch CSR path."""
        return CSRWeight.from_dense(self.to_dense(), self.mask_dense()).to_torch_csr()


PackedWeight = CSRWeight | BSRWeight | NMWeight
"""Any packed format."""


def pack_weight(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedWeight:
    """`weight` (out, in) packed as blocks where its keep-mask is made of whole aligned blocks (`block_shape`), as
    N:M where it keeps N of every M inputs (`nm_pattern`), else as compressed rows."""
    w, keep = _keep_mask(weight, mask)
    block = block_shape(keep)
    if block is not None:
        return BSRWeight.from_dense(w, keep, block)
    pattern = nm_pattern(keep)
    if pattern is not None:
        return NMWeight.from_dense(w, keep, pattern)
    return CSRWeight.from_dense(w, keep)


__all__ = [
    "BLOCK_COLS",
    "BLOCK_ROWS",
    "NARROW_LIMIT",
    "NM_GROUPS",
    "BSRWeight",
    "CSRWeight",
    "NMWeight",
    "PackedWeight",
    "block_shape",
    "nm_pattern",
    "pack_weight",
]
