"""int4 weight-only matmuls on the GPU, with the nibbles unpacked in registers (``formats.int4``).

* ``int4_linear``: y = x W_hat^T + b, W_hat[n, k] = q[n, k] * scale[n, g] + min[n, g], g = k // GROUP;
* ``int4_lowrank_matmul``: y = (x V_hat) U_hat^T + b, two launches of the same kernel: stage 1 writes
  t = x V_hat (its K splits summed in fp32 inside the launch), stage 2 reads it. t is in x's dtype on
  every path, as the fp8 ops' t: the tl.dot paths cast their operand to it anyway (an fp32 t took a
  stack frame at the 128 x 128 tile on sm_80), and the GEMV, which re-reads t once per column tile,
  requested 1.23x its bytes at M = 1 with an fp32 t (bench/traffic.py); rounding t costs half an
  ulp of x's dtype.

The K tile (BLOCK_K) divides the group, so a tile needs one (scale, min) per output row: two
float16 loads per row and tile. Each weight tile is de-quantised in registers (one fp32 FMA per
weight, q * scale + min) and cast to x's dtype for tl.dot (fp32 accumulation). Factoring the
scales out of the dot instead (scale * (x . q) + min * sum(x)) keeps a second accumulator alive:
at the 128 x 128 prefill tile that took 255 registers and a 496-byte stack (bench/aot_check.py, sm_90).
Paths, chosen on the host from the token count M (``configs/int4_matmul.json``): decode = GEMV
(M = 1: multiply and sum on the CUDA cores in fp32; 128 output rows per program, so x or t is
re-read once per 128 rows) or a 16/64-row tl.dot, with deterministic split-K when the output tiles
alone leave SMs idle (the rules and in-launch sum the fp8 ops share: ``_triton.row_tile``,
``_triton.split_k``, and fp32 partials summed in split order by the last split of each tile to
arrive, ``_triton.last_split_sums``; one launch per stage, stage 2 reads a single t); prefill =
tiled tl.dot in grouped tile order. Codes are loaded as (BLOCK_N, BLOCK_K / 2) bytes and split into two nibble
tiles, interleaved back to (BLOCK_N, BLOCK_K) by tl.join + reshape.

Order: jitted kernels, host launcher, op registration and the public ops.
Compute dtype codes (CDT, x's dtype): 0 = fp16, 1 = bf16, 2 = fp32 (exact, non-TF32 dot). The tl.dot
paths read A in that dtype (stage 2's t is stored in it) and cast the weight tile to A's dtype.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

from typing import Optional

import torch

from ... import _triton
from ..._backend import cpu_fast_path, resolve_backend
from ..._configs import pick_config, table
from ..._triton import cdiv, empty, jit_later, last_split_sums, launch, row_tile, split_k, tile_coords
from .cpu import int4_linear_cpu, int4_lowrank_matmul_cpu
from .naive import check_call, int4_linear_reference, int4_lowrank_matmul_reference

_CDT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# --------------------------------------------------------------------------------------------
# Jitted kernels (plain functions until _triton.ready jits them)
# --------------------------------------------------------------------------------------------
@jit_later
def _load_codes(rows, byte0, n_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) uint8 codes 0..15 of columns 2 byte0 ... 2 byte0 + BLOCK_K - 1 (inside the padded row)."""
    offs_b = byte0 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(rows + offs_b[None, :], mask=n_ok[:, None], other=0)
    return tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))  # byte j -> columns 2j, 2j + 1


@jit_later
def _int4_matmul_kernel(a_ptr, codes_ptr, scales_ptr, mins_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
                        M, N, K, stride_am, stride_cn, stride_gn, stride_om, k_per_split, bytes_per_split,
                        HAS_BIAS: tl.constexpr, LAST_SUMS: tl.constexpr, USE_DOT: tl.constexpr, CDT: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """out = A @ W_hat^T (+ bias), A (M, K) in x's dtype (any float dtype for the GEMV), W_hat from
    codes (N, Kp / 2) and per-group scales / mins (N, Kp / GROUP) float16. GROUP % BLOCK_K == 0.
    Columns k >= K are masked off in A, so the padded codes multiply zeros. Without USE_DOT
    (BLOCK_M == 1) it is a GEMV in fp32.

    Grid: (M tiles * N tiles, K splits); split s covers [s k_per_split, (s + 1) k_per_split) (whole
    BLOCK_K steps). Several splits (LAST_SUMS) meet inside the launch as the fp8 ops' do
    (``_triton.last_split_sums``): each stores its fp32 partial to ws[s], and the last split of
    each tile to arrive sums them in split order and alone adds the bias and writes out (M x N).
    Code bytes are addressed from s * bytes_per_split (= k_per_split / 2, an argument of its own so
    that Triton sees it divisible by 16 and can issue 16-byte loads; k_lo // 2 would only be known
    divisible by 8)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # int64: M x K may pass 2^31
    code_rows = codes_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    group_rows = offs_n.to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    byte_lo = tl.program_id(1) * bytes_per_split
    for kb in range(0, k_hi - k_lo, BLOCK_K):
        k0 = k_lo + kb
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        q = _load_codes(code_rows, byte_lo + kb // 2, n_ok, BLOCK_N, BLOCK_K)
        group = k0 // GROUP
        scale = tl.load(scales_ptr + group_rows + group, mask=n_ok, other=0.0).to(tl.float32)
        low = tl.load(mins_ptr + group_rows + group, mask=n_ok, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * scale[:, None] + low[:, None]
        if USE_DOT:
            if CDT == 2:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
        else:  # (1, BLOCK_K) * (BLOCK_N, BLOCK_K), summed over k
            acc += tl.sum(a.to(tl.float32) * w, axis=1)[None, :]
    if LAST_SUMS:
        acc, last = last_split_sums(acc, ws_ptr, cnt_ptr, tl.program_id(0), tl.program_id(1), tl.num_programs(1),
                                     offs_m, offs_n, M, N)
        if last:
            _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:  # one split
        _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)


@jit_later
def _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    """acc (+ bias), cast to the output's dtype and stored (the tile's one writer)."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om  # int64: M x N may pass 2^31
    tl.store(out_rows + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host launcher (shapes and device only: nothing here syncs, so CUDA graphs can capture it)
# --------------------------------------------------------------------------------------------
def _block_k(cfg: dict, group_size: int) -> int:
    """The config's K tile, lowered to the largest power of two dividing the group (>= 16: groups are
    multiples of 16)."""
    return min(cfg["BLOCK_K"], group_size & -group_size)


def named_config(name: str) -> dict:
    """A named alternative config of ``configs/int4_matmul.json`` (its ``_alternatives``, which no pick
    returns), to force with ``_configs.use_config``: "gemv-32-rows" is the M = 1 GEMV shipped before the
    128-row one, kept so that bench/gpu_quick.py can time both side by side."""
    return dict(table("int4_matmul")["_alternatives"][name])


def _matmul(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, cfg: dict, *,
            out_dtype: torch.dtype, cdt: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A (M, K) @ W_hat^T (+ bias) in ``out_dtype``; K is A's width (<= the codes' padded width).

    Several K splits meet in an fp32 workspace inside the launch: the last split of each output tile
    to finish sums them in split order, adds the bias and writes the tile (per-tile counters, zeroed
    per call): one launch whatever the split.
    """
    m, k, n = int(a.shape[0]), int(a.shape[1]), int(codes.shape[0])
    group_size = 2 * int(codes.shape[1]) // max(1, int(scales.shape[1]))
    cfg = {**cfg, "BLOCK_K": _block_k(cfg, group_size)}
    block_m, block_n = row_tile(cfg, m), cfg["BLOCK_N"]  # the fp8 ops' row-tile rule
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    splits, per_split = split_k(cfg, tiles, k, a.device)
    out = empty((m, n), out_dtype, a.device)
    ws, cnt = out, out  # stand-ins, unused without LAST_SUMS
    if splits > 1:
        ws = empty((splits, m, n), torch.float32, a.device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=a.device)
    bias_ptr = bias if bias is not None else scales  # a stand-in when absent: HAS_BIAS is off
    launch(_int4_matmul_kernel)[(tiles, splits)](
        a, codes, scales, mins, out, bias_ptr, ws, cnt, m, n, k,
        a.stride(0), codes.stride(0), scales.stride(0), n, per_split, per_split // 2,
        HAS_BIAS=bias is not None, LAST_SUMS=splits > 1, USE_DOT=cfg["USE_DOT"], CDT=cdt, GROUP=group_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _int4_linear_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::int4_linear: x (M, in) with unit column stride, checks already done."""
    cfg = pick_config("int4_matmul", int(x.shape[0]), x.device)
    return _matmul(x, codes, scales, mins, cfg, out_dtype=x.dtype, cdt=_CDT_CODE[x.dtype], bias=bias)


def _int4_lowrank_triton(x: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor, v_mins: torch.Tensor,
                         u_codes: torch.Tensor, u_scales: torch.Tensor, u_mins: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::int4_lowrank_matmul: stage 1 t = x V_hat, stage 2 y = t U_hat^T + b."""
    cfg = pick_config("int4_matmul", int(x.shape[0]), x.device)
    cdt = _CDT_CODE[x.dtype]
    t = _matmul(x, v_codes, v_scales, v_mins, cfg, out_dtype=x.dtype, cdt=cdt)  # one t, x's dtype, every path
    return _matmul(t, u_codes, u_scales, u_mins, cfg, out_dtype=x.dtype, cdt=cdt, bias=bias)


def _ready() -> None:
    """Jit this module's kernels (it launches no other module's since split-K is summed in-launch)."""
    _triton.ready(__name__)


def _cpu_route(x, packed, backend: str, codes: tuple[str, ...]) -> bool:
    """The CPU fast path applies: CPU tensors, a non-empty x and non-empty stored matrices (empty
    products take the reference, which returns zeros or the bias)."""
    if not (isinstance(x, torch.Tensor) and isinstance(packed, dict) and x.numel() and cpu_fast_path(backend, x)):
        return False
    for key in codes:  # a plain loop: this runs on every call
        if not (isinstance(packed.get(key), torch.Tensor) and packed[key].numel()):
            return False
    return True


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as an (M, in) matrix whose rows are contiguous (the kernel takes a row stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------------------------
# Op registration (the launchers above, as torch.library ops) and the public ops
# --------------------------------------------------------------------------------------------
_triton.triton_op("zskernels::int4_linear")(_int4_linear_triton)
_triton.triton_op("zskernels::int4_lowrank_matmul")(_int4_lowrank_triton)


def int4_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                *, backend: str = "auto") -> torch.Tensor:
    """y = x W_hat^T + b for W stored by ``quantize_int4``; y in x's dtype."""
    if _cpu_route(x, packed, backend, ("codes",)):
        return int4_linear_cpu(x, packed, bias)  # checks once per packed dict (its plan)
    in_features, out_features = check_call(x, packed, bias, "dense", "int4_linear")
    empty_ = 0 in (x.numel(), in_features, out_features)
    if resolve_backend(backend, x, packed["codes"], packed["scales"], packed["mins"]) == "torch" or empty_:
        return int4_linear_reference(x, packed, bias)
    _ready()
    y = torch.ops.zskernels.int4_linear(_rows(x), packed["codes"], packed["scales"], packed["mins"], bias)
    return y.reshape(*x.shape[:-1], out_features)


def int4_lowrank_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                        *, backend: str = "auto") -> torch.Tensor:
    """y = (x V_hat) U_hat^T + b for factors stored by ``pack_int4_lowrank``; y in x's dtype."""
    if _cpu_route(x, packed, backend, ("v_codes", "u_codes")):
        return int4_lowrank_matmul_cpu(x, packed, bias)  # checks once per packed dict (its plan)
    in_features, out_features = check_call(x, packed, bias, "lowrank", "int4_lowrank_matmul")
    empty_ = 0 in (x.numel(), in_features, packed["v_codes"].shape[0], out_features)
    stored = [packed[p + key] for p in ("v_", "u_") for key in ("codes", "scales", "mins")]
    if resolve_backend(backend, x, *stored) == "torch" or empty_:
        return int4_lowrank_matmul_reference(x, packed, bias)
    _ready()
    y = torch.ops.zskernels.int4_lowrank_matmul(_rows(x), *stored, bias)
    return y.reshape(*x.shape[:-1], out_features)
