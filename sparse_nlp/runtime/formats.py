"""Packed sparse weights for inference: compressed rows (CSR) with narrow column indices, fp32 values.

A weight (out_features, in_features) with keep-mask M is stored as
- ``rowptr``: int32 (out_features + 1,), the start of each row's entries;
- ``cols``: uint16 (nnz,) when in_features <= 65535, else int32, the kept columns, ascending in each row;
- ``vals``: fp32 (nnz,), the kept weights.
At 90% sparsity that is 6 bytes per kept weight, 0.15x of the dense fp32 bytes. N:M and block-sparse weights use
the same format (their zeros are skipped the same way; no dedicated N:M or block kernel).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

NARROW_LIMIT = 65535


@dataclass
class CSRWeight:
    """A packed weight; `shape` is (out_features, in_features)."""

    rowptr: torch.Tensor  # (out + 1,) int32
    cols: torch.Tensor  # (nnz,) uint16 or int32
    vals: torch.Tensor  # (nnz,) fp32
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.vals.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.cols, self.vals))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> CSRWeight:
        """Pack `weight` (out, in), keeping the entries of `mask` (default: the nonzeros). A kept exact zero stays
        an entry, so the mask comes back from `mask_dense`."""
        if weight.dim() != 2:
            raise ValueError(f"a packed weight must be 2-D, got shape {tuple(weight.shape)}")
        w = weight.detach().to(device="cpu", dtype=torch.float32)
        keep = (w != 0) if mask is None else mask.detach().to(device="cpu", dtype=torch.bool)
        if keep.shape != w.shape:
            raise ValueError(f"mask shape {tuple(keep.shape)} does not match weight shape {tuple(w.shape)}")
        out_f, in_f = w.shape
        counts = keep.sum(dim=1, dtype=torch.int64)  # (out,)
        rowptr = torch.zeros(out_f + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(counts, 0)
        if int(rowptr[-1]) >= 2**31:
            raise ValueError(f"weight {tuple(w.shape)} has too many kept entries for int32 row offsets")
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending columns within each row
        del rows
        col_dtype = torch.uint16 if in_f <= NARROW_LIMIT else torch.int32
        return cls(
            rowptr=rowptr.to(torch.int32),
            cols=cols.to(torch.int32).to(col_dtype).contiguous(),
            vals=w[keep].contiguous(),
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


__all__ = ["NARROW_LIMIT", "CSRWeight"]
