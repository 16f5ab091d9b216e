"""remap_matmul on the GPU: y = x V_hat U_hat^T + bias over remap-packed factors (``formats.remap``).

Two stages, each a mixed-precision GEMM whose 8-bit operand is converted to the activation dtype
in registers (never dequantised to memory):

stage 1  t = x V_hat (M x k), reduced over ``in``: the head loop accumulates x[:, :s_in] @ v_q^T
         unscaled, the accumulator's columns are multiplied by v_scale once, and the tail loop
         (rows [s_in, in), only when V has a tail) keeps accumulating into the same registers. The
         epilogue writes t_head = t * u_scale (u_scale sits on stage 2's reduction index) and,
         when U has a tail, t itself.
stage 2  y = t U_hat^T + bias: output columns [0, s_out) are t_head @ u_q^T, columns [s_out, out)
         are t @ u_tail^T; one launch covers both ranges (head tiles first, then tail tiles).

The head lengths are the tensors' own, s_in = v_q.shape[1] and s_out = u_q.shape[0] (equal, to
min(out, in), for pack_remap's dicts; different, or zero, for a tensor-parallel slice), so the
kernels take one per stage.

Everything accumulates in fp32; MMA operands are in x's dtype (fp32 inputs use exact "ieee"
dots). GPUs that cannot load e4m3 (before sm_89) read fp8 heads as uint8 codes decoded to fp16
values times 2^-8 (``_triton.e4m3_codes_as_f16``); the scales take the 2^8 back, bit-exact.
Dispatch by token count M (``configs/remap_matmul.json``): decode tiles with deterministic
split-K (the last program of a tile sums the partials in split order), larger tiles for
prefill. Design notes and costs: ``zskernels/README.md``.

Order: jitted kernels, host launcher and dispatch, op registration and the public op.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

from typing import Optional

import torch

from ... import _device, _triton
from ..._backend import cpu_fast_path, resolve_backend
from ..._configs import pick_config
from ..._triton import cdiv, e4m3_codes_as_f16, empty, jit_later, launch, tile_coords
from ...formats.remap import PACKED_KEYS
from .cpu import remap_matmul_cpu
from .naive import check_call, remap_matmul_reference

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Jitted kernels (plain functions until _triton.ready jits them)
# ----------------------------------------------------------------------------------------------
@jit_later
def _dot_steps(acc, a_ptr, lda, a_col0, b_ptr, ldb, seg_len, offs_m, offs_n, m_lim, n_lim,
               step_lo, step_hi, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               E4M3_BITS: tl.constexpr):
    """acc += A[offs_m, a_col0 + r] @ B[offs_n, r]^T for r over steps [step_lo, step_hi) of one
    reduction segment of length seg_len.

    A is the activation (x or t, row stride lda, in the MMA dtype); B is a weight segment stored
    K-major (row stride ldb, r contiguous), so each thread loads 16 contiguous bytes along r. B is
    converted to A's dtype in registers: int8/e4m3 -> fp16/bf16 is exact. With E4M3_BITS, B holds
    e4m3 codes as uint8 and the sum comes out 2^-8 times too small (see _triton.e4m3_codes_as_f16).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * lda + a_col0
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * ldb
    m_ok = (offs_m < m_lim)[:, None]
    n_ok = (offs_n < n_lim)[None, :]
    for step in range(step_lo, step_hi):
        r = step * BLOCK_K + offs_k
        r_ok = r < seg_len
        a = tl.load(a_rows + r[None, :], mask=m_ok & r_ok[None, :], other=0.0)
        b = tl.load(b_cols + r[:, None], mask=n_ok & r_ok[:, None], other=0.0)
        if E4M3_BITS:
            b = e4m3_codes_as_f16(b)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    return acc


@jit_later
def _finish_splits(acc, ws_ptr, cnt_ptr, tile, split, n_split, offs_m, cols, row_ok, col_ok, ld, plane,
                   SPLIT_K: tl.constexpr):
    """Combine split-K partials deterministically; returns (sum, whether this program finishes).

    Without split-K the program owns its tile. With it, every split stores its fp32 partial to
    the workspace (ws[split, row, col], plane = rows * ld), then bumps the tile's counter with
    acq_rel semantics (after a CTA barrier, so all threads' stores are released). The program
    that sees n_split - 1 arrivals before it is the last: it reloads every partial in split
    order (L2 reads, .cg, since other SMs wrote them) and alone runs the epilogue. The counters
    are zeroed per call by the host.
    """
    if SPLIT_K:
        offs = offs_m[:, None].to(tl.int64) * ld + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(ws_ptr + split * plane + offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        last = arrived == n_split - 1
        if last:
            acc = tl.zeros_like(acc)
            for p in range(0, n_split):
                acc += tl.load(ws_ptr + p * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        last = split == 0
    return acc, last


@jit_later
def _remap_stage1_kernel(
        x_ptr, vq_ptr, vt_ptr, sv_ptr, su_ptr, th_ptr, tt_ptr, ws_ptr, cnt_ptr,
        M, IN, K, S, stride_xm, tiles_m, tiles_n, steps_head, steps, per_split, n_split,
        HAS_V_TAIL: tl.constexpr, HAS_U_TAIL: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, E4M3_BITS: tl.constexpr):
    """t = x V_hat for one (BLOCK_M tokens x BLOCK_N components) tile and one reduction split.

    Reduction steps 0..steps_head-1 walk V's 8-bit head (x columns [0, S), S = s_in, possibly 0),
    the rest V's 16-bit tail (x columns [S, IN)); a split takes a contiguous range of steps and may
    straddle both.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = tile_coords(tile, tiles_m, tiles_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < K
    lo = split * per_split
    hi = tl.minimum(lo + per_split, steps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dot_steps(acc, x_ptr, stride_xm, 0, vq_ptr, S, S, offs_m, offs_n, M, K,
                     tl.minimum(lo, steps_head), tl.minimum(hi, steps_head), BLOCK_K, INPUT_PRECISION, E4M3_BITS)
    # v_scale is per component = per output column here: apply it once, after the head's sum
    v_scale = tl.load(sv_ptr + offs_n, mask=n_ok, other=0.0)
    if E4M3_BITS:
        v_scale = v_scale * 256.0
    acc = acc * v_scale[None, :]
    if HAS_V_TAIL:
        acc = _dot_steps(acc, x_ptr, stride_xm, S, vt_ptr, IN - S, IN - S, offs_m, offs_n, M, K,
                         tl.maximum(lo, steps_head) - steps_head, tl.maximum(hi, steps_head) - steps_head,
                         BLOCK_K, INPUT_PRECISION, False)

    row_ok = offs_m < M
    acc, last = _finish_splits(acc, ws_ptr, cnt_ptr, tile, split, n_split, offs_m, offs_n, row_ok, n_ok,
                               K, M * K, SPLIT_K)
    if last:
        # Epilogue: fold u_scale (stage 2's reduction-index scale) into the columns of t.
        offs = offs_m[:, None].to(tl.int64) * K + offs_n[None, :]
        mask = row_ok[:, None] & n_ok[None, :]
        su = tl.load(su_ptr + offs_n, mask=n_ok, other=0.0)
        tl.store(th_ptr + offs, (acc * su[None, :]).to(th_ptr.dtype.element_ty), mask=mask)
        if HAS_U_TAIL:
            tl.store(tt_ptr + offs, acc.to(tt_ptr.dtype.element_ty), mask=mask)


@jit_later
def _remap_stage2_kernel(
        th_ptr, tt_ptr, uq_ptr, ut_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, OUT, K, S, tiles_m, tiles_head, steps, per_split, n_split,
        HAS_U_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, E4M3_BITS: tl.constexpr):
    """y = t U_hat^T + bias for one output tile and one split of the reduction over k.

    Tiles 0 .. tiles_m*tiles_head-1 cover output columns [0, S) (S = s_out, U's 8-bit head, possibly
    empty; A = t_head with u_scale folded in); the others cover [S, OUT) (U's 16-bit tail, A = t).
    No tile straddles S.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    head_tiles = tiles_m * tiles_head
    in_head = tile < head_tiles
    col0 = tl.where(in_head, 0, S)
    n_len = tl.where(in_head, S, OUT - S)
    pid_m, pid_n = tile_coords(tl.where(in_head, tile, tile - head_tiles), tiles_m,
                                tl.cdiv(n_len, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # within the tile's row range of U
    lo = split * per_split
    hi = tl.minimum(lo + per_split, steps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if in_head:
        acc = _dot_steps(acc, th_ptr, K, 0, uq_ptr, K, K, offs_m, offs_n, M, n_len, lo, hi,
                         BLOCK_K, INPUT_PRECISION, E4M3_BITS)
        if E4M3_BITS:
            acc = acc * 256.0
    else:
        if HAS_U_TAIL:
            acc = _dot_steps(acc, tt_ptr, K, 0, ut_ptr, K, K, offs_m, offs_n, M, n_len, lo, hi,
                             BLOCK_K, INPUT_PRECISION, False)

    cols = col0 + offs_n
    row_ok = offs_m < M
    col_ok = offs_n < n_len
    acc, last = _finish_splits(acc, ws_ptr, cnt_ptr, tile, split, n_split, offs_m, cols, row_ok, col_ok,
                               OUT, M * OUT, SPLIT_K)
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        offs = offs_m[:, None].to(tl.int64) * OUT + cols[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host launcher and dispatch: tile counts, split-K plan, launches (shapes only, no sync)
# ----------------------------------------------------------------------------------------------
def _split_plan(num_tiles: int, num_steps: int, target_programs: int) -> tuple[int, int]:
    """(number of splits, reduction steps per split): split the reduction until the grid has about
    target_programs programs, never leaving a split without work."""
    if target_programs <= num_tiles or num_steps <= 1:
        return 1, num_steps
    per_split = cdiv(num_steps, min(cdiv(target_programs, num_tiles), num_steps))
    return cdiv(num_steps, per_split), per_split



def _split_buffers(n_split: int, num_tiles: int, m: int, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 workspace for the partial sums and zeroed per-tile arrival counters (split-K only)."""
    if n_split == 1:
        return like, like  # unused by the kernel (SPLIT_K=False)
    ws = empty((n_split, m, n), torch.float32, like.device)
    return ws, torch.zeros(num_tiles, dtype=torch.int32, device=like.device)


def _config(x: Tensor) -> dict:
    """Block config for x's token count; float32 activations take the bucket's "fp32" overrides."""
    cfg = pick_config("remap_matmul", x.shape[0], x.device)
    if x.dtype == torch.float32:
        cfg.update(cfg.get("fp32", {}))
    return cfg


def _kernel_options(cfg: dict, x: Tensor) -> dict:
    return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
            "GROUP_M": cfg["GROUP_M"], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "INPUT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
            **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})}  # a register cap, where a config sets one


def _nonempty(t: Tensor, fallback: Tensor) -> Tensor:
    # An empty tail (HAS_*_TAIL=False) or head (zero steps / tiles) is never read, but its null
    # pointer is better not passed. An empty head falls back to the other head (the same dtype, so
    # the same compiled kernel): a valid layout never has both empty, as then both factors would
    # have a tail.
    return t if t.numel() else fallback


def _remap_matmul_triton(x: Tensor, v_q: Tensor, v_tail: Tensor, v_scale: Tensor, u_q: Tensor,
                         u_tail: Tensor, u_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Host launcher of zskernels::remap_matmul (arguments already checked, x is 2-D)."""
    m, in_ = x.shape
    k, s_in = v_q.shape  # V's head rows (stage 1) and U's (stage 2): see the module docstring
    s_out = u_q.shape[0]
    out = s_out + u_tail.shape[0]
    has_v_tail, has_u_tail = in_ > s_in, out > s_out
    cfg = _config(x)
    opts = _kernel_options(cfg, x)
    opts["E4M3_BITS"] = v_q.dtype == torch.float8_e4m3fn and not _device.native_fp8(x.device)
    if opts["E4M3_BITS"]:  # no e4m3 loads before sm_89: the kernels decode the codes themselves
        v_q, u_q = v_q.view(torch.uint8), u_q.view(torch.uint8)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles_m = cdiv(m, bm)

    # stage 1: t = x V_hat, written as t_head = t * u_scale (and t when U has a tail)
    tiles_n = cdiv(k, bn)
    steps_head = cdiv(s_in, bk)
    steps = steps_head + cdiv(in_ - s_in, bk)
    n_split, per_split = _split_plan(tiles_m * tiles_n, steps, cfg["target_programs"])
    ws, cnt = _split_buffers(n_split, tiles_m * tiles_n, m, k, x)
    t_head = empty((m, k), x.dtype, x.device)
    t_plain = empty((m, k), x.dtype, x.device) if has_u_tail else t_head
    launch(_remap_stage1_kernel)[(tiles_m * tiles_n, n_split)](
        x, _nonempty(v_q, u_q), _nonempty(v_tail, v_q), v_scale, u_scale, t_head, t_plain, ws, cnt,
        m, in_, k, s_in, x.stride(0), tiles_m, tiles_n, steps_head, steps, per_split, n_split,
        HAS_V_TAIL=has_v_tail, HAS_U_TAIL=has_u_tail, SPLIT_K=n_split > 1, **opts)

    # stage 2: y = t_head @ u_q^T (rows < s_out) | t @ u_tail^T (rows >= s_out), + bias
    tiles_head, tiles_tail = cdiv(s_out, bn), cdiv(out - s_out, bn)
    num_tiles = tiles_m * (tiles_head + tiles_tail)
    n_split, per_split = _split_plan(num_tiles, cdiv(k, bk), cfg["target_programs"])
    ws, cnt = _split_buffers(n_split, num_tiles, m, out, x)
    y = empty((m, out), x.dtype, x.device)
    launch(_remap_stage2_kernel)[(num_tiles, n_split)](
        t_head, t_plain, _nonempty(u_q, v_q), _nonempty(u_tail, u_q), y if bias is None else bias, y, ws, cnt,
        m, out, k, s_out, tiles_m, tiles_head, cdiv(k, bk), per_split, n_split,
        HAS_U_TAIL=has_u_tail, HAS_BIAS=bias is not None, SPLIT_K=n_split > 1, **opts)
    return y



# ----------------------------------------------------------------------------------------------
# Op registration (the launcher above, as zskernels::remap_matmul) and the public op
# ----------------------------------------------------------------------------------------------
_triton.triton_op("zskernels::remap_matmul")(_remap_matmul_triton)


def remap_matmul(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None, *,
                 backend: str = "auto") -> Tensor:
    """y = x V_hat U_hat^T + bias for x (..., in) -> y (..., out), in x's dtype (fp32 accumulation).

    The Triton path dequantises in registers only (neither W nor the full factors are built).
    """
    if isinstance(x, Tensor) and x.numel() and cpu_fast_path(backend, x):
        return remap_matmul_cpu(x, packed, bias)  # checks once per packed dict (its plan)
    lay = check_call(x, packed, bias, "remap_matmul")
    if resolve_backend(backend, x) == "torch":
        return remap_matmul_reference(x, packed, bias)
    x2d = x.reshape(-1, lay.in_features)
    if x2d.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], lay.out_features)
    _triton.ready(__name__)
    y = torch.ops.zskernels.remap_matmul(x2d.contiguous(), *(packed[key].contiguous() for key in PACKED_KEYS), bias)
    return y.reshape(*x.shape[:-1], lay.out_features)

