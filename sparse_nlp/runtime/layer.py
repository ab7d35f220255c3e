"""`SparseLinear`: a packed drop-in for ``nn.Linear`` (and transformers' ``Conv1D``) for CPU inference.

The layer holds the weight packed (`CSRWeight`; `BSRWeight` for block-sparse masks, `NMWeight` for N:M ones), its
bias, and a plan: which product to run for each token-count bucket (``native``: this package's kernel, ``torch_csr``: torch's sparse CSR matmul, ``dense``: ``F.linear`` on
the masked dense weight, kept only when the plan uses it). ``weight`` reads as the masked dense weight (built on
access), and ``state_dict`` writes it under the usual key, so a converted model saves a normal checkpoint. A layer
packed by a keep-mask records it without storing it: the packed index is the mask (`SparseLinear.derived_mask`,
read by `sparse_nlp.pruning.masking.get_mask`), so `save_pretrained` writes the masks too.
Forward only: a backward through the layer raises `SparseRuntimeError`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseRuntimeError
from . import kernels
from .formats import PackedWeight, pack_weight

METHODS = ("native", "torch_csr", "dense")
BUCKETS = (1, 16, 128, 512)
"""Token counts the plan is made for; a call with T tokens uses the bucket nearest to T on a log scale."""


def bucket_of(tokens: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The bucket nearest to `tokens` on a log scale (geometric midpoints between buckets)."""
    for low, high in zip(buckets, buckets[1:]):
        if tokens * tokens <= low * high:
            return low
    return buckets[-1]


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: SparseLinear) -> torch.Tensor:
        return layer._product(x.detach(), None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx, grad):
        raise SparseRuntimeError(
            "a layer packed by sparse_nlp.runtime.convert is inference-only and has no backward; train the masked "
            "dense model (sparse_nlp.runtime.revert(model) undoes the conversion) and convert it afterwards."
        )


class SparseLinear(nn.Module):
    """y = x W^T + b with W packed as compressed rows; `transposed` mirrors transformers' Conv1D weight layout."""

    def __init__(
        self,
        csr: PackedWeight,
        bias: torch.Tensor | None,
        plan: dict[int, str],
        *,
        transposed: bool = False,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        bad = sorted(set(plan.values()) - set(METHODS))
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
        self.out_features, self.in_features = csr.shape
        self.transposed = transposed
        self.plan = {int(k): v for k, v in sorted(plan.items())}
        self.buckets = tuple(self.plan)
        self._methods: dict[
            int, str
        ] = {}  # token count -> method, memoized (the per-call cost matters at batch 1)
        self._set_csr(csr)
        self.activation: str | None = None
        """An activation applied to the output (``"gelu"``), set by `fuse_activations`; None: the plain product."""
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.keeps_mask = mask is not None
        """Whether the layer records its keep-mask, so that `save_pretrained` writes it (`derived_mask`)."""
        if mask is not None and (
            tuple(mask.shape[::-1] if transposed else mask.shape) != csr.shape
            or int(torch.count_nonzero(mask)) != csr.nnz
        ):  # a cheap check (no dense temporaries): the full one would double the transient memory of a load
            raise SparseRuntimeError(
                "the mask given to SparseLinear differs from the one its weight was packed by; pack the weight "
                "with that mask (pack_weight(weight, mask))."
            )

    def derived_mask(self) -> torch.Tensor | None:
        """The keep-mask in the layout of ``weight`` (bool), rebuilt from the packed index; None when the layer
        records no mask.

        The packed entries are exactly the kept weights of the mask the layer was packed by (a kept exact zero
        stays an entry), so the mask costs no memory of its own; `sparse_nlp.pruning.masking.get_mask` reads it.
        """
        if not self.keeps_mask:
            return None
        mask = self.csr.mask_dense()  # (out, in)
        return mask.t().contiguous() if self.transposed else mask

    def _set_csr(self, csr: PackedWeight) -> None:
        previous = getattr(self, "csr", None)
        for name in set(previous.FIELDS if previous is not None else ()) - set(csr.FIELDS):
            del self._buffers[name]  # a repack into another format
        self.csr = csr
        self._fp32 = csr.vals.dtype is torch.float32
        for name, tensor in csr.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        methods = set(self.plan.values())
        dense = csr.to_dense() if "dense" in methods else None
        self.register_buffer("dense_weight", dense, persistent=False)
        self._torch_csr = csr.to_torch_csr() if "torch_csr" in methods else None

    def _apply(self, fn, recurse=True):
        """Keep the packed weight's tensors the layer's buffers after ``.to()`` / ``.share_memory()`` etc."""
        result = super()._apply(fn, recurse)
        self.csr = replace(self.csr, **{name: self._buffers[name] for name in self.csr.FIELDS})
        self._fp32 = self.vals.dtype is torch.float32
        return result

    # ---- the dense view: what state_dict, save_pretrained and user code read ----------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The masked dense weight, built on access ((out, in); (in, out) for a converted Conv1D)."""
        dense = self.csr.to_dense()
        return dense.t().contiguous() if self.transposed else dense

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            weight = state_dict[key].to(torch.float32)
            weight = weight.t() if self.transposed else weight
            if tuple(weight.shape) != self.csr.shape:
                error_msgs.append(f"{key}: shape {tuple(weight.shape)} does not match {self.csr.shape}")
            else:
                mask = self.csr.mask_dense() if self.keeps_mask else None  # (out, in)
                self._set_csr(pack_weight(weight, mask))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        known = {key, prefix + "bias"}
        if strict:
            for name in state_dict:
                if name.startswith(prefix) and name not in known and "." not in name[len(prefix) :]:
                    unexpected_keys.append(name)

    # ---- forward ------------------------------------------------------------------------------------------------
    def method_for(self, tokens: int) -> str:
        """The product the plan runs for a call with `tokens` tokens (dense when the native kernel is missing)."""
        method = self._methods.get(tokens)
        if method is None:
            method = self.plan[bucket_of(tokens, self.buckets)]
            if method == "native" and kernels.ops() is None:
                method = "dense"
            self._methods[tokens] = method
        return method

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the per-call cost matters at batch-1 decoding (one call per layer per token): the native op takes x of
        # any shape, and nothing here goes through nn.Module attribute lookup but `bias`, passed in
        method = self.method_for(x.numel() // self.in_features)  # memoized per token count
        if method == "native":
            act = 0 if self.activation is None else kernels.ACTIVATIONS[self.activation]
            return self.csr.run(x, bias, kernels.best_isa(), act)  # (..., N)
        x2d = x.reshape(-1, self.in_features)  # (T, K)
        if method == "torch_csr":
            y = (self._torch_csr @ x2d.t()).t()  # (T, N)
            y = y + bias if bias is not None else y.contiguous()
        else:
            weight = self.dense_weight if self.dense_weight is not None else self.csr.to_dense()
            y = F.linear(x2d, weight, bias)
        if self.activation is not None:  # "gelu", the only one fused
            y = F.gelu(y)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype is not torch.float32
            or x.device.type != "cpu"
            or x.shape[-1] != self.in_features
            or not self._fp32
        ):
            self._refuse(x)
        if torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            return _NoBackward.apply(x, self.bias, self)
        return self._product(x, self.bias)

    def _refuse(self, x: torch.Tensor) -> None:
        """Raise the error that says why `x` (or this layer) cannot run."""
        if self.vals.dtype != torch.float32:
            raise SparseRuntimeError(
                f"a layer packed by sparse_nlp.runtime.convert holds fp32 weights but was cast to {self.vals.dtype}; "
                "cast the model before converting it, or keep it in float32."
            )
        if x.dtype != torch.float32:
            raise SparseRuntimeError(
                f"a layer packed by sparse_nlp.runtime.convert runs fp32 inputs only, got {x.dtype}; "
                "run the model in float32 (model.float()) or do not convert it."
            )
        if x.device.type != "cpu":
            raise SparseRuntimeError(
                f"a layer packed by sparse_nlp.runtime.convert runs on the CPU only, got an input on {x.device}."
            )
        raise SparseRuntimeError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}.")

    def extra_repr(self) -> str:
        plan = ", ".join(f"{k}:{v}" for k, v in self.plan.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.csr.kind}, density={self.csr.density:.3f}, plan={{{plan}}}"
            + (f", activation={self.activation}" if self.activation is not None else "")
        )


__all__ = ["BUCKETS", "METHODS", "SparseLinear", "SparseRuntimeError", "bucket_of"]
