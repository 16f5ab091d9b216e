"""int4_linear / int4_lowrank_matmul's fast CPU path.

Three routes, chosen per call from the activation dtype, the row count and the group size (the
thresholds are measurements, zskernels/README.md):

* zskernels' own int4 kernel (``_cpu_kernel.int4_matmul``, VNNI on the codes as they are) for bf16 activations
  from ``kernel_min_rows()`` rows on, where the CPU has AVX-512 BF16 and VNNI: any group size, the weight in
  its own layout (``_cpu_kernel.int4_pack``). The threshold is data per CPU (configs/cpu_routes.json): 1 since
  the kernel multiplies the codes with VNNI (1.1-2.2x int4pack at 1-64 rows on the Intel Xeon VM), so no
  int4pack layout is made there.
* ``torch._weight_int4pack_mm_for_cpu`` (vectorised int4 weight-only GEMM; reads half a byte per
  weight). It wants the weight re-tiled by ``_convert_weight_to_int4pack_for_cpu`` (N a multiple
  of 16, so rows are padded) and per-group (scale, zero) pairs in x's dtype with
  w = (q - 8) * scale + zero, i.e. zero = min + 8 scale; group sizes 32, 64, 128, 256 only; K a
  multiple of the group (x is zero-padded to the stored width).
* otherwise de-quantise-then-GEMM in row chunks of about ``_cpu.CHUNK_BYTES`` converted bytes: never
  the whole weight at once, and amortised over the rows of x.

Every layout is made once per packed dict and x dtype, in the op's plan (``_cpu.plan``, which leaves the
stored tensors as they are), so a call is the plan lookup and then the kernel calls (a 576 x 576 rank-128
layer at one row: 22-32 us a call, about 15 of them in its two GEMMs, against 55-63 us before plans held the
layouts). A V factor's layouts have U's padded width of rows (zero rows), so t comes out as wide as U's
codes are read and stage 2 pads nothing.

  (a) dense:   y = x W_hat^T
  (b) lowrank: t = x V_hat, y = t U_hat^T   (t in x's dtype)
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ... import _configs, _cpu
from ... import _cpu_kernel as cpu_kernel
from .naive import check_call

Tensor = torch.Tensor

INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU kernel accepts
INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu's row multiple
# x dtype -> most rows of x for which int4pack beats chunked de-quantise + GEMM (measured, README).
# Only its bf16 kernel is vectorised: fp16 / fp32 ran 1.2x-40x slower than the chunked path even at M = 1.
INT4PACK_MAX_ROWS = {torch.bfloat16: 256}


@functools.lru_cache(maxsize=None)
def kernel_min_rows() -> Optional[int]:
    """From this many rows of bf16 x on, zskernels' int4 kernel beats int4pack (and the chunked path) on this CPU;
    None: at no row count measured. It depends on the CPU (zskernels/configs/cpu_routes.json)."""
    return _configs.cpu_route_setting("int4_kernel_min_rows")


def _nibbles(codes: Tensor) -> Tensor:
    """(N, Kp / 2) uint8 -> (N, Kp) uint8 codes 0..15 (column 2j from the low nibble of byte j)."""
    return torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(codes.shape[0], 2 * codes.shape[1])


def int4pack_weight(codes: Tensor) -> Tensor:
    """The stored codes re-tiled for torch's CPU int4 kernel, rows zero-padded to a multiple of 16 (a copy)."""
    q = _nibbles(codes).to(torch.int32)
    q = F.pad(q, (0, 0, 0, -q.shape[0] % INT4PACK_N_MULTIPLE))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def scales_and_zeros(scales: Tensor, mins: Tensor, dtype: torch.dtype) -> Tensor:
    """(groups, N padded, 2) [scale, min + 8 scale] in ``dtype`` (a copy)."""
    s, m = scales.float().T, mins.float().T
    pair = torch.stack([s, m + 8 * s], dim=2)
    return F.pad(pair, (0, 0, 0, -pair.shape[1] % INT4PACK_N_MULTIPLE)).to(dtype).contiguous()


class _Matrix(NamedTuple):
    """One stored matrix (``prefix`` "", "v_" or "u_") prepared for x of one dtype: its sizes and the
    layouts of the routes x can take (None where a route cannot run)."""

    prefix: str
    out_features: int   # N, what the chunked route writes
    rows: int           # what the kernel and int4pack write: N, or a V factor's N grown to U's width
    width: int          # the codes' padded K: x is zero-padded to it for the kernel and int4pack
    group_size: int
    kernel_min_rows: int                         # x with this many rows or more takes the kernel
    kernel: Optional[tuple[Tensor, ...]]        # zskernels' layout (bf16 x, where the kernel runs on this CPU)
    int4pack: Optional[tuple[Tensor, Tensor]]  # torch's tiles and its (scale, zero) pairs


class _Plan(NamedTuple):
    in_features: int
    out_features: int
    stages: tuple[_Matrix, ...]  # (W_hat,) or (V_hat, U_hat), applied in turn


def _prepared(packed: dict[str, Tensor], prefix: str, dtype: torch.dtype, rows: int = 0) -> _Matrix:
    """The layouts, made once per plan. ``rows``: zero rows appended up to it (scale and min 0, so those outputs
    are 0), so that V's t comes out at the width U's codes are read at and stage 2 pads nothing."""
    codes, scales, mins = (packed[prefix + key] for key in ("codes", "scales", "mins"))
    n, width = codes.shape[0], 2 * codes.shape[1]
    group_size = width // scales.shape[1]
    stored = (codes, scales, mins)
    if rows > n:
        stored = tuple(F.pad(t, (0, 0, 0, rows - n)) for t in stored)
    min_rows = kernel_min_rows() if dtype == torch.bfloat16 and cpu_kernel.available() else None
    kernel = cpu_kernel.int4_pack(*stored) if min_rows is not None else None
    int4pack = None
    if group_size in INT4PACK_GROUPS and dtype in INT4PACK_MAX_ROWS and (min_rows is None or min_rows > 1):
        int4pack = (int4pack_weight(stored[0]), scales_and_zeros(stored[1], stored[2], dtype))
    return _Matrix(prefix, n, max(rows, n), width, group_size, min_rows or 0, kernel, int4pack)


def _apply(x: Tensor, m: _Matrix, packed: dict[str, Tensor]) -> Tensor:
    """x (M, K or wider, zero beyond K) @ W_hat^T through the route M picks (the chunked route reads W_hat as
    wide as x: K, or the codes' padded width when t arrives from V's zero-padded layouts)."""
    if m.kernel is not None and x.shape[0] >= m.kernel_min_rows:
        return cpu_kernel.int4_matmul(_padded(x, m.width), m.kernel, m.rows)
    if m.int4pack is not None and x.shape[0] <= INT4PACK_MAX_ROWS[x.dtype]:
        y = torch._weight_int4pack_mm_for_cpu(_padded(x, m.width), m.int4pack[0], m.group_size, m.int4pack[1])
        return y if y.shape[1] == m.rows else y[:, :m.rows]
    codes, scales, mins = (packed[m.prefix + key] for key in ("codes", "scales", "mins"))
    return _chunked(x, codes, scales, mins, min(x.shape[1], m.width))


def _dequantize_rows(codes: Tensor, scales: Tensor, mins: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """W_hat for a chunk of rows, first k columns, in ``dtype``. The nibbles are written straight into
    one float32 buffer and scaled in place: half the time of stack + convert + addcmul (measured)."""
    n, groups = scales.shape
    w = torch.empty(n, codes.shape[1], 2, dtype=torch.float32, device=codes.device)
    w[..., 0] = codes & 0xF
    w[..., 1] = codes >> 4
    w = w.view(n, groups, -1).mul_(scales.float()[..., None]).add_(mins.float()[..., None])
    return w.view(n, -1)[:, :k].to(dtype)


def _chunked(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor, k: int) -> Tensor:
    rows = max(1, _cpu.CHUNK_BYTES // max(1, 2 * codes.shape[1] * 4))  # float32 rows per chunk
    parts = [F.linear(x, _dequantize_rows(codes[r:r + rows], scales[r:r + rows], mins[r:r + rows], k, x.dtype))
             for r in range(0, codes.shape[0], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _padded(x: Tensor, width: int) -> Tensor:
    """x (M, K) zero-padded to the codes' width, contiguous (both kernels read K in whole groups)."""
    return F.pad(x, (0, width - x.shape[1])) if width != x.shape[1] else x.contiguous()


def _plan(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], kind: str, op: str) -> _Plan:
    """The checked, prepared operands, once per packed dict and x dtype (``_cpu.plan``)."""
    def make() -> _Plan:
        in_features, out_features = check_call(x, packed, bias, kind, op)
        if kind == "dense":
            return _Plan(in_features, out_features, (_prepared(packed, "", x.dtype),))
        u_width = 2 * packed["u_codes"].shape[1]
        return _Plan(in_features, out_features,
                     (_prepared(packed, "v_", x.dtype, rows=u_width), _prepared(packed, "u_", x.dtype)))

    return _cpu.plan(op, x.dtype, packed, make)


def _run(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], kind: str, op: str) -> Tensor:
    plan = _plan(x, packed, bias, kind, op)
    _cpu.check_fits(x, bias, plan, lambda: check_call(x, packed, bias, kind, op))
    y = _cpu.rows_of(x)
    for matrix in plan.stages:
        y = _apply(y, matrix, packed)
    return _cpu.finish(y, x, bias)


@_cpu.opaque_when_compiled("int4_linear", lambda packed: packed["codes"].shape[0])
def int4_linear_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x W_hat^T + bias, in x's dtype."""
    return _run(x, packed, bias, "dense", "int4_linear")


@_cpu.opaque_when_compiled("int4_lowrank_matmul", lambda packed: packed["u_codes"].shape[0])
def int4_lowrank_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = (x V_hat) U_hat^T + bias, in x's dtype."""
    return _run(x, packed, bias, "lowrank", "int4_lowrank_matmul")
