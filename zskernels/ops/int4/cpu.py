"""int4_linear / int4_lowrank_matmul's fast CPU path.

Three routes, chosen per call from the activation dtype, the row count and the group size (the
thresholds are measurements on the development machine, zskernels/README.md):

* zskernels' own int4 kernel (``_cpu_kernel.int4_matmul``) for bf16 activations from
  ``KERNEL_MIN_ROWS`` rows on, where the CPU has AVX-512 BF16: any group size, the weight in a layout
  made once (``_cpu_kernel.int4_pack``, cached beside the codes like int4pack's tiles).
* ``torch._weight_int4pack_mm_for_cpu`` (vectorised int4 weight-only GEMM; reads half a byte per
  weight). It wants the weight re-tiled by ``_convert_weight_to_int4pack_for_cpu`` (N a multiple
  of 16, so rows are padded) and per-group (scale, zero) pairs in x's dtype with
  w = (q - 8) * scale + zero, i.e. zero = min + 8 scale; group sizes 32, 64, 128, 256 only; K a
  multiple of the group (x is zero-padded to the stored width). Both conversions happen once per
  stored tensor and are cached by ``_cpu.derived`` beside it (the stored tensors are left as they are).
* otherwise de-quantise-then-GEMM in row chunks of about ``_cpu.CHUNK_BYTES`` converted bytes: never
  the whole weight at once, and amortised over the rows of x.

  (a) dense:   y = x W_hat^T
  (b) lowrank: t = x V_hat, y = t U_hat^T   (t in x's dtype)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import _cpu
from ... import _cpu_kernel as cpu_kernel
from ...formats.int4 import true_in_features
from .naive import check_call

Tensor = torch.Tensor

INT4PACK_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU kernel accepts
INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu's row multiple
# x dtype -> most rows of x for which int4pack beats chunked de-quantise + GEMM (measured, README).
# Only its bf16 kernel is vectorised: fp16 / fp32 ran 1.2x-40x slower than the chunked path even at M = 1.
INT4PACK_MAX_ROWS = {torch.bfloat16: 256}
# From this many rows of bf16 x on, zskernels' int4 kernel beats int4pack (and the chunked path).
KERNEL_MIN_ROWS = 16


def _nibbles(codes: Tensor) -> Tensor:
    """(N, Kp / 2) uint8 -> (N, Kp) uint8 codes 0..15 (column 2j from the low nibble of byte j)."""
    return torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(codes.shape[0], 2 * codes.shape[1])


def _int4pack_weight(codes: Tensor) -> Tensor:
    """The stored codes re-tiled for torch's CPU int4 kernel, rows padded to a multiple of 16 (cached)."""
    def make() -> Tensor:
        q = _nibbles(codes).to(torch.int32)
        q = F.pad(q, (0, 0, 0, -q.shape[0] % INT4PACK_N_MULTIPLE))
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return _cpu.derived(codes, "int4pack", make)


def _scales_and_zeros(scales: Tensor, mins: Tensor, dtype: torch.dtype) -> Tensor:
    """(groups, N padded, 2) [scale, min + 8 scale] in ``dtype`` (cached beside ``scales``)."""
    def make() -> Tensor:
        s, m = scales.float().T, mins.float().T
        pair = torch.stack([s, m + 8 * s], dim=2)
        return F.pad(pair, (0, 0, 0, -pair.shape[1] % INT4PACK_N_MULTIPLE)).to(dtype).contiguous()
    return _cpu.derived(scales, f"int4sz:{dtype}:{id(mins)}:{mins._version}", make)


def _kernel_weight(codes: Tensor, scales: Tensor, mins: Tensor) -> tuple[Tensor, ...]:
    """The stored weight in zskernels' int4 kernel's layout (cached)."""
    return _cpu.derived(codes, "int4kernel", lambda: cpu_kernel.int4_pack(codes, scales, mins), also=(scales, mins))


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


def linear_2d(x: Tensor, packed: dict[str, Tensor], prefix: str = "") -> Tensor:
    """x (M, K) @ W_hat^T for one stored matrix (``prefix`` "v_" / "u_" of a pair), in x's dtype."""
    codes, scales, mins = (packed[prefix + key] for key in ("codes", "scales", "mins"))
    n, kp = codes.shape[0], 2 * codes.shape[1]
    k = true_in_features(packed, prefix)
    group_size = kp // scales.shape[1]
    if x.dtype == torch.bfloat16 and x.shape[0] >= KERNEL_MIN_ROWS and cpu_kernel.available():
        return cpu_kernel.int4_matmul(_padded(x, kp), _kernel_weight(codes, scales, mins), n)
    if group_size in INT4PACK_GROUPS and x.shape[0] <= INT4PACK_MAX_ROWS.get(x.dtype, 0):
        y = torch._weight_int4pack_mm_for_cpu(_padded(x, kp), _int4pack_weight(codes), group_size,
                                              _scales_and_zeros(scales, mins, x.dtype))
        return y[:, :n]
    return _chunked(x, codes, scales, mins, k)


def _checked(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], kind: str, op: str) -> None:
    """The layout checks, once per packed dict and x dtype (``_cpu.plan``); per call only x's width and
    the bias length, and on a mismatch the full check, which raises naming what the op needs."""
    in_features, out_features = _cpu.plan(op, x.dtype, packed, lambda: check_call(x, packed, bias, kind, op))
    if x.dim() < 1 or x.shape[-1] != in_features or not _cpu.bias_fits(bias, out_features):
        check_call(x, packed, bias, kind, op)


@_cpu.opaque_when_compiled("int4_linear", lambda packed: packed["codes"].shape[0])
def int4_linear_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = x W_hat^T + bias, in x's dtype."""
    _checked(x, packed, bias, "dense", "int4_linear")
    return _cpu.finish(linear_2d(x.reshape(-1, x.shape[-1]), packed), x, bias)


@_cpu.opaque_when_compiled("int4_lowrank_matmul", lambda packed: packed["u_codes"].shape[0])
def int4_lowrank_matmul_cpu(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """y = (x V_hat) U_hat^T + bias, in x's dtype."""
    _checked(x, packed, bias, "lowrank", "int4_lowrank_matmul")
    t = linear_2d(x.reshape(-1, x.shape[-1]), packed, "v_")
    return _cpu.finish(linear_2d(t, packed, "u_"), x, bias)
