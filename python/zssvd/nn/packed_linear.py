"""Drop-in replacements for ``nn.Linear`` holding compressed weights in buffers.

``PackedLowRankLinear`` stores a factor pair W ~= U V^T (U: out x k, V: in x k) in one of

* ``fp32`` / ``fp16`` / ``bf16``: both factors in that dtype (k (out + in) values);
* ``remap``: 8-bit head and 16-bit tail, 2 k max(out, in) bytes plus scales (``zskernels.remap_matmul``);
* ``fp8``: both factors in fp8 e4m3 with per-component scales, k (out + in) bytes (``zskernels.fp8_matmul``);
* ``int4``: both factors in 4 bits with a float16 scale and min per group along the reduced dimension
  (``zskernels.int4_lowrank_matmul``).

``PackedDenseLinear`` keeps a full matrix in fp8 e4m3 with per-row scales (HQ mode's dense matrices) or
in int4 with per-group scales and mins (int4 mode's; ``DENSE_STORAGES``).

Each low-rank storage is one ``LowRankStorage`` entry in ``STORAGES`` (pack, forward, unpack,
nbytes): a new storage is one ``register_storage`` call, not a branch in every method.

No dense weight is ever materialised by the packed formats' kernels. Every module can
``describe()`` its layout as JSON and be rebuilt empty from that description
(``from_description``), which is how checkpoints are loaded without pickle; ``describe_packed``
collects the descriptions of a model's packed modules (a checkpoint's manifest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _kernels():
    """``zskernels`` on first use, so that importing zssvd does not import Triton."""
    import zskernels

    return zskernels

FLOAT_STORAGES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Tensors = dict[str, torch.Tensor]


def tensor_bytes(tensors: Tensors) -> int:
    """Bytes of a dict of tensors as they sit in memory."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class LowRankStorage:
    """How one storage packs a factor pair W ~= U V^T (U: out x k, V: in x k) and computes with it.

    ``pack(U, V) -> tensors``; ``forward(x, tensors, bias, backend) -> y = x V U^T + bias``;
    ``unpack(tensors) -> (U, V)`` in float32; ``nbytes(tensors)``: the bytes it costs.
    """

    name: str
    pack: Callable[[torch.Tensor, torch.Tensor], Tensors]
    forward: Callable[[torch.Tensor, Tensors, torch.Tensor | None, str], torch.Tensor]
    unpack: Callable[[Tensors], tuple[torch.Tensor, torch.Tensor]]
    nbytes: Callable[[Tensors], int] = tensor_bytes


STORAGES: dict[str, LowRankStorage] = {}


def register_storage(storage: LowRankStorage) -> LowRankStorage:
    """Add (or replace) a low-rank storage by name."""
    STORAGES[storage.name] = storage
    return storage


def _float_storage(name: str, dtype: torch.dtype) -> LowRankStorage:
    def forward(x, t, bias, backend):
        bias = bias.to(x.dtype) if bias is not None else None
        if x.device.type == "cpu":  # a factor in another dtype is converted in cache-sized chunks
            y = _kernels()._cpu.float_linear(_kernels()._cpu.float_linear(x, t["weight_v"]), t["weight_u"])
            return y if bias is None else y + bias
        return F.linear(F.linear(x, t["weight_v"].to(x.dtype)), t["weight_u"].to(x.dtype), bias)

    return LowRankStorage(
        name,
        pack=lambda U, V: {"weight_u": U.to(dtype).contiguous(), "weight_v": V.T.to(dtype).contiguous()},
        forward=forward,
        unpack=lambda t: (t["weight_u"].float(), t["weight_v"].T.float()))


for _name, _dtype in FLOAT_STORAGES.items():
    register_storage(_float_storage(_name, _dtype))
register_storage(LowRankStorage(
    "remap",  # 8-bit head + 16-bit tail (zskernels.remap_matmul)
    pack=lambda U, V: _kernels().pack_remap(U, V),
    forward=lambda x, t, bias, backend: _kernels().remap_matmul(x, t, bias, backend=backend),
    unpack=lambda t: _kernels().unpack_remap(t)))
register_storage(LowRankStorage(
    "fp8",  # both factors in fp8 e4m3, per-component scales (zskernels.fp8_lowrank_matmul)
    pack=lambda U, V: _kernels().pack_fp8_lowrank(U, V),
    forward=lambda x, t, bias, backend: _kernels().fp8_lowrank_matmul(x, t, bias, backend=backend),
    unpack=lambda t: _kernels().dequantize_fp8(t)))
register_storage(LowRankStorage(
    "int4",  # both factors in 4 bits, float16 scale + min per group (zskernels.int4_lowrank_matmul); the group
    # size is the codes' padded width over the groups per row, so a checkpoint's shapes carry it (per factor:
    # ``u_group_size`` gives U its own, e.g. a precision chosen by measurement, zssvd.stages.precision)
    pack=lambda U, V, group_size=64, u_group_size=None: _kernels().pack_int4_lowrank(U, V, group_size, u_group_size),
    forward=lambda x, t, bias, backend: _kernels().int4_lowrank_matmul(x, t, bias, backend=backend),
    unpack=lambda t: _kernels().unpack_int4_lowrank(t)))
LOWRANK_STORAGES = tuple(STORAGES)  # the built-in ones
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


def _storage(name: str) -> LowRankStorage:
    if name not in STORAGES:
        raise ValueError(f"storage must be one of {tuple(STORAGES)}, got {name!r}")
    return STORAGES[name]


class _PackedBase(nn.Module):
    """Buffers from a dict of named tensors, plus the JSON description of that layout.

    The packed buffers keep their stored dtypes through ``.float()``, ``.half()``, ``.to(dtype)``
    (Hugging Face idioms that cast a whole model): those casts change the activations' dtype, which
    every storage computes in, and the bias; a device move applies to everything.
    """

    kind = ""

    def _apply(self, fn, recurse=True):
        stored = {name: self._buffers[name] for name in self._buffer_names}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            if self._buffers[name].dtype != before.dtype:  # a dtype cast: keep the stored values, take the device
                self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: x has shape {tuple(x.shape)}; its last dimension must be "
                             f"in_features = {self.in_features}")

    def _set_buffers(self, tensors: dict[str, torch.Tensor]) -> None:
        self._buffer_names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def packed(self) -> dict[str, torch.Tensor]:
        buffers = self._buffers  # not getattr: nn.Module's attribute fallback costs a microsecond a name per call
        return {name: buffers[name] for name in self._buffer_names}

    def _weight_nbytes(self) -> int:
        return tensor_bytes(self.packed())

    def nbytes(self) -> int:
        """Bytes of the packed weights (and bias) as they sit in memory."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self._weight_nbytes() + bias

    def _tensor_layout(self) -> dict:
        return {name: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]} for name, t in self.packed().items()}

    @staticmethod
    def _empty_tensors(layout: dict) -> dict[str, torch.Tensor]:
        return {name: torch.empty(spec["shape"], dtype=DTYPES_BY_NAME[spec["dtype"]])
                for name, spec in layout.items()}

    def _init_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                                 or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"{type(self).__name__}: bias must be a floating-point tensor of shape "
                             f"({self.out_features},), got {getattr(bias, 'dtype', type(bias).__name__)} "
                             f"{tuple(getattr(bias, 'shape', ()))}")
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
        _storage(storage)  # a known storage, or a clear error
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
        tensors = _storage(storage).pack(U, V)
        if storage in FLOAT_STORAGES and not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"factors overflow {storage} (largest |value| {max(U.abs().max(), V.abs().max()):.3g}); "
                             f"pack them with storage='bf16' or 'fp32'")
        return cls(in_features, out_features, rank, storage, tensors, bias)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        self._check_input(x)
        return _storage(self.storage).forward(x, self.packed(), self.bias, backend)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors, de-quantised to float32 (for tests and analysis)."""
        return _storage(self.storage).unpack(self.packed())

    def _weight_nbytes(self) -> int:
        return _storage(self.storage).nbytes(self.packed())

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


# Storages of a full matrix: name -> the zskernels (quantize, linear, dequantize) functions, and the prefix
# of its buffers (int4's "in_features" would clash with the module's attribute: stored as "weight_in_features").
DENSE_STORAGES = {"fp8": ("quantize_fp8_dense", "fp8_linear", "dequantize_fp8", ""),
                  "int4": ("quantize_int4", "int4_linear", "dequantize_int4", "weight_")}


def _dense_op(storage: str, role: int):
    return getattr(_kernels(), DENSE_STORAGES[storage][role])


def dense_buffers(storage: str, tensors: Tensors) -> Tensors:
    """A dense storage's quantiser output under the names a module (and a checkpoint) stores them."""
    prefix = DENSE_STORAGES[storage][3]
    return {prefix + name: t for name, t in tensors.items()}


def dense_kernel_tensors(storage: str, buffers: Tensors) -> Tensors:
    """The inverse of ``dense_buffers``: the dict the storage's zskernels ops take."""
    prefix = DENSE_STORAGES[storage][3]
    return {name[len(prefix):]: t for name, t in buffers.items()}


def dense_forward(storage: str, x: torch.Tensor, buffers: Tensors, bias: torch.Tensor | None,
                  backend: str = "auto") -> torch.Tensor:
    """y = x W^T + b over a full matrix stored (under its module buffer names) in a dense storage."""
    return _dense_op(storage, 1)(x, dense_kernel_tensors(storage, buffers), bias, backend=backend)


class PackedDenseLinear(_PackedBase):
    """A full matrix in fp8 e4m3 with per-row scales (HQ mode's matrices kept dense) or in int4 with a
    float16 scale and min per group of inputs (int4 mode's)."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, storage: str, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        if storage not in DENSE_STORAGES:
            raise ValueError(f"PackedDenseLinear storage must be one of {tuple(DENSE_STORAGES)}, got {storage!r}")
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        self._set_buffers(tensors)
        self._init_bias(bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, storage: str = "fp8",
                    **options) -> "PackedDenseLinear":
        """Quantise ``weight`` (out x in); ``options`` go to the quantiser (int4: ``group_size``)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        if storage not in DENSE_STORAGES:
            raise ValueError(f"PackedDenseLinear storage must be one of {tuple(DENSE_STORAGES)}, got {storage!r}")
        tensors = dense_buffers(storage, _dense_op(storage, 0)(weight, **options))
        return cls(weight.shape[1], weight.shape[0], storage, tensors, bias)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return dense_forward(self.storage, x, self.packed(), self.bias, backend)

    def kernel_tensors(self) -> Tensors:
        """The packed tensors as the storage's zskernels ops name them."""
        return dense_kernel_tensors(self.storage, self.packed())

    def dense_weight(self) -> torch.Tensor:
        return _dense_op(self.storage, 2)(self.kernel_tensors())

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


def packed_modules(model: nn.Module) -> dict[str, _PackedBase]:
    """Every packed module of ``model`` by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _PackedBase)}


def describe_packed(model: nn.Module) -> dict[str, dict]:
    """{qualified name: ``describe()``} of every packed module: the modules part of a checkpoint's manifest."""
    return {name: m.describe() for name, m in packed_modules(model).items()}
