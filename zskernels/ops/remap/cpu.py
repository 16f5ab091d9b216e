"""remap_matmul's fast CPU path: int8 weight-only GEMMs, nothing de-quantised per call
(``zskernels/_cpu.py`` has the building blocks).

16-bit activations (what serving on the CPU uses): the factors are re-encoded once, when the plan is
built, to two int8 matrices with one scale per row, V_hat^T (k, in) and U_hat (out, k), so a call is two
int8 GEMMs. Where the rank is so high that the product is smaller, k (out + in) > out * in (more than half
of remap 0.8's SmolLM2 layers), W_hat = U_hat V_hat^T itself is re-encoded instead and a call is one int8
GEMM: fewer bytes to read at decode and fewer multiply-adds at prefill (measured: bench/RESULTS.md, "remap's
high ranks as one int8 matrix"). Why not the stored layout as it is: it splits each stage into an 8-bit
head and a 16-bit tail, which on the CPU costs a 16-bit GEMM (about half int8pack's speed at decode,
bench/RESULTS.md) plus the slices, the scale multiply, the sum and the concatenation around four GEMMs, each a few
microseconds of dispatch, while a whole SmolLM2 layer takes 20-100 us. The re-encoding rounds each value
to half a step of its row's absmax / 127 (V's head rows stay exact whenever the tail fits under their
scale); its cost in perplexity is in bench/RESULTS.md ("CPU serving after the re-encoding"), and it holds k (out + in)
bytes beside the stored tensors. t is kept at a multiple of 16 columns (zero rows appended to V_hat^T,
zero columns to U_hat), so stage 2's int8pack needs no pad per call.

fp32 activations keep the stored layout, exactly (int8pack has no vectorised fp32 kernel):

    stage 1  t = x[:, :s] (v_q * v_scale)^T + x[:, s:] v_tail^T            (M, k)
    stage 2  y[:, :s] = (t * u_scale) u_q^T,   y[:, s:] = t u_tail^T          (M, out)

v_q is (k, s), row-major over the reduction, with one scale per row; u_scale sits on stage 2's
reduction index, so it is folded into the rank-k intermediate. fp8 heads are re-encoded once to int8
(``_cpu.fp8_rows_as_int8``). The arguments are checked once per packed dict and x dtype, when the plan
is built; a call on the same tensors checks only x's last dimension.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ... import _cpu
from ...formats.remap import unpack_remap
from .naive import check_call

Tensor = torch.Tensor


class _Plan(NamedTuple):
    in_features: int
    out_features: int
    head: int                    # fp32 x: s_in, V's rows held in 8 bits (x[:, :s_in] meets them); 16-bit x: 0
    # 16-bit x: int8 GEMMs applied in turn, (V_hat^T, U_hat) re-encoded at t's width, or (W_hat,);
    # fp32 x: (v_q with v_scale, u_q with per-row scale 1)
    stages: tuple[_cpu.Int8Rows, ...]
    u_scale: Optional[Tensor]    # fp32 x: stage 2's per-component scale (None: 16-bit x, folded in)


def _plan(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor]) -> _Plan:
    def make() -> _Plan:
        lay = check_call(x, packed, bias, "remap_matmul")
        if x.dtype not in _cpu.INT8PACK_DTYPES:
            return _Plan(lay.in_features, lay.out_features, lay.head,
                         (_cpu.int8_rows(packed["v_q"], packed["v_scale"], x.dtype, normalised=True),
                          _cpu.int8_rows(packed["u_q"], None, x.dtype)), packed["u_scale"].to(x.dtype, copy=True))
        u_hat, v_hat = unpack_remap(packed)
        if product_is_smaller(lay.out_features, u_hat.shape[1], lay.in_features):
            return _Plan(lay.in_features, lay.out_features, 0, (_reencoded(u_hat @ v_hat.t(), x.dtype),), None)
        width = _cpu.intermediate_width(u_hat.shape[1], x.dtype)
        return _Plan(lay.in_features, lay.out_features, 0,
                     (_reencoded(v_hat.t(), x.dtype, out_rows=width), _reencoded(u_hat, x.dtype, in_cols=width)), None)

    return _cpu.plan("remap", x.dtype, packed, make)


def product_is_smaller(out_features: int, rank: int, in_features: int) -> bool:
    """Whether W_hat (out, in) in int8 holds fewer bytes, and costs fewer multiply-adds per row of x, than its
    two int8 factors of rank k."""
    return out_features * in_features < rank * (out_features + in_features)


def _reencoded(w: Tensor, dtype: torch.dtype, **grow) -> _cpu.Int8Rows:
    q, scale = _cpu.float_rows_as_int8(w)
    return _cpu.int8_rows(q, scale, dtype, owned=True, **grow)


@_cpu.opaque_when_compiled("remap_matmul", lambda packed: packed["u_q"].shape[0] + packed["u_tail"].shape[0])
def remap_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x V_hat U_hat^T + bias for x (..., in), in x's dtype."""
    plan = _plan(x, packed, bias)
    _cpu.check_fits(x, bias, plan, lambda: check_call(x, packed, bias, "remap_matmul"))
    x2d = _cpu.rows_of(x)
    if plan.u_scale is None:  # 16-bit x: one or two int8 GEMMs on re-encoded copies
        y = x2d
        for stage in plan.stages:
            y = _cpu.int8_apply(y, None, stage)
        return _cpu.finish(y, x, bias)
    v_tail, u_tail, s = packed["v_tail"], packed["u_tail"], plan.head
    v, u = plan.stages
    if v_tail.shape[1]:
        t = _cpu.int8_apply(x2d[:, :s], packed["v_q"], v) + _cpu.float_linear(x2d[:, s:], v_tail)
    else:
        t = _cpu.int8_apply(x2d, packed["v_q"], v)
    y = _cpu.int8_apply(t * plan.u_scale, packed["u_q"], u)
    if u_tail.shape[0]:
        y = torch.cat([y, _cpu.float_linear(t, u_tail)], dim=-1)
    return _cpu.finish(y, x, bias)
