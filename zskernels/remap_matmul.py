"""Low-rank matmul over remap-packed factors: y = x V_hat U_hat^T + bias.

A weight W (out x in) is kept as a rank-k factor pair W ~= U V^T, U (out x k), V (in x k).
ZS-SVD's "remap" storage (after Dobi-SVD) charges each kept component max(out, in) fp16 slots:
with L = max(out, in) and s = min(out, in), call "big" the factor with L rows (U when
out >= in, else V) and "small" the other one; per component j (column j of both factors)

* the small factor's s entries are stored in 8 bits,
* the first s entries (rows 0..s-1) of the big factor's column are stored in 8 bits,
* the remaining L - s entries of the big factor's column stay 16-bit (fp16, or bf16 on request),

which is 2*k*L bytes of payload, plus two fp32 scales per component (``remap_nbytes``).

Uniform description used below: for EACH factor F (U or V), its first s rows are its "head"
(8-bit, one absmax scale per component) and its remaining rows its "tail" (16-bit). The small
factor has an empty tail; for a square W both tails are empty.

Packed layout (``pack_remap`` returns plain named tensors, all contiguous)
--------------------------------------------------------------------------
Both factors are stored the way nn.Linear stores a weight, i.e. with the reduction dimension of
the GEMM that reads them contiguous ("K-major"): stage 1 reduces over ``in`` and reads V^T
(k x in); stage 2 reduces over ``k`` and reads U (out x k).

  name     shape          dtype        content
  v_q      (k, s)         int8 | fp8   (V[:s, :] / v_scale)^T   8-bit head of V, transposed
  v_tail   (k, in - s)    fp16 | bf16  V[s:, :]^T               empty unless in > out
  v_scale  (k,)           fp32         per-component dequantisation scale of V's head
  u_q      (s, k)         int8 | fp8   U[:s, :] / u_scale       8-bit head of U
  u_tail   (out - s, k)   fp16 | bf16  U[s:, :]                 empty unless out > in
  u_scale  (k,)           fp32         per-component dequantisation scale of U's head

Dequantisation: V_hat[:s, j] = v_q[j, :] * v_scale[j], U_hat[:s, j] = u_q[:, j] * u_scale[j],
tails as stored. The 8-bit format is read from the dtype (torch.int8: symmetric integers in
[-127, 127], scale = absmax / 127; torch.float8_e4m3fn: scale = absmax / 448); nothing else is
needed to interpret the dict, so it survives safetensors unchanged. Paper accounting packs the
two 8-bit heads two-to-a-16-bit-slot; keeping them as two int8 tensors is byte-for-byte the
same size and lets each stage read only its own factor.

Choice of the 8-bit format: int8, by perplexity on a real model
----------------------------------------------------------------
Synthetic factors first (``bench/remap_format_accuracy.py``, CPU):
Synthetic W with known SVD, k = 0.6 * rank, balanced factors, fp16 tails. Output error
||x W_k^T - x W_hat^T|| / ||x W_k^T|| (quantisation alone) for out x in = 1024x1024 / 2048x1024 /
1024x2048, 256 tokens:

  factors                                    int8 (absmax/127)       fp8 e4m3 (absmax/448)
  sigma_i ~ i^-0.5                           1.10e-2 / 0.95 / 0.96   3.72e-2 / 3.24 / 3.22
  sigma_i ~ exp(-i / (rank/4))               1.10e-2 / 0.96 / 0.97   3.75e-2 / 3.22 / 3.23
  whitened, channel scales log-std 0.5       2.50e-2 / 2.19 / 1.80   3.75e-2 / 3.29 / 3.23
  whitened, log-std 1.0, 1/256 channels x30  26.4e-2 / 18.7 / 11.9   3.72e-2 / 3.19 / 3.27

("whitened": W = P S Q^T D^-1 with lognormal input-channel scales D, factored in whitened
coordinates, so V = D^-1 Q_k sqrt(S) -- as ZS-SVD's V carries S^-T -- and activations x = z D.)
The reconstruction error ||W - W_hat|| / ||W|| is dominated by truncation (0.26 for i^-0.5,
0.090 int8 / 0.095 fp8 for the exponential spectrum). int8 is 3x more accurate when the rows
of a factor have similar sizes, but its uniform grid flushes the small entries of the rows
that meet the LARGEST activations once the input channels spread (whitened factors): then it
is 5x worse. e4m3's relative precision does not care (3.2-3.8% everywhere). The pipeline
passes whitened factors, so synthetic data alone would pick fp8's smaller worst case.

The real factors settle it: SmolLM2-135M, zero-sum remap selection, WikiText-2 calibration
(32 x 512) and test perplexity (24 x 512), the same ranks with float32 factors as reference:

  ratio   float32 factors   int8     fp8 e4m3
  0.8     30.58             31.09    31.69
  0.6     44.90             46.35    46.34

int8 is better at 0.8 and equal at 0.6, so the default is ``fmt="int8"``; ``fmt="fp8"`` remains
available.

Kernel design (Triton path)
---------------------------
Two stages, each a mixed-precision GEMM whose 8-bit operand is converted to the activation
dtype in registers (never dequantised to memory):

stage 1  t = x V_hat  (M x k).  The reduction runs over ``in``, and the 8-bit head covers the
         reduction rows [0, s) while v_scale sits on the OUTPUT index j. So the head loop
         accumulates x[:, :s] @ v_q^T unscaled, the accumulator's columns are multiplied by
         v_scale once, and the tail loop (rows [s, in), 16-bit, only when in > out) keeps
         accumulating into the same registers: acc = acc_head * v_scale + acc_tail.
stage 2  y = t U_hat^T + bias.  Here u_scale sits on the REDUCTION index (k), so it cannot be
         pulled out of the sum; instead stage 1's epilogue writes t_head = t * u_scale (its
         columns scaled) and, when U has a tail, also t itself. Output rows [0, s) are then a
         plain GEMM t_head @ u_q^T and rows [s, out) a plain GEMM t @ u_tail^T. One launch
         covers both row ranges: the first programs take head tiles, the rest tail tiles.

Everything accumulates in fp32; MMA operands are in x's dtype (fp16 / bf16; fp32 inputs use
exact "ieee" fp32 dots). t is stored in x's dtype (it is an MMA operand of stage 2 anyway; it
is M x k, small next to the weights). For tiny components t * u_scale may land among fp16
subnormals; the absolute error that adds (2^-25 * 448 per term at most) is far below the 8-bit
quantisation error. int8 and e4m3 values are exact in fp16 and bf16, so the conversion in
registers adds no error; a fp16 tail read with bf16 activations is rounded to bf16.
GPUs that cannot load e4m3 (before sm_89: A100) read the fp8 heads as uint8 codes and decode
them by bit arithmetic to fp16 numbers 2^-8 times the values; the scales take the 2^8 back.
Both steps are exact, so the result equals the native path's bit for bit.

Dispatch by token count M (``configs/remap_matmul.json``, chosen on the host from shapes only):

* decode (M <= 16; likewise M <= 64 with 64-row tiles): GEMV-like and memory bound. With M tiny
  the grid over output tiles alone is far below 132 SMs (stage 1 at k = 2464 has 39 column
  tiles of 64), so the reduction is split ("split-K") until about two programs per SM exist.
  Each split stores its fp32 partial to a workspace and the LAST program of a tile to finish
  (an acq_rel atomic counter tells it) adds the partials in split order and runs the epilogue:
  deterministic, one launch per stage, no extra reduction kernel (the counters cost a
  memset per stage). Column tiles stay 64 wide so the activation tile that every program re-reads from
  L2 is at most half the bytes of its weight tile.
* M <= 256: 128 x 128 tensor-core tiles, split-K only up to one wave of programs.
* prefill (M > 256): 128 x 128 x 64 tiles, no split, grouped tile order for L2 reuse.

Checked without a GPU (``bench/aot_check.py``: ahead-of-time compile of every launch at LLaMA-7B
shapes, for sm_90 and sm_80, with Triton 3.9 and 3.6): decode tiles lower to mma.sync m16n8k16,
the larger ones to wgmma m64n128k16, and e4m3 weights convert with the packed
cvt.rn.f16x2.e4m3x2. Loads are cp.async pipelined. On sm_90 the fp16/bf16 variants use 56-179
registers, with at most 16 bytes of spills in a few decode launches. fp32 activations get smaller
tiles from the config's "fp32" overrides for the same reason.

Costs at k = 0.6 * rank (LLaMA-7B 4096 x 4096): the weights move 2*k*L = 20 MB against 33.5 MB
dense fp16 (decode floor 0.6x dense); but the FLOPs are k*(out+in) / (out*in) = 1.2x dense
(1.6x at k = 0.8 * rank), so with fp16 MMA math prefill cannot beat dense cuBLAS: matching
its ~104 us at M = 2048 with k = 0.8 * rank would take ~1060 TFLOP/s, above the H100's fp16
peak (989). Only 8-bit MMA on both operands (activations quantised too) could; not done here.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

from typing import NamedTuple, Optional

import torch

from ._backend import check_same_device, jit_kernels, native_fp8, resolve_backend
from ._configs import pick_config

Tensor = torch.Tensor

FORMATS = ("int8", "fp8")
DEFAULT_FMT = "int8"  # chosen by perplexity on SmolLM2-135M, see the module docstring
TAIL_DTYPES = (torch.float16, torch.bfloat16)
PACKED_KEYS = ("v_q", "v_tail", "v_scale", "u_q", "u_tail", "u_scale")

_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0}
_FMT_OF_DTYPE = {dtype: fmt for fmt, dtype in _QDTYPE.items()}
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tests set this to fill every buffer the kernels write with NaN, so unwritten entries show.
_POISON_BUFFERS = False


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------
def _check_factors(U: Tensor, V: Tensor) -> tuple[int, int, int]:
    for name, f in (("U", U), ("V", V)):
        if not isinstance(f, Tensor):
            raise TypeError(f"pack_remap: {name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 2:
            raise ValueError(f"pack_remap: {name} must be 2-D (rows x rank), got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"pack_remap: {name} must be a floating tensor, got {f.dtype}")
    (out, k), (in_, kv) = U.shape, V.shape
    if k != kv:
        raise ValueError(f"pack_remap: U is {tuple(U.shape)} and V is {tuple(V.shape)}; they need the "
                         "same number of columns (the rank k): W ~= U @ V.T")
    s = min(out, in_)
    if k < 1 or k > s:
        raise ValueError(f"pack_remap: rank k={k} must be in [1, min(out, in)] = [1, {s}]; remap "
                         "storage only pays off for k <= min(out, in) -- keep W dense instead")
    check_same_device(U=U, V=V)
    for name, f in (("U", U), ("V", V)):
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"pack_remap: {name} has non-finite entries (inf/NaN); fix the factorisation")
    return out, in_, k


def _quantise_columns(F: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """Symmetric absmax quantisation of each column of F: (q, scale) with F ~= q * scale."""
    qmax = _QMAX[fmt]
    absmax = F.abs().amax(dim=0).to(torch.float32)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))  # zero column -> q = 0
    y = (F.to(torch.float64) / scale.to(torch.float64)).clamp(-qmax, qmax)
    q = y.round().to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)
    return q, scale


def _to_tail(F: Tensor, tail_dtype: torch.dtype, name: str) -> Tensor:
    tail = F.to(tail_dtype)
    if not bool(torch.isfinite(tail).all()):
        raise ValueError(f"pack_remap: {name}'s 16-bit tail overflows {tail_dtype}; "
                         "pass tail_dtype=torch.bfloat16 or rescale the factors")
    return tail


def pack_remap(U: Tensor, V: Tensor, *, fmt: str = DEFAULT_FMT,
               tail_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """Pack W ~= U @ V.T (U: out x k, V: in x k, k <= min(out, in)) into remap storage.

    Returns the dict described in the module docstring (plain contiguous tensors on U's device).
    Pass balanced factors (e.g. U_k sqrt(S), V_k sqrt(S)): each 8-bit head has one scale per
    component, so both factors should carry comparable magnitudes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"pack_remap: fmt must be one of {FORMATS}, got {fmt!r}")
    if tail_dtype not in TAIL_DTYPES:
        raise ValueError(f"pack_remap: tail_dtype must be torch.float16 or torch.bfloat16, got {tail_dtype}")
    out, in_, _ = _check_factors(U, V)
    s = min(out, in_)
    v_q, v_scale = _quantise_columns(V[:s], fmt)
    u_q, u_scale = _quantise_columns(U[:s], fmt)
    return {
        "v_q": v_q.t().contiguous(),
        "v_tail": _to_tail(V[s:], tail_dtype, "V").t().contiguous(),
        "v_scale": v_scale.contiguous(),
        "u_q": u_q.contiguous(),
        "u_tail": _to_tail(U[s:], tail_dtype, "U").contiguous(),
        "u_scale": u_scale.contiguous(),
    }


class Layout(NamedTuple):
    out_features: int
    in_features: int
    rank: int
    head: int  # s = min(out, in)
    fmt: str
    tail_dtype: torch.dtype


def packed_layout(packed: dict[str, Tensor]) -> Layout:
    """Shapes and formats of a packed dict, checked for consistency (shapes only, no sync)."""
    if not isinstance(packed, dict):
        raise TypeError(f"packed must be the dict returned by pack_remap, got {type(packed).__name__}")
    missing = [key for key in PACKED_KEYS if key not in packed]
    if missing:
        raise ValueError(f"packed dict lacks {missing}; build it with pack_remap(U, V)")
    if not all(isinstance(packed[key], Tensor) for key in PACKED_KEYS):
        raise TypeError(f"packed values {PACKED_KEYS} must all be torch.Tensors")
    v_q, v_tail, v_scale, u_q, u_tail, u_scale = (packed[key] for key in PACKED_KEYS)
    if v_q.dim() != 2 or u_q.dim() != 2 or v_tail.dim() != 2 or u_tail.dim() != 2:
        raise ValueError("packed v_q, v_tail, u_q, u_tail must all be 2-D; build the dict with pack_remap")
    k, s = v_q.shape
    problems = []
    if v_q.dtype not in _FMT_OF_DTYPE or u_q.dtype != v_q.dtype:
        problems.append(f"v_q/u_q dtypes {v_q.dtype}/{u_q.dtype} (need both int8 or both float8_e4m3fn)")
    if v_tail.dtype not in TAIL_DTYPES or u_tail.dtype != v_tail.dtype:
        problems.append(f"tail dtypes {v_tail.dtype}/{u_tail.dtype} (need both float16 or both bfloat16)")
    if tuple(u_q.shape) != (s, k) or v_tail.shape[0] != k or u_tail.shape[1] != k:
        problems.append(f"shapes v_q {tuple(v_q.shape)}, u_q {tuple(u_q.shape)}, v_tail {tuple(v_tail.shape)}, "
                        f"u_tail {tuple(u_tail.shape)} disagree on k and s")
    if v_tail.shape[1] and u_tail.shape[0]:
        problems.append("both factors have a 16-bit tail; only the bigger factor may have one")
    for name, sc in (("v_scale", v_scale), ("u_scale", u_scale)):
        if sc.dtype != torch.float32 or tuple(sc.shape) != (k,):
            problems.append(f"{name} is {sc.dtype} {tuple(sc.shape)} (need float32 ({k},))")
    if problems:
        raise ValueError("malformed packed dict: " + "; ".join(problems))
    return Layout(s + u_tail.shape[0], s + v_tail.shape[1], k, s, _FMT_OF_DTYPE[v_q.dtype], v_tail.dtype)


def unpack_remap(packed: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Dequantised factors (U_hat: out x k, V_hat: in x k), float32."""
    packed_layout(packed)
    p = {key: packed[key].to(torch.float32) for key in PACKED_KEYS}
    v_hat = torch.cat([p["v_q"] * p["v_scale"][:, None], p["v_tail"]], dim=1).t()
    u_hat = torch.cat([p["u_q"] * p["u_scale"][None, :], p["u_tail"]], dim=0)
    return u_hat.contiguous(), v_hat.contiguous()


def remap_nbytes(out_features: int, in_features: int, k: int) -> dict[str, int]:
    """Bytes of remap storage: payload 2*k*max(out, in) (= k*max fp16 slots) + 8*k of scales."""
    if min(out_features, in_features) < 1 or not 1 <= k <= min(out_features, in_features):
        raise ValueError(f"remap_nbytes: need out, in >= 1 and 1 <= k <= min(out, in), got "
                         f"out={out_features}, in={in_features}, k={k}")
    payload = 2 * k * max(out_features, in_features)
    scales = 2 * 4 * k
    return {"payload": payload, "scales": scales, "total": payload + scales}


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------
def _check_call(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], where: str) -> Layout:
    lay = packed_layout(packed)
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{where}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != lay.in_features:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}; its last dimension must be "
                         f"in_features = {lay.in_features}")
    tensors = {key: packed[key] for key in PACKED_KEYS}
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"{where}: bias must be a floating torch.Tensor or None")
        if tuple(bias.shape) != (lay.out_features,):
            raise ValueError(f"{where}: bias has shape {tuple(bias.shape)}, need ({lay.out_features},)")
        tensors["bias"] = bias
    check_same_device(x=x, **tensors)
    return lay


def remap_matmul_reference(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """Plain torch: dequantise the factors, y = (x V_hat) U_hat^T + bias in fp32, cast to x.dtype."""
    _check_call(x, packed, bias, "remap_matmul_reference")
    u_hat, v_hat = unpack_remap(packed)
    y = (x.to(torch.float32) @ v_hat) @ u_hat.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def remap_matmul(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None, *,
                 backend: str = "auto") -> Tensor:
    """y = x V_hat U_hat^T + bias for x (..., in) -> y (..., out), in x's dtype (fp32 accumulation).

    The Triton path dequantises in registers only (neither W nor the full factors are built).
    """
    lay = _check_call(x, packed, bias, "remap_matmul")
    if resolve_backend(backend, x) == "torch":
        return remap_matmul_reference(x, packed, bias)
    x2d = x.reshape(-1, lay.in_features)
    if x2d.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], lay.out_features)
    y = _triton_op()(x2d.contiguous(), *(packed[key].contiguous() for key in PACKED_KEYS), bias)
    return y.reshape(*x.shape[:-1], lay.out_features)


# ----------------------------------------------------------------------------------------------
# Host side of the Triton path: tile counts, split-K plan, launches
# ----------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_plan(num_tiles: int, num_steps: int, target_programs: int) -> tuple[int, int]:
    """(number of splits, reduction steps per split): split the reduction until the grid has about
    target_programs programs, never leaving a split without work."""
    if target_programs <= num_tiles or num_steps <= 1:
        return 1, num_steps
    per_split = _cdiv(num_steps, min(_cdiv(target_programs, num_tiles), num_steps))
    return _cdiv(num_steps, per_split), per_split


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if _POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _split_buffers(n_split: int, num_tiles: int, m: int, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 workspace for the partial sums and zeroed per-tile arrival counters (split-K only)."""
    if n_split == 1:
        return like, like  # unused by the kernel (SPLIT_K=False)
    ws = _buffer((n_split, m, n), torch.float32, like.device)
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
            "INPUT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}


def _nonempty(t: Tensor, fallback: Tensor) -> Tensor:
    # An empty tail is never read (HAS_*_TAIL=False), but its null pointer is better not passed.
    return t if t.numel() else fallback


def _remap_matmul_triton(x: Tensor, v_q: Tensor, v_tail: Tensor, v_scale: Tensor, u_q: Tensor,
                         u_tail: Tensor, u_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Body of the zskernels::remap_matmul triton_op (arguments already checked, x is 2-D)."""
    m, in_ = x.shape
    k, s = v_q.shape
    out = s + u_tail.shape[0]
    has_v_tail, has_u_tail = in_ > s, out > s
    cfg = _config(x)
    opts = _kernel_options(cfg, x)
    opts["E4M3_BITS"] = v_q.dtype == torch.float8_e4m3fn and not native_fp8(x.device)
    if opts["E4M3_BITS"]:  # no e4m3 loads before sm_89: the kernels decode the codes themselves
        v_q, u_q = v_q.view(torch.uint8), u_q.view(torch.uint8)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles_m = _cdiv(m, bm)

    # stage 1: t = x V_hat, written as t_head = t * u_scale (and t when U has a tail)
    tiles_n = _cdiv(k, bn)
    steps_head = _cdiv(s, bk)
    steps = steps_head + _cdiv(in_ - s, bk)
    n_split, per_split = _split_plan(tiles_m * tiles_n, steps, cfg["target_programs"])
    ws, cnt = _split_buffers(n_split, tiles_m * tiles_n, m, k, x)
    t_head = _buffer((m, k), x.dtype, x.device)
    t_plain = _buffer((m, k), x.dtype, x.device) if has_u_tail else t_head
    wrap_triton(_remap_stage1_kernel)[(tiles_m * tiles_n, n_split)](
        x, v_q, _nonempty(v_tail, v_q), v_scale, u_scale, t_head, t_plain, ws, cnt,
        m, in_, k, s, x.stride(0), tiles_m, tiles_n, steps_head, steps, per_split, n_split,
        HAS_V_TAIL=has_v_tail, HAS_U_TAIL=has_u_tail, SPLIT_K=n_split > 1, **opts)

    # stage 2: y = t_head @ u_q^T (rows < s) | t @ u_tail^T (rows >= s), + bias
    tiles_head, tiles_tail = _cdiv(s, bn), _cdiv(out - s, bn)
    num_tiles = tiles_m * (tiles_head + tiles_tail)
    n_split, per_split = _split_plan(num_tiles, _cdiv(k, bk), cfg["target_programs"])
    ws, cnt = _split_buffers(n_split, num_tiles, m, out, x)
    y = _buffer((m, out), x.dtype, x.device)
    wrap_triton(_remap_stage2_kernel)[(num_tiles, n_split)](
        t_head, t_plain, u_q, _nonempty(u_tail, u_q), y if bias is None else bias, y, ws, cnt,
        m, out, k, s, tiles_m, tiles_head, _cdiv(k, bk), per_split, n_split,
        HAS_U_TAIL=has_u_tail, HAS_BIAS=bias is not None, SPLIT_K=n_split > 1, **opts)
    return y


# ----------------------------------------------------------------------------------------------
# Triton kernels. Written as plain functions marked @_jit_later and turned into triton.jit
# functions on first use (_triton_ops), so `import zskernels` needs no triton.
# ----------------------------------------------------------------------------------------------
_JIT_NAMES: list[str] = []


def _jit_later(fn):
    _JIT_NAMES.append(fn.__name__)
    return fn


@_jit_later
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a linear tile index, GROUP_M row tiles per column sweep, so
    programs running together share weight tiles in L2 (prefill); GROUP_M = 1 is row-major."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@_jit_later
def _dot_steps(acc, a_ptr, lda, a_col0, b_ptr, ldb, seg_len, offs_m, offs_n, m_lim, n_lim,
               step_lo, step_hi, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               E4M3_BITS: tl.constexpr):
    """acc += A[offs_m, a_col0 + r] @ B[offs_n, r]^T for r over steps [step_lo, step_hi) of one
    reduction segment of length seg_len.

    A is the activation (x or t, row stride lda, in the MMA dtype); B is a weight segment stored
    K-major (row stride ldb, r contiguous), so each thread loads 16 contiguous bytes along r. B is
    converted to A's dtype in registers: int8/e4m3 -> fp16/bf16 is exact. With E4M3_BITS, B holds
    e4m3 codes as uint8 and the sum comes out 2^-8 times too small (see _e4m3_codes_as_f16).
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
            b = _e4m3_codes_as_f16(b)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    return acc


@_jit_later
def _e4m3_codes_as_f16(codes):
    """fp16 numbers equal to the e4m3fn values of ``codes`` (uint8) times 2^-8, exactly.

    Sign and the 7 exponent+mantissa bits move to their fp16 positions; fp16's exponent bias (15
    instead of 7) supplies the 2^-8, for normals and subnormals alike. The quantiser never writes
    the NaN codes 0x7F / 0xFF.
    """
    c = codes.to(tl.int32)
    return (((c & 0x7F) << 7) | ((c & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)


@_jit_later
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


@_jit_later
def _remap_stage1_kernel(
        x_ptr, vq_ptr, vt_ptr, sv_ptr, su_ptr, th_ptr, tt_ptr, ws_ptr, cnt_ptr,
        M, IN, K, S, stride_xm, tiles_m, tiles_n, steps_head, steps, per_split, n_split,
        HAS_V_TAIL: tl.constexpr, HAS_U_TAIL: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, E4M3_BITS: tl.constexpr):
    """t = x V_hat for one (BLOCK_M tokens x BLOCK_N components) tile and one reduction split.

    Reduction steps 0..steps_head-1 walk V's 8-bit head (x columns [0, S)), the rest V's 16-bit
    tail (x columns [S, IN)); a split takes a contiguous range of steps and may straddle both.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = _tile_coords(tile, tiles_m, tiles_n, GROUP_M)
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


@_jit_later
def _remap_stage2_kernel(
        th_ptr, tt_ptr, uq_ptr, ut_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, OUT, K, S, tiles_m, tiles_head, steps, per_split, n_split,
        HAS_U_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, E4M3_BITS: tl.constexpr):
    """y = t U_hat^T + bias for one output tile and one split of the reduction over k.

    Tiles 0 .. tiles_m*tiles_head-1 cover output columns [0, S) (U's 8-bit head, A = t_head with
    u_scale folded in); the others cover [S, OUT) (U's 16-bit tail, A = t). No tile straddles S.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    head_tiles = tiles_m * tiles_head
    in_head = tile < head_tiles
    col0 = tl.where(in_head, 0, S)
    n_len = tl.where(in_head, S, OUT - S)
    pid_m, pid_n = _tile_coords(tl.where(in_head, tile, tile - head_tiles), tiles_m,
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


_OP = None  # the registered torch.library op, once _register_triton_op has run


def _triton_op():
    # A plain global read, so torch.compile (which would trace into the registration) sees the
    # op as a constant once an eager call has registered it.
    return _OP if _OP is not None else _register_triton_op()


@torch.compiler.disable
def _register_triton_op():
    """JIT the kernels and register the torch.library op (on the first Triton call only)."""
    global _OP
    from torch.library import triton_op

    jit_kernels(globals(), _JIT_NAMES)
    _OP = triton_op("zskernels::remap_matmul", mutates_args=())(_remap_matmul_triton)
    return _OP
