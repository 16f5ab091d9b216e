"""Drop-in replacements for ``nn.Linear`` holding compressed weights in buffers.

``PackedLowRankLinear`` stores a factor pair W ~= U V^T (U: out x k, V: in x k) in one of

* ``fp32`` / ``fp16`` / ``bf16``: both factors in that dtype (k (out + in) values);
* ``remap``: 8-bit head and 16-bit tail, 2 k max(out, in) bytes plus scales (``zskernels.remap_matmul``);
* ``fp8``: both factors in fp8 e4m3 with per-component scales, k (out + in) bytes (``zskernels.fp8_matmul``).

``PackedDenseLinear`` keeps a full matrix in fp8 e4m3 with per-row scales (HQ mode's dense matrices).

No dense weight is ever materialised by the packed formats' kernels. Every module can
``describe()`` its layout as JSON and be rebuilt empty from that description
(``from_description``), which is how checkpoints are loaded without pickle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zskernels

FLOAT_STORAGES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOWRANK_STORAGES = (*FLOAT_STORAGES, "remap", "fp8")
DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8",
    torch.uint8: "uint8", torch.float8_e4m3fn: "float8_e4m3fn", torch.int32: "int32", torch.int64: "int64",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def storage_for_dtype(dtype: torch.dtype) -> str:
    """The float storage matching a model dtype (fp32 / fp16 / bf16)."""
    for name, dt in FLOAT_STORAGES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no float storage for dtype {dtype}")


class _PackedBase(nn.Module):
    """Buffers from a dict of named tensors, plus the JSON description of that layout."""

    kind = ""

    def _set_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        self._buffer_names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._buffer_names}

    def nbytes(self) -> int:
        """Bytes of the packed weights (and bias) as they sit in memory."""
        total = sum(t.numel() * t.element_size() for t in self.packed().values())
        return total + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def _tensor_layout(self) -> dict:
        return {name: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]} for name, t in self.packed().items()}

    @staticmethod
    def _empty_tensors(layout: dict) -> dict[str, torch.Tensor]:
        return {name: torch.empty(spec["shape"], dtype=DTYPES_BY_NAME[spec["dtype"]])
                for name, spec in layout.items()}

    def _init_bias(self, bias: torch.Tensor | None) -> None:
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """An ``nn.Linear`` with the de-quantised weight: the unpacked reference of this module."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class PackedLowRankLinear(_PackedBase):
    """y = x V U^T + b over factors packed in ``storage``."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, storage: str,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        if storage not in LOWRANK_STORAGES:
            raise ValueError(f"storage must be one of {LOWRANK_STORAGES}, got {storage!r}")
        self.in_features, self.out_features, self.rank, self.storage = in_features, out_features, rank, storage
        self._set_buffers(tensors)
        self._init_bias(bias)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                     storage: str = "fp16") -> "PackedLowRankLinear":
        """Pack W ~= U V^T (U: out x k, V: in x k)."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(f"need U (out x k) and V (in x k) with the same k, got {tuple(U.shape)} "
                             f"and {tuple(V.shape)}")
        if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise ValueError("factors contain NaN/Inf")
        out_features, rank = U.shape
        in_features = V.shape[0]
        if storage in FLOAT_STORAGES:
            dtype = FLOAT_STORAGES[storage]
            tensors = {"weight_u": U.to(dtype).contiguous(), "weight_v": V.T.to(dtype).contiguous()}
        elif storage == "remap":
            tensors = zskernels.pack_remap(U, V)
        elif storage == "fp8":
            tensors = zskernels.pack_fp8_lowrank(U, V)
        else:
            raise ValueError(f"storage must be one of {LOWRANK_STORAGES}, got {storage!r}")
        return cls(in_features, out_features, rank, storage, tensors, bias)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        if self.storage in FLOAT_STORAGES:
            u, v = self.weight_u.to(x.dtype), self.weight_v.to(x.dtype)
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(F.linear(x, v), u, bias)
        if self.storage == "remap":
            return zskernels.remap_matmul(x, self.packed(), self.bias, backend=backend)
        return zskernels.fp8_lowrank_matmul(x, self.packed(), self.bias, backend=backend)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors, de-quantised to float32 (for tests and analysis)."""
        if self.storage in FLOAT_STORAGES:
            return self.weight_u.float(), self.weight_v.T.float()
        if self.storage == "remap":
            return zskernels.unpack_remap(self.packed())
        return zskernels.dequantize_fp8(self.packed())

    def dense_weight(self) -> torch.Tensor:
        U, V = self.factors()
        return U @ V.T

    def describe(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "storage": self.storage, "bias": self.bias is not None,
                "tensors": self._tensor_layout(), "nbytes": self.nbytes()}

    @classmethod
    def from_description(cls, desc: dict, bias_dtype: torch.dtype = torch.float32) -> "PackedLowRankLinear":
        bias = torch.empty(desc["out_features"], dtype=bias_dtype) if desc["bias"] else None
        return cls(desc["in_features"], desc["out_features"], desc["rank"], desc["storage"],
                   cls._empty_tensors(desc["tensors"]), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"storage={self.storage}, bias={self.bias is not None}, bytes={self.nbytes()}")


class PackedDenseLinear(_PackedBase):
    """A full matrix in fp8 e4m3 with per-row scales (HQ mode's matrices kept dense)."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, storage: str, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        if storage != "fp8":
            raise ValueError(f"PackedDenseLinear supports storage 'fp8' only, got {storage!r}")
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        self._set_buffers(tensors)
        self._init_bias(bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    storage: str = "fp8") -> "PackedDenseLinear":
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        return cls(weight.shape[1], weight.shape[0], storage, zskernels.quantize_fp8_dense(weight), bias)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return zskernels.fp8_linear(x, self.packed(), self.bias, backend=backend)

    def dense_weight(self) -> torch.Tensor:
        return zskernels.dequantize_fp8(self.packed())

    def describe(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "storage": self.storage, "bias": self.bias is not None, "tensors": self._tensor_layout(),
                "nbytes": self.nbytes()}

    @classmethod
    def from_description(cls, desc: dict, bias_dtype: torch.dtype = torch.float32) -> "PackedDenseLinear":
        bias = torch.empty(desc["out_features"], dtype=bias_dtype) if desc["bias"] else None
        return cls(desc["in_features"], desc["out_features"], desc["storage"],
                   cls._empty_tensors(desc["tensors"]), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}, "
                f"bias={self.bias is not None}, bytes={self.nbytes()}")


def module_from_description(desc: dict, bias_dtype: torch.dtype = torch.float32) -> nn.Module:
    kinds = {PackedLowRankLinear.kind: PackedLowRankLinear, PackedDenseLinear.kind: PackedDenseLinear}
    if desc.get("kind") not in kinds:
        raise ValueError(f"unknown packed module kind {desc.get('kind')!r}")
    return kinds[desc["kind"]].from_description(desc, bias_dtype)
