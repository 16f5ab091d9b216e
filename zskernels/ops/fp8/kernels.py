"""fp8 (e4m3) weight matmuls on the GPU, with dequantisation fused into the loads (``formats.fp8``).

* form (a), ``fp8_linear``: y = x W_hat^T + b; the per-row scale multiplies output column o after
  the reduction over ``in``;
* form (b), ``fp8_lowrank_matmul``: y = (x V_hat) U_hat^T + b; stage 1 reduces over ``in`` into t
  (M x k) and multiplies by v_scale[j] * u_scale[j] * 2^8 (FOLD keeps an fp16 t out of the
  subnormals); stage 2 reduces t over k against the raw fp8 U and multiplies by 2^-8 (exact).

Paths, chosen on the host from the token count M (``configs/fp8_matmul.json``): decode = GEMV
(M = 1) or a small-tile ``tl.dot``, with deterministic split-K when the output alone leaves SMs
idle (fp32 partials summed in split order inside the launch by the last split of each tile to
arrive: one launch for form (a), two for form (b), whose stage 2 reads a single t);
prefill = tiled ``tl.dot`` GEMM in grouped tile order. fp8 bytes are converted in registers
(uint8 codes decoded by ``_triton.e4m3_bits_to_f32`` before sm_89). Notes: ``zskernels/README.md``.

Order: jitted kernels, host launcher and dispatch, op registration and the public ops.
Compute dtype codes (CDT): 0 = fp16, 1 = bf16, 2 = fp32.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

from typing import Optional

import torch

from ... import _device, _triton
from ..._backend import cpu_fast_path, resolve_backend
from ..._configs import pick_config
from ..._triton import cdiv, e4m3_bits_to_f32, empty, jit_later, last_split_sums, launch, row_tile, split_k, tile_coords
from .cpu import fp8_linear_cpu, fp8_lowrank_matmul_cpu
from .naive import check_call, fp8_linear_reference, fp8_lowrank_matmul_reference

# Form (b) multiplies t by u_scale * 2^8 and y by 2^-8: t then has the size of t * max|U[:, j]| * 0.57
# rather than t * max|U[:, j]| / 448, which keeps an fp16 t (stage 2's tensor-core operand) out of
# the subnormals. Powers of two: exact.
FOLD = 256.0


# --------------------------------------------------------------------------------------------
# Jitted kernels (plain functions until _triton.ready jits them)
# --------------------------------------------------------------------------------------------
@jit_later
def _to_cdt(v, CDT: tl.constexpr):
    if CDT == 0:
        out = v.to(tl.float16)
    elif CDT == 1:
        out = v.to(tl.bfloat16)
    else:
        out = v.to(tl.float32)
    return out


@jit_later
def _load_weight(ptrs, mask, NATIVE_FP8: tl.constexpr, CDT: tl.constexpr):
    """A weight tile converted in registers: fp8 loads where supported, else uint8 + decode."""
    if NATIVE_FP8:
        w = _to_cdt(tl.load(ptrs, mask=mask, other=0.0), CDT)
    else:
        w = _to_cdt(e4m3_bits_to_f32(tl.load(ptrs, mask=mask, other=0)), CDT)
    return w


@jit_later
def _dot(a, w, acc, CDT: tl.constexpr):
    """acc + a @ w^T on tensor cores; fp32 operands use the exact (non-TF32) fp32 dot."""
    if CDT == 2:
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@jit_later
def _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, s1_ptr, s2_ptr, bias_ptr,
              HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-output-column scales, a constant factor, bias; cast to the output's dtype and store."""
    n_ok = offs_n < N
    if HAS_S1:
        acc = acc * tl.load(s1_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_S2:
        acc = acc * tl.load(s2_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if ALPHA != 1.0:
        acc = acc * ALPHA
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om  # int64: M x N may pass 2^31
    tl.store(out_rows + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit_later
def _matmul_kernel(a_ptr, w_ptr, out_ptr, s1_ptr, s2_ptr, bias_ptr, ws_ptr, cnt_ptr,
                   M, N, K, stride_am, stride_wn, stride_om, k_per_split,
                   HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
                   LAST_SUMS: tl.constexpr, USE_DOT: tl.constexpr, NATIVE_FP8: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = epilogue(A @ W^T), W (N x K) fp8 row-major, A (M x K), over one K split per program.

    Several K splits (LAST_SUMS) meet inside the launch: the last split of each tile to arrive sums
    the fp32 partials from ``ws`` in split order and alone runs the epilogue into out (M x N).

    Grid: (M tiles * N tiles, K splits). Tiles are numbered in groups of GROUP_M row tiles, so
    neighbouring programs share weight tiles in L2 (prefill); decode has a single row tile.
    Without USE_DOT (BLOCK_M == 1) it is a GEMV: multiply and sum on the CUDA cores in fp32.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # int64: M x K may pass 2^31
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # k_per_split is a multiple of BLOCK_K, so masking by K alone never reaches into the next split.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[:, None] & k_ok[None, :]
        if USE_DOT:
            acc = _dot(_to_cdt(a, CDT), _load_weight(w_rows + offs_k[None, :], w_mask, NATIVE_FP8, CDT), acc, CDT)
        else:  # (1, BLOCK_K) * (BLOCK_N, BLOCK_K), summed over k
            w = _load_weight(w_rows + offs_k[None, :], w_mask, NATIVE_FP8, 2)
            acc += tl.sum(a.to(tl.float32) * w, axis=1)[None, :]
    if LAST_SUMS:
        acc, last = last_split_sums(acc, ws_ptr, cnt_ptr, pid, pid_s, tl.num_programs(1), offs_m, offs_n, M, N)
        if last:
            _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, s1_ptr, s2_ptr, bias_ptr,
                      HAS_S1, HAS_S2, ALPHA, HAS_BIAS)
    else:  # one split
        _epilogue(acc, offs_m, offs_n, M, N, out_ptr, stride_om, s1_ptr, s2_ptr, bias_ptr,
                  HAS_S1, HAS_S2, ALPHA, HAS_BIAS)


@jit_later
def _decode_bits_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = e4m3_bits_to_f32(bits), elementwise (lets the tests check the decoder on its own)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, e4m3_bits_to_f32(tl.load(bits_ptr + offs, mask=offs < n)), mask=offs < n)


# --------------------------------------------------------------------------------------------
# Host launcher and dispatch (shapes and device only: nothing here syncs, so CUDA graphs can capture it)
# --------------------------------------------------------------------------------------------
_CDT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # compute dtype, as a constexpr


def _choose_config(num_tokens: int, device: torch.device) -> dict:
    """Block configuration for ``num_tokens`` rows of x (``_configs.use_config`` forces one)."""
    return pick_config("fp8_matmul", num_tokens, device)


def _num_stages(cfg: dict, block_m: int, a: torch.Tensor) -> int:
    """The config's pipeline depth, lowered until its tiles fit the GPU's shared memory.

    H100 / A100 (227 / 163 KiB per block) take every shipped config as is; GPUs with less shared
    memory may need fewer stages for the fp32 tiles. The estimate is conservative: (stages - 1)
    buffered A and W tiles plus fp16 copies of both for the dot.
    """
    stages = cfg["num_stages"]
    if a.device.type != "cuda":
        return stages
    limit = _device.shared_memory_per_block(a.device)
    a_tile = block_m * cfg["BLOCK_K"] * a.element_size()
    w_tile = cfg["BLOCK_N"] * cfg["BLOCK_K"]
    converted = 2 * (block_m + cfg["BLOCK_N"]) * cfg["BLOCK_K"]
    while stages > 1 and (stages - 1) * (a_tile + w_tile) + converted > limit:
        stages -= 1
    return stages


def _matmul(a: torch.Tensor, w: torch.Tensor, cfg: dict, *, out_dtype: torch.dtype, cdt: int,
            scales: tuple = (), alpha: float = 1.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(A @ W^T) * scales * alpha + bias in ``out_dtype``, with A (M, K) and W (N, K) fp8: one launch.

    Each of ``scales`` is an (N,) vector. Several K splits meet in an fp32 workspace inside the
    launch: the last split of each output tile to finish sums them in split order and writes the
    tile (per-tile counters, zeroed per call).
    """
    # Python ints: host-side choices need them (under torch.compile this specialises on the shape).
    m, k, n = int(a.shape[0]), int(a.shape[1]), int(w.shape[0])
    native = _device.native_fp8(a.device)
    w = w if native else w.view(torch.uint8)
    block_m = row_tile(cfg, m)
    tiles = cdiv(m, block_m) * cdiv(n, cfg["BLOCK_N"])
    splits, per_split = split_k(cfg, tiles, k, a.device)
    out = empty((m, n), out_dtype, a.device)
    ws, cnt = out, out  # stand-ins, unused without LAST_SUMS
    if splits > 1:
        ws = empty((splits, m, n), torch.float32, a.device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=a.device)
    s1, s2 = (tuple(scales) + (None, None))[:2]
    # Absent optional pointers get the (read-only) weight as a stand-in: their flags are off.
    s1_ptr, s2_ptr, bias_ptr = (t if t is not None else w for t in (s1, s2, bias))
    launch(_matmul_kernel)[(tiles, splits)](
        a, w, out, s1_ptr, s2_ptr, bias_ptr, ws, cnt, m, n, k, a.stride(0), w.stride(0), n, per_split,
        HAS_S1=s1 is not None, HAS_S2=s2 is not None, ALPHA=alpha, HAS_BIAS=bias is not None,
        LAST_SUMS=splits > 1, USE_DOT=cfg["USE_DOT"], NATIVE_FP8=native, CDT=cdt,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 1),
        num_warps=cfg["num_warps"], num_stages=_num_stages(cfg, block_m, a))
    return out


def _fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::fp8_linear: x (M, in) with unit column stride, checks already done."""
    cfg = _choose_config(int(x.shape[0]), x.device)
    return _matmul(x, weight, cfg, out_dtype=x.dtype, cdt=_CDT_CODE[x.dtype], scales=(scale,), bias=bias)


def _fp8_lowrank_triton(x: torch.Tensor, u: torch.Tensor, u_scale: torch.Tensor, vt: torch.Tensor,
                        v_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::fp8_lowrank_matmul: x (M, in) with unit column stride, checks done."""
    cfg = _choose_config(int(x.shape[0]), x.device)
    cdt = _CDT_CODE[x.dtype]
    # Stage 1: t = (x Vt^T) * v_scale * u_scale * 2^8, in x's dtype (the next tensor-core operand).
    # Split-K (decode) sums its partials inside the launch, so stage 2 reads one t, not every split's.
    t = _matmul(x, vt, cfg, out_dtype=x.dtype, cdt=cdt, scales=(v_scale, u_scale), alpha=FOLD)
    return _matmul(t, u, cfg, out_dtype=x.dtype, cdt=cdt, alpha=1.0 / FOLD, bias=bias)


def _decode_e4m3_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 e4m3 codes, through the in-kernel decoder (for tests)."""
    _triton.ready(__name__)
    out = empty(bits.shape, torch.float32, bits.device)
    _decode_bits_kernel[(cdiv(bits.numel(), 256),)](bits, out, bits.numel(), BLOCK=256)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as an (M, in) matrix whose rows are contiguous (the kernels take a row stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------------------------
# Op registration (the launchers above, as torch.library ops) and the public ops
# --------------------------------------------------------------------------------------------
_triton.triton_op("zskernels::fp8_linear")(_fp8_linear_triton)
_triton.triton_op("zskernels::fp8_lowrank_matmul")(_fp8_lowrank_triton)


def _cpu_eligible(backend: str, x, packed, first: str, last: str) -> bool:
    """CPU fast path for non-empty operands (empty ones take the reference, which handles them)."""
    if not (isinstance(x, torch.Tensor) and isinstance(packed, dict) and x.numel()):
        return False
    w_in, w_out = packed.get(first), packed.get(last)
    if not (isinstance(w_in, torch.Tensor) and isinstance(w_out, torch.Tensor) and w_in.numel() and w_out.numel()):
        return False
    return cpu_fast_path(backend, x)


def fp8_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
               *, backend: str = "auto") -> torch.Tensor:
    """y = x W_hat^T + b for W stored by ``quantize_fp8_dense``; y in x's dtype."""
    if _cpu_eligible(backend, x, packed, "weight_fp8", "weight_fp8"):
        return fp8_linear_cpu(x, packed, bias)  # checks once per packed dict (its plan)
    in_features, out_features = check_call(x, packed, bias, "dense", "fp8_linear")
    if resolve_backend(backend, x, *packed.values()) == "torch" or 0 in (x.numel(), in_features, out_features):
        return fp8_linear_reference(x, packed, bias)
    _triton.ready(__name__)
    y = torch.ops.zskernels.fp8_linear(_rows(x), packed["weight_fp8"], packed["weight_scale"], bias)
    return y.reshape(*x.shape[:-1], out_features)


def fp8_lowrank_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                       *, backend: str = "auto") -> torch.Tensor:
    """y = (x V_hat) U_hat^T + b for factors stored by ``pack_fp8_lowrank``; y in x's dtype."""
    if _cpu_eligible(backend, x, packed, "vt_fp8", "u_fp8"):
        return fp8_lowrank_matmul_cpu(x, packed, bias)  # checks once per packed dict (its plan)
    in_features, out_features = check_call(x, packed, bias, "lowrank", "fp8_lowrank_matmul")
    empty = 0 in (x.numel(), in_features, packed["u_fp8"].shape[1], out_features)
    if resolve_backend(backend, x, *packed.values()) == "torch" or empty:
        return fp8_lowrank_matmul_reference(x, packed, bias)
    _triton.ready(__name__)
    y = torch.ops.zskernels.fp8_lowrank_matmul(_rows(x), packed["u_fp8"], packed["u_scale"],
                                               packed["vt_fp8"], packed["v_scale"], bias)
    return y.reshape(*x.shape[:-1], out_features)
