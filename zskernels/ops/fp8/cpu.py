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

from typing import NamedTuple, Optional

import torch

from ... import _cpu
from .naive import check_call

Tensor = torch.Tensor


class _Plan(NamedTuple):
    in_features: int
    first: _cpu.Int8Rows             # (a) the weight; (b) stage 1's vt with v_scale
    second: Optional[_cpu.Int8Rows]  # (b) stage 2's u, re-encoded per row (None for (a))
    u_scale: Optional[Tensor]        # (b) stage 2's per-component scale, in x's dtype
    out_features: int


def _plan(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], form: str, op: str) -> _Plan:
    def make() -> _Plan:
        in_features, out_features = check_call(x, packed, bias, form, op)
        if form == "dense":  # rows scaled to 448 when packed: TP column slices re-encode consistently
            return _Plan(in_features, _cpu.int8_rows(packed["weight_fp8"], packed["weight_scale"], x.dtype,
                                                     normalised=True), None, None, out_features)
        width = _cpu.intermediate_width(packed["u_scale"].shape[0], x.dtype)  # t, ready for stage 2's int8pack
        return _Plan(in_features,
                     _cpu.int8_rows(packed["vt_fp8"], packed["v_scale"], x.dtype, normalised=True, out_rows=width),
                     _cpu.int8_rows(packed["u_fp8"], None, x.dtype, in_cols=width),
                     _cpu.component_scale(packed["u_scale"], width, x.dtype), out_features)

    return _cpu.plan(op, x.dtype, packed, make)


def _rows(x: Tensor, plan: _Plan, packed: dict[str, Tensor], bias: Optional[Tensor], form: str, op: str) -> Tensor:
    _cpu.check_fits(x, bias, plan, lambda: check_call(x, packed, bias, form, op))
    return _cpu.rows_of(x)


@_cpu.opaque_when_compiled("fp8_linear", lambda packed: packed["weight_fp8"].shape[0])
def fp8_linear_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x W_hat^T + bias for form (a), in x's dtype."""
    plan = _plan(x, packed, bias, "dense", "fp8_linear")
    x2d = _rows(x, plan, packed, bias, "dense", "fp8_linear")
    return _cpu.finish(_cpu.int8_apply(x2d, packed["weight_fp8"], plan.first), x, bias)


@_cpu.opaque_when_compiled("fp8_lowrank_matmul", lambda packed: packed["u_fp8"].shape[0])
def fp8_lowrank_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = (x V_hat) U_hat^T + bias for form (b), in x's dtype."""
    plan = _plan(x, packed, bias, "lowrank", "fp8_lowrank_matmul")
    x2d = _rows(x, plan, packed, bias, "lowrank", "fp8_lowrank_matmul")
    t = _cpu.int8_apply(x2d, packed["vt_fp8"], plan.first)
    return _cpu.finish(_cpu.int8_apply(t * plan.u_scale, packed["u_fp8"], plan.second), x, bias)
