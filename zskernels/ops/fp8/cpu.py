"""fp8_linear / fp8_lowrank_matmul's fast CPU path.

torch converts fp8 e4m3 to float one element at a time on the CPU (about 30 ns an element, so
de-quantise-then-matmul spent ~25 ms on one 1536 x 576 matrix), and has no fp8 GEMM there. Each
fp8 weight is therefore re-encoded once to int8 rows with one scale per row (``_cpu.fp8_rows_as_int8``,
cached beside the stored tensors, which are left as they are) and multiplied by ``_cpu.int8_linear``:
the same bytes per weight as fp8. The re-encoding rounds each value to 1/254 of its row's absmax;
the accuracy this costs is measured in tests/zskernels/test_cpu_paths.py and zskernels/README.md.

  (a) dense:   y = x (q * s)^T                       q, s: weight_fp8 re-encoded, weight_scale folded in
  (b) lowrank: t = x (vt * v_scale)^T,  y = (t * u_scale) u^T   (u_scale sits on stage 2's reduction)
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _cpu

Tensor = torch.Tensor


def _finish(y: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        y = y + _cpu.as_dtype(bias, y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fp8_linear_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x W_hat^T + bias for form (a), in x's dtype."""
    q, scale = _cpu.fp8_rows_as_int8(packed["weight_fp8"], packed["weight_scale"])
    return _finish(_cpu.int8_linear(x.reshape(-1, x.shape[-1]), q, scale), x, bias)


def fp8_lowrank_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = (x V_hat) U_hat^T + bias for form (b), in x's dtype."""
    vq, v_scale = _cpu.fp8_rows_as_int8(packed["vt_fp8"], packed["v_scale"])
    uq, u_rows = _cpu.fp8_rows_as_int8(packed["u_fp8"])
    t = _cpu.int8_linear(x.reshape(-1, x.shape[-1]), vq, v_scale)
    return _finish(_cpu.int8_linear(t * _cpu.as_dtype(packed["u_scale"], t.dtype), uq, u_rows), x, bias)
