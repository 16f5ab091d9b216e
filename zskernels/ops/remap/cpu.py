"""remap_matmul's fast CPU path: the 8-bit heads through int8 weight-only GEMMs, the 16-bit tails
through plain GEMMs, nothing de-quantised whole (``zskernels/_cpu.py`` has the building blocks).

    stage 1  t = x[:, :s] (v_q * v_scale)^T + x[:, s:] v_tail^T            (M, k)
    stage 2  y[:, :s] = (t * u_scale) u_q^T,   y[:, s:] = t u_tail^T          (M, out)

v_q is (k, s), row-major over the reduction, with one scale per row: exactly int8pack's weight.
u_scale sits on stage 2's reduction index, so it is folded into the rank-k intermediate (M x k
multiplies instead of s x k). fp8 heads are re-encoded once to int8 (``_cpu.fp8_rows_as_int8``).
Arguments are not checked here: ``remap_matmul`` checks them (``naive.check_call``) before calling.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _cpu

Tensor = torch.Tensor


def remap_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x V_hat U_hat^T + bias for x (..., in), in x's dtype."""
    v_q, v_tail, u_q, u_tail = packed["v_q"], packed["v_tail"], packed["u_q"], packed["u_tail"]
    s = v_q.shape[1]
    x2d = x.reshape(-1, x.shape[-1])
    head_v, scale_v = _cpu.rows_int8(v_q, packed["v_scale"])
    t = _cpu.int8_linear(x2d[:, :s] if v_tail.shape[1] else x2d, head_v, scale_v)
    if v_tail.shape[1]:
        t = t + _cpu.float_linear(x2d[:, s:], v_tail)
    head_u, scale_u = _cpu.rows_int8(u_q, None)
    y = _cpu.int8_linear(t * _cpu.as_dtype(packed["u_scale"], t.dtype), head_u, scale_u)
    if u_tail.shape[0]:
        y = torch.cat([y, _cpu.float_linear(t, u_tail)], dim=-1)
    if bias is not None:
        y = y + _cpu.as_dtype(bias, y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
