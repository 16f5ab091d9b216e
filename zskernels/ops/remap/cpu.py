"""remap_matmul's fast CPU path: the 8-bit heads through int8 weight-only GEMMs, the 16-bit tails
through plain GEMMs, nothing de-quantised whole (``zskernels/_cpu.py`` has the building blocks).

    stage 1  t = x[:, :s] (v_q * v_scale)^T + x[:, s:] v_tail^T            (M, k)
    stage 2  y[:, :s] = (t * u_scale) u_q^T,   y[:, s:] = t u_tail^T          (M, out)

v_q is (k, s), row-major over the reduction, with one scale per row: exactly int8pack's weight.
u_scale sits on stage 2's reduction index, so it is folded into the rank-k intermediate (M x k
multiplies instead of s x k). fp8 heads are re-encoded once to int8 (``_cpu.fp8_rows_as_int8``).
The arguments are checked once per packed dict and x dtype, when the plan is built; a call on the
same tensors checks only x's last dimension.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import _cpu
from .naive import check_call

Tensor = torch.Tensor


class _Plan(NamedTuple):
    in_features: int
    head: int               # s: the rows of each factor held in 8 bits
    v: _cpu.Int8Rows        # stage 1's 8-bit weight v_q with v_scale
    u: _cpu.Int8Rows        # stage 2's 8-bit weight u_q (per-row scale 1)
    u_scale: Tensor         # stage 2's per-component scale, in x's dtype
    out_features: int


def _plan(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor]) -> _Plan:
    def make() -> _Plan:
        lay = check_call(x, packed, bias, "remap_matmul")
        return _Plan(lay.in_features, lay.head,
                     _cpu.int8_rows(packed["v_q"], packed["v_scale"], x.dtype, normalised=True),
                     _cpu.int8_rows(packed["u_q"], None, x.dtype),
                     packed["u_scale"].to(x.dtype, copy=True), lay.out_features)

    return _cpu.plan("remap", x.dtype, packed, make)


@_cpu.opaque_when_compiled("remap_matmul", lambda packed: packed["u_q"].shape[0] + packed["u_tail"].shape[0])
def remap_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x V_hat U_hat^T + bias for x (..., in), in x's dtype."""
    plan = _plan(x, packed, bias)
    if x.dim() < 1 or x.shape[-1] != plan.in_features or not _cpu.bias_fits(bias, plan.out_features):
        check_call(x, packed, bias, "remap_matmul")  # raises, naming what it needs
    v_tail, u_tail, s = packed["v_tail"], packed["u_tail"], plan.head
    x2d = x.reshape(-1, x.shape[-1])
    if v_tail.shape[1]:
        t = _cpu.int8_apply(x2d[:, :s], packed["v_q"], plan.v) + _cpu.float_linear(x2d[:, s:], v_tail)
    else:
        t = _cpu.int8_apply(x2d, packed["v_q"], plan.v)
    y = _cpu.int8_apply(t * plan.u_scale, packed["u_q"], plan.u)
    if u_tail.shape[0]:
        y = torch.cat([y, _cpu.float_linear(t, u_tail)], dim=-1)
    return _cpu.finish(y, x, bias)
