"""fp8_linear / fp8_lowrank_matmul in plain torch: argument checks shared with the kernel path,
and the references (fp32 math; the CPU fallback and what the tests compare the kernels with)."""
from __future__ import annotations

from typing import Optional

import torch

from ..._backend import check_same_device
from ...formats.fp8 import dequantize_fp8, packed_form

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_call(x: torch.Tensor, packed: dict, bias: Optional[torch.Tensor], form: str, op: str) -> tuple[int, int]:
    """Validate x, packed and bias for ``op``; return (in_features, out_features)."""
    if packed_form(packed) != form:
        other = "fp8_lowrank_matmul" if form == "dense" else "fp8_linear"
        raise ValueError(f"{op} got a packed dict of the other form; use {other} for it")
    if not isinstance(x, torch.Tensor) or x.dtype not in X_DTYPES:
        raise TypeError(f"{op}: x must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if form == "dense":
        out_features, in_features = packed["weight_fp8"].shape
    else:
        out_features, in_features = packed["u_fp8"].shape[0], packed["vt_fp8"].shape[1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must be (..., {in_features}), got shape {tuple(x.shape)}")
    tensors = {"x": x, **packed}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias must be a floating-point tensor of shape ({out_features},), got "
                             f"{getattr(bias, 'dtype', None)} {tuple(getattr(bias, 'shape', ()))}")
        tensors["bias"] = bias
    check_same_device(**tensors)
    return in_features, out_features


def _finish(y32: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y32 = y32 + bias.float()
    return y32.to(dtype)


def fp8_linear_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (a): dequantise W, matmul in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "dense", "fp8_linear_reference")
    return _finish(x.float() @ dequantize_fp8(packed).T, bias, x.dtype)


def fp8_lowrank_matmul_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (b): dequantise U and V, two matmuls in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "lowrank", "fp8_lowrank_matmul_reference")
    u_hat, v_hat = dequantize_fp8(packed)
    return _finish((x.float() @ v_hat) @ u_hat.T, bias, x.dtype)

