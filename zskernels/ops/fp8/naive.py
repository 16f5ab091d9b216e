"""fp8_linear / fp8_lowrank_matmul in plain torch: argument checks shared with the kernel path,
and the references (fp32 math; the CPU fallback and what the tests compare the kernels with)."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_x_bias_device, finish
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
    check_x_bias_device(x, packed, bias, in_features, out_features, op)
    return in_features, out_features


def fp8_linear_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (a): dequantise W, matmul in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "dense", "fp8_linear_reference")
    return finish(x.float() @ dequantize_fp8(packed).T, bias, x.dtype)


def fp8_lowrank_matmul_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (b): dequantise U and V, two matmuls in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "lowrank", "fp8_lowrank_matmul_reference")
    u_hat, v_hat = dequantize_fp8(packed)
    return finish((x.float() @ v_hat) @ u_hat.T, bias, x.dtype)

