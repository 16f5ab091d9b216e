"""CPU building blocks shared by every op's fast CPU path (``ops/<op>/cpu.py``).

Nothing here de-quantises a whole factor per call:

* ``int8_linear(x, w, scale)``: y = x (w * scale[:, None])^T for an int8 weight ``w`` (N, K) with one
  scale per output row. For bf16/fp16 activations and few rows it is ``torch._weight_int8pack_mm``
  (vectorised int8 weight-only kernel: reads 1 byte per weight); otherwise (fp32 activations, whose
  int8pack kernel is scalar on the CPU, or prefill-sized M, where int8pack does not block for the
  cache) the weight is converted in row chunks of about ``CHUNK_BYTES`` (cache-sized, reused) and
  multiplied by plain GEMMs, so the conversion costs O(chunk) memory and is amortised over M rows.
* ``float_linear(x, w)``: F.linear with a 16-bit weight in another dtype, converted in chunks.
* ``fp8_rows_as_int8(w_fp8)``: a one-time re-encoding of fp8 e4m3 rows to int8 (torch's fp8 -> float
  conversion is scalar on the CPU, ~30 ns/element), cached by ``derived``.
* ``derived(source, key, make)``: a cache of tensors derived from a stored tensor (the cast scales,
  the re-encoded weights). It never touches the module's buffers, state_dict or byte counts; an
  entry is dropped with its source tensor and rebuilt when the source changes (in-place write,
  ``.to(device)``, a checkpoint loaded into it), so it is always that tensor's current derivative.

Thresholds were measured on the development machine (bench/RESULTS.md, /work/notes/results-C.md).
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# torch._weight_int8pack_mm is vectorised for these activation dtypes (its fp32 kernel is scalar).
INT8PACK_DTYPES = (torch.bfloat16, torch.float16)
# Up to this many rows int8pack beats de-quantise-then-GEMM; above, the GEMM's blocking wins.
INT8PACK_MAX_ROWS = 16
# int8pack's CPU kernel reads K in steps of 16 (8 for one row) without a remainder loop: other K
# give wrong results or a crash (measured on torch 2.13), so they take the chunked path.
INT8PACK_K_MULTIPLE = 16
CHUNK_BYTES = 1 << 20  # converted weight rows per chunk: about half an L2 of the machine measured

_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, Tensor]] = {}
_LOCK = threading.RLock()  # re-entrant: a source freed while the lock is held runs _forget in this thread


def derived(source: Tensor, key: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, computed once per (source tensor, key) while ``source`` lives unchanged."""
    slot = (id(source), key)
    entry = _CACHE.get(slot)
    if entry is not None and entry[0]() is source and entry[1] == source._version:
        return entry[2]
    value = make()
    with _LOCK:
        if slot not in _CACHE:  # first entry of this source: drop its entries when it dies
            weakref.finalize(source, _forget, id(source))
        _CACHE[slot] = (weakref.ref(source), source._version, value)
    return value


def _forget(source_id: int) -> None:
    with _LOCK:
        for slot in [s for s in _CACHE if s[0] == source_id]:
            del _CACHE[slot]


def cache_entries() -> int:
    """Number of cached derived tensors (for tests)."""
    return len(_CACHE)


def as_dtype(t: Tensor, dtype: torch.dtype, key: str = "as") -> Tensor:
    """``t`` in ``dtype``, cached when a conversion is needed (small tensors: scales)."""
    return t if t.dtype == dtype else derived(t, f"{key}:{dtype}", lambda: t.to(dtype))


def ones(like: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """A cached vector of n ones (int8pack needs a scale per row even when the scale sits elsewhere)."""
    return derived(like, f"ones:{dtype}", lambda: torch.ones(n, dtype=dtype, device=like.device))


def _chunk_rows(w: Tensor, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // max(1, w.shape[1] * dtype.itemsize))


def _chunked_linear(x: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
    """x (w * scale)^T with w converted to x's dtype one row chunk at a time."""
    rows = _chunk_rows(w, x.dtype)
    if rows >= w.shape[0]:
        y = F.linear(x, w.to(x.dtype))
    else:
        y = torch.cat([F.linear(x, w[r:r + rows].to(x.dtype)) for r in range(0, w.shape[0], rows)], dim=-1)
    return y if scale is None else y.mul_(scale)


def int8_linear(x: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
    """y = x (w * scale[:, None])^T in x's dtype: x (M, K) float, w (N, K) int8 contiguous, scale (N,) or None."""
    if x.dtype in INT8PACK_DTYPES and x.shape[0] <= INT8PACK_MAX_ROWS and w.shape[1] % INT8PACK_K_MULTIPLE == 0:
        scale = ones(w, w.shape[0], x.dtype) if scale is None else as_dtype(scale, x.dtype)
        return torch._weight_int8pack_mm(_aligned(x.contiguous()), _aligned_weight(w), _aligned(scale))
    return _chunked_linear(x, w, None if scale is None else as_dtype(scale, x.dtype))


# int8pack's vector loads need 16-byte aligned operands: a tensor viewed at an odd offset of a
# memory-mapped checkpoint crashes it (measured). torch's allocator aligns to 64 bytes.
ALIGN = 64


def _aligned(t: Tensor) -> Tensor:
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _aligned_weight(w: Tensor) -> Tensor:
    """``w``, or a cached aligned copy when it sits misaligned (extra memory: load aligned checkpoints)."""
    return w if w.data_ptr() % ALIGN == 0 else derived(w, "aligned", w.clone)


def float_linear(x: Tensor, w: Tensor) -> Tensor:
    """F.linear(x, w) for a float weight of any dtype, without converting all of it at once."""
    return F.linear(x, w) if w.dtype == x.dtype else _chunked_linear(x, w, None)


def _fp8_values(w: Tensor) -> Tensor:
    """float32 values of an fp8 e4m3 tensor through a 256-entry table (the direct cast is scalar)."""
    table = torch.arange(256, dtype=torch.uint8, device=w.device).view(torch.float8_e4m3fn).float()
    return table[w.view(torch.uint8).long()]


def fp8_rows_as_int8(w: Tensor, row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Re-encode fp8 e4m3 rows as int8, w * row_scale[:, None] ~= q * scale[:, None] (cached).

    The one rounding (to 1/254 of each row's absmax) is the only change; its effect on accuracy is
    measured in tests/zskernels/test_cpu_paths.py and noted in zskernels/README.md.
    """
    def make() -> tuple[Tensor, Tensor]:
        values = _fp8_values(w)
        absmax = values.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = (values / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale if row_scale is None else scale * row_scale.float()

    key = "int8rows" if row_scale is None else f"int8rows:{id(row_scale)}:{row_scale._version}"
    return derived(w, key, make)


def rows_int8(w: Tensor, row_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """An 8-bit row-major weight as (int8 rows, per-row scale or None): int8 as stored, fp8 re-encoded
    with ``row_scale`` folded into the new per-row scale."""
    return (w, row_scale) if w.dtype == torch.int8 else fp8_rows_as_int8(w, row_scale)
