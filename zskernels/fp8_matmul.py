"""fp8 (e4m3) weight matmuls with fused dequantisation, for Zero-Sum SVD's "HQ" mode.

HQ mode keeps twice the target's parameters and stores every one of them in 8 bits. Two forms:

(a) a matrix kept dense, ``y = x W_hat^T + b``::

        quantize_fp8_dense(W) -> {"weight_fp8":   (out, in) float8_e4m3fn, row-major,
                                  "weight_scale": (out,)    float32}
        W_hat[o, i] = weight_fp8[o, i] * weight_scale[o]          (one scale per output row)

(b) a factor pair W ~= U V^T (U: out x k, V: in x k), ``y = (x V_hat) U_hat^T + b``::

        pack_fp8_lowrank(U, V) -> {"u_fp8":   (out, k) float8_e4m3fn, row-major,
                                   "u_scale": (k,)      float32,
                                   "vt_fp8":  (k, in)   float8_e4m3fn, row-major (V stored transposed),
                                   "v_scale": (k,)      float32}
        U_hat[o, j] = u_fp8[o, j] * u_scale[j],   V_hat[i, j] = vt_fp8[j, i] * v_scale[j]

    Payload k (out + in) bytes, plus 8 k bytes of scales (one per component and factor).
    V is stored transposed so that both factors, like the dense weight, are row-major in the
    dimension their matmul reduces over (nn.Linear's layout): each program then streams whole
    contiguous rows of fp8 bytes.

Scales are ``amax / 448`` (448 is e4m3's largest finite value), so every row / component uses the
full fp8 range; all-zero rows get scale 1. Non-finite weights are rejected at quantisation time.
The dicts hold plain tensors only, so they become module buffers or safetensors entries as they are.

Public API::

    quantize_fp8_dense(W) -> dict                 pack_fp8_lowrank(U, V) -> dict
    fp8_linear(x, packed, bias=None, *, backend="auto") -> y                     (form a)
    fp8_lowrank_matmul(x, packed, bias=None, *, backend="auto") -> y             (form b)
    fp8_linear_reference(...), fp8_lowrank_matmul_reference(...)    plain torch, fp32 math
    dequantize_fp8(packed) -> W_hat (form a) or (U_hat, V_hat) (form b), float32
    fp8_nbytes(packed), fp8_nbytes_for_shape(out, in, rank=None) -> {"payload", "scales", "total"}

``x`` is (..., in) in float16 / bfloat16 / float32; ``y`` is (..., out) in x's dtype; products are
accumulated in fp32. The Triton kernels never materialise a dequantised matrix: they load fp8 bytes,
convert them in registers, and apply the scales to the fp32 accumulators:

* form (a): the per-row scale multiplies output column o after the reduction over ``in``;
* form (b): stage 1 reduces over ``in`` into t (M x k) and multiplies by v_scale[j] * u_scale[j]
  (U's scale folded into t, times 2^8 to keep t in fp16's normal range); stage 2 reduces t over k
  against the raw fp8 U and multiplies by 2^-8 (exact powers of two). t stays fp32
  for the M = 1 GEMV and is otherwise stored in x's dtype (the next tensor-core operand).

Paths (chosen on the host from the token count M; block sizes in ``configs/fp8_matmul.json``):

* decode (small M): GEMV (M = 1: broadcast-multiply-sum, no tensor cores) or a small-tile ``tl.dot``,
  with split-K over the reduction dimension when the output alone gives too few programs to fill
  the GPU. Split-K is deterministic: partial sums go to an fp32 workspace and are summed in a fixed
  order -- by a small reduction kernel, or, for form (b)'s stage 1, directly by stage 2 as it loads t.
* prefill (large M): a tiled ``tl.dot`` GEMM with grouped program order; fp8 -> fp16/bf16 in
  registers, fp16/bf16 tensor-core dot (fp32 inputs use an exact "ieee" fp32 dot).

GPUs without fp8 support (CUDA compute capability < 8.9, where Triton rejects ``float8e4nv``): the
same kernels load the fp8 bytes as uint8 and decode the e4m3 bit patterns arithmetically (bits moved
into an fp16 bit pattern, times 2^8; exact for all 256 codes). ``_backend.native_fp8`` makes the choice.
No fp8 x fp8 tensor-core path is implemented (activations stay fp16/bf16).

The Triton paths are the torch.library ops ``zskernels::fp8_linear`` and
``zskernels::fp8_lowrank_matmul`` (triton_op + wrap_triton: torch.compile and CUDA graphs see
through them). They are registered by the first Triton call: make one eager call before compiling.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

import types
from typing import Optional

import torch
from torch.library import triton_op

from ._backend import check_same_device, jit_kernels, native_fp8, resolve_backend
from ._configs import pick_config

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8 = torch.float8_e4m3fn
DENSE_KEYS = ("weight_fp8", "weight_scale")
LOWRANK_KEYS = ("u_fp8", "u_scale", "vt_fp8", "v_scale")
# Form (b) multiplies t by u_scale * 2^8 and y by 2^-8: t then has the size of t * max|U[:, j]| * 0.57
# rather than t * max|U[:, j]| / 448, which keeps an fp16 t (stage 2's tensor-core operand) out of
# the subnormals. Powers of two: exact.
FOLD = 256.0
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Quantisation and storage
# --------------------------------------------------------------------------------------------
def _quantize_rows(mat: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 payload and fp32 scale for each row of a 2-D matrix (scale = row amax / 448)."""
    if not mat.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {mat.dtype}")
    mat = mat.detach().float()
    if not torch.isfinite(mat).all():  # host sync: fine, quantisation happens once, offline
        raise ValueError(f"{what} contains NaN/Inf (or values beyond float32 range); fp8 cannot "
                         f"store them -- fix the weights before quantising")
    amax = mat.abs().amax(dim=1)
    tiny = torch.finfo(torch.float32).tiny  # keeps amax / 448 from underflowing to zero
    scale = torch.where(amax > 0, (amax / E4M3_MAX).clamp_min(tiny), torch.ones_like(amax))
    # W / scale can round a hair past 448; torch's cast does not saturate on every device.
    payload = (mat / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return payload, scale


def quantize_fp8_dense(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantise W (out x in) to fp8 e4m3 with one fp32 scale per output row (form a)."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out x in), got shape {tuple(W.shape)}")
    payload, scale = _quantize_rows(W, "W")
    return {"weight_fp8": payload.contiguous(), "weight_scale": scale.contiguous()}


def pack_fp8_lowrank(U: torch.Tensor, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantise W ~= U V^T (U: out x k, V: in x k) with one fp32 scale per component and factor."""
    if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[1]:
        raise ValueError(f"need U (out x k) and V (in x k) with the same k, got {tuple(U.shape)} "
                         f"and {tuple(V.shape)}")
    check_same_device(U=U, V=V)
    ut, u_scale = _quantize_rows(U.T, "U")  # rows of U^T are U's components
    vt, v_scale = _quantize_rows(V.T, "V")
    return {"u_fp8": ut.T.contiguous(), "u_scale": u_scale.contiguous(),
            "vt_fp8": vt.contiguous(), "v_scale": v_scale.contiguous()}


def _packed_form(packed: dict) -> str:
    """'dense' or 'lowrank', after checking the dict's keys, dtypes, shapes and device."""
    if not isinstance(packed, dict):
        raise TypeError(f"packed must be the dict from quantize_fp8_dense / pack_fp8_lowrank, "
                        f"got {type(packed).__name__}")
    keys = set(packed)
    if keys == set(DENSE_KEYS):
        form, payloads, scales = "dense", ("weight_fp8",), ("weight_scale",)
    elif keys == set(LOWRANK_KEYS):
        form, payloads, scales = "lowrank", ("u_fp8", "vt_fp8"), ("u_scale", "v_scale")
    else:
        raise ValueError(f"packed must have keys {DENSE_KEYS} (quantize_fp8_dense) or {LOWRANK_KEYS} "
                         f"(pack_fp8_lowrank), got {sorted(keys)}")
    for name in payloads:
        if packed[name].dtype != FP8 or packed[name].dim() != 2:
            raise TypeError(f"packed[{name!r}] must be a 2-D float8_e4m3fn tensor, got "
                            f"{packed[name].dtype} of shape {tuple(packed[name].shape)}")
        if not packed[name].is_contiguous():
            raise ValueError(f"packed[{name!r}] must be contiguous (row-major; call .contiguous())")
    for name in scales:
        if packed[name].dtype != torch.float32 or packed[name].dim() != 1:
            raise TypeError(f"packed[{name!r}] must be a 1-D float32 tensor, got {packed[name].dtype} "
                            f"of shape {tuple(packed[name].shape)}")
    _check_packed_shapes(packed, form)
    check_same_device(**packed)
    return form


def _check_packed_shapes(packed: dict, form: str) -> None:
    if form == "dense":
        expected = {"weight_scale": (packed["weight_fp8"].shape[0],)}
    else:
        out_features, k = packed["u_fp8"].shape
        expected = {"u_scale": (k,), "v_scale": (k,), "vt_fp8": (k, packed["vt_fp8"].shape[1])}
    for name, shape in expected.items():
        if tuple(packed[name].shape) != shape:
            raise ValueError(f"packed[{name!r}] has shape {tuple(packed[name].shape)}, expected {shape}")


def dequantize_fp8(packed: dict[str, torch.Tensor]):
    """float32 W_hat (out x in) for form (a); (U_hat (out x k), V_hat (in x k)) for form (b)."""
    if _packed_form(packed) == "dense":
        return packed["weight_fp8"].float() * packed["weight_scale"][:, None]
    u_hat = packed["u_fp8"].float() * packed["u_scale"][None, :]
    v_hat = packed["vt_fp8"].float().T * packed["v_scale"][None, :]
    return u_hat, v_hat


def fp8_nbytes_for_shape(out_features: int, in_features: int, rank: Optional[int] = None) -> dict[str, int]:
    """Bytes of form (a) (rank None) or form (b) (rank k): fp8 payload, fp32 scales, total."""
    if rank is None:
        payload, scales = out_features * in_features, 4 * out_features
    else:
        payload, scales = rank * (out_features + in_features), 2 * 4 * rank
    return {"payload": payload, "scales": scales, "total": payload + scales}


def fp8_nbytes(packed: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes a packed dict occupies: fp8 payload, fp32 scales, total."""
    form = _packed_form(packed)
    payload_keys = ("weight_fp8",) if form == "dense" else ("u_fp8", "vt_fp8")
    payload = sum(packed[k].numel() * packed[k].element_size() for k in payload_keys)
    scales = sum(t.numel() * t.element_size() for k, t in packed.items() if k not in payload_keys)
    return {"payload": payload, "scales": scales, "total": payload + scales}


# --------------------------------------------------------------------------------------------
# Argument checks shared by the references and the kernels
# --------------------------------------------------------------------------------------------
def _check_call(x: torch.Tensor, packed: dict, bias: Optional[torch.Tensor], form: str, op: str) -> tuple[int, int]:
    """Validate x, packed and bias for ``op``; return (in_features, out_features)."""
    if _packed_form(packed) != form:
        other = "fp8_lowrank_matmul" if form == "dense" else "fp8_linear"
        raise ValueError(f"{op} got a packed dict of the other form; use {other} for it")
    if not isinstance(x, torch.Tensor) or x.dtype not in X_DTYPES:
        raise TypeError(f"{op}: x must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if form == "dense":
        out_features, in_features = packed["weight_fp8"].shape
    else:
        out_features, in_features = packed["u_fp8"].shape[0], packed["vt_fp8"].shape[1]
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must be (..., {in_features}), got shape {tuple(x.shape)}")
    tensors = {"x": x, **packed}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias must be a floating-point tensor of shape ({out_features},), got "
                             f"{getattr(bias, 'dtype', None)} {tuple(getattr(bias, 'shape', ()))}")
        tensors["bias"] = bias
    check_same_device(**tensors)
    return in_features, out_features


def _finish(y32: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y32 = y32 + bias.float()
    return y32.to(dtype)


def fp8_linear_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (a): dequantise W, matmul in fp32, cast to x's dtype."""
    _check_call(x, packed, bias, "dense", "fp8_linear_reference")
    return _finish(x.float() @ dequantize_fp8(packed).T, bias, x.dtype)


def fp8_lowrank_matmul_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch form (b): dequantise U and V, two matmuls in fp32, cast to x's dtype."""
    _check_call(x, packed, bias, "lowrank", "fp8_lowrank_matmul_reference")
    u_hat, v_hat = dequantize_fp8(packed)
    return _finish((x.float() @ v_hat) @ u_hat.T, bias, x.dtype)


# --------------------------------------------------------------------------------------------
# Public ops: validate, then Triton (through torch.library) or the reference
# --------------------------------------------------------------------------------------------
def fp8_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
               *, backend: str = "auto") -> torch.Tensor:
    """y = x W_hat^T + b for W stored by ``quantize_fp8_dense``; y in x's dtype."""
    in_features, out_features = _check_call(x, packed, bias, "dense", "fp8_linear")
    if resolve_backend(backend, x, *packed.values()) == "torch" or 0 in (x.numel(), in_features, out_features):
        return fp8_linear_reference(x, packed, bias)
    _register_ops()
    y = torch.ops.zskernels.fp8_linear(_rows(x), packed["weight_fp8"], packed["weight_scale"], bias)
    return y.reshape(*x.shape[:-1], out_features)


def fp8_lowrank_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: Optional[torch.Tensor] = None,
                       *, backend: str = "auto") -> torch.Tensor:
    """y = (x V_hat) U_hat^T + b for factors stored by ``pack_fp8_lowrank``; y in x's dtype."""
    in_features, out_features = _check_call(x, packed, bias, "lowrank", "fp8_lowrank_matmul")
    empty = 0 in (x.numel(), in_features, packed["u_fp8"].shape[1], out_features)
    if resolve_backend(backend, x, *packed.values()) == "torch" or empty:
        return fp8_lowrank_matmul_reference(x, packed, bias)
    _register_ops()
    y = torch.ops.zskernels.fp8_lowrank_matmul(_rows(x), packed["u_fp8"], packed["u_scale"],
                                               packed["vt_fp8"], packed["v_scale"], bias)
    return y.reshape(*x.shape[:-1], out_features)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as an (M, in) matrix whose rows are contiguous (the kernels take a row stride)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --------------------------------------------------------------------------------------------
# Host-side choices (shapes and device only: nothing here syncs, so CUDA graphs can capture it)
# --------------------------------------------------------------------------------------------
_CDT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # compute dtype, as a constexpr


def _choose_config(num_tokens: int, device: torch.device) -> dict:
    """Block configuration for ``num_tokens`` rows of x (tests replace this to force a path)."""
    return pick_config("fp8_matmul", num_tokens, device)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: no reason to split
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_m(cfg: dict, m: int) -> int:
    """Row tile: the GEMV handles one row per program; tl.dot needs at least 16."""
    if not cfg["USE_DOT"]:
        return 1
    if cfg["path"] == "prefill":
        return cfg["BLOCK_M"]
    return max(16, min(cfg["BLOCK_M"], 1 << max(m - 1, 0).bit_length()))


def _split_k(cfg: dict, tiles: int, k: int, device: torch.device) -> tuple[int, int]:
    """(number of K splits, K length per split) for the decode path; (1, K) for prefill.

    Splits only when the output tiles alone would leave SMs idle: about ``programs_per_sm`` programs
    per SM in total. Each split covers whole BLOCK_K blocks so that no block straddles two splits.
    """
    block_k = cfg["BLOCK_K"]
    k_blocks = _cdiv(k, block_k)
    if cfg["path"] != "decode":
        return 1, k_blocks * block_k
    want = cfg.get("SPLIT_K", "auto")
    if want == "auto":
        want = round(cfg["programs_per_sm"] * _num_sms(device) / tiles)
        want = min(want, cfg["max_split"])
    split = max(1, min(int(want), k_blocks))
    per_split = _cdiv(k_blocks, split) * block_k
    return _cdiv(k, per_split), per_split


def _num_stages(cfg: dict, block_m: int, a: torch.Tensor) -> int:
    """The config's pipeline depth, lowered until its tiles fit the GPU's shared memory.

    H100 / A100 (227 / 163 KiB per block) take every shipped config as is; GPUs with ~99 KiB
    (sm_86, sm_89) need fewer stages for the fp32 or split-summing tiles. The estimate is
    conservative: (stages - 1) buffered A and W tiles plus fp16 copies of both for the dot.
    """
    stages = cfg["num_stages"]
    if a.device.type != "cuda":
        return stages
    props = torch.cuda.get_device_properties(a.device)
    limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    a_tile = a.shape[0] * block_m * cfg["BLOCK_K"] * a.element_size()
    w_tile = cfg["BLOCK_N"] * cfg["BLOCK_K"]
    converted = 2 * (block_m + cfg["BLOCK_N"]) * cfg["BLOCK_K"]
    while stages > 1 and (stages - 1) * (a_tile + w_tile) + converted > limit:
        stages -= 1
    return stages


# --------------------------------------------------------------------------------------------
# Triton kernels. Written as plain functions marked @_jit_later and turned into triton.jit
# functions on first use (_register_ops), so `import zskernels` needs no triton, and
# TRITON_INTERPRET may still be set after import (triton.jit reads it when it decorates).
# Compute dtype codes (CDT): 0 = fp16, 1 = bf16, 2 = fp32.
# --------------------------------------------------------------------------------------------
_JIT_NAMES: list[str] = []


def _jit_later(fn):
    _JIT_NAMES.append(fn.__name__)
    return fn


@_jit_later
def _e4m3_bits_to_f32(bits):
    """float32 value of e4m3fn codes given as integers (0..255), by bit arithmetic.

    Sign and the 7 exponent+mantissa bits move to their fp16 positions (shifts by 8 and 7): that
    fp16 number is the e4m3 value times 2^-8 (exponent bias 15 instead of 7), normals and
    subnormals alike, so the exact fp16 -> fp32 conversion times 2^8 restores it.
    Codes 0x7F and 0xFF are NaN in e4m3fn (the quantiser never writes them).
    """
    b = bits.to(tl.int32)
    half_bits = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.int16)
    value = half_bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    return tl.where((b & 0x7F) == 0x7F, float("nan"), value)


@_jit_later
def _to_cdt(v, CDT: tl.constexpr):
    if CDT == 0:
        out = v.to(tl.float16)
    elif CDT == 1:
        out = v.to(tl.bfloat16)
    else:
        out = v.to(tl.float32)
    return out


@_jit_later
def _load_weight(ptrs, mask, NATIVE_FP8: tl.constexpr, CDT: tl.constexpr):
    """A weight tile converted in registers: fp8 loads where supported, else uint8 + decode."""
    if NATIVE_FP8:
        w = _to_cdt(tl.load(ptrs, mask=mask, other=0.0), CDT)
    else:
        w = _to_cdt(_e4m3_bits_to_f32(tl.load(ptrs, mask=mask, other=0)), CDT)
    return w


@_jit_later
def _load_a(ptrs, mask, split_stride, A_SPLITS: tl.constexpr):
    """An activation tile; with A_SPLITS > 1 the fixed-order fp32 sum of split-K partials (form b, decode)."""
    a = tl.load(ptrs, mask=mask, other=0.0)
    if A_SPLITS > 1:
        a = a.to(tl.float32)
    for s in tl.static_range(1, A_SPLITS):
        a += tl.load(ptrs + s * split_stride, mask=mask, other=0.0)
    return a


@_jit_later
def _dot(a, w, acc, CDT: tl.constexpr):
    """acc + a @ w^T on tensor cores; fp32 operands use the exact (non-TF32) fp32 dot."""
    if CDT == 2:
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@_jit_later
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


@_jit_later
def _matmul_kernel(a_ptr, w_ptr, out_ptr, s1_ptr, s2_ptr, bias_ptr,
                   M, N, K, stride_as, stride_am, stride_wn, stride_os, stride_om, k_per_split,
                   A_SPLITS: tl.constexpr,
                   HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
                   USE_DOT: tl.constexpr, NATIVE_FP8: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[split] = epilogue(A @ W^T over one K split), W (N x K) fp8 row-major, A (splits, M, K).

    The epilogue's scales and ALPHA apply to each split's partial sum (they are linear); bias is
    added only where the splits meet (HAS_BIAS is off unless there is a single split).

    Grid: (M tiles * N tiles, K splits). Tiles are numbered in groups of GROUP_M row tiles, so
    neighbouring programs share weight tiles in L2 (prefill); decode has a single row tile.
    Without USE_DOT (BLOCK_M == 1) it is a GEMV: multiply and sum on the CUDA cores in fp32.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % rows_in_group)
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group

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
        a = _load_a(a_rows + offs_k[None, :], m_ok[:, None] & k_ok[None, :], stride_as, A_SPLITS)
        w_mask = n_ok[:, None] & k_ok[None, :]
        if USE_DOT:
            acc = _dot(_to_cdt(a, CDT), _load_weight(w_rows + offs_k[None, :], w_mask, NATIVE_FP8, CDT), acc, CDT)
        else:  # (1, BLOCK_K) * (BLOCK_N, BLOCK_K), summed over k
            w = _load_weight(w_rows + offs_k[None, :], w_mask, NATIVE_FP8, 2)
            acc += tl.sum(a.to(tl.float32) * w, axis=1)[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, out_ptr + pid_s * stride_os, stride_om, s1_ptr, s2_ptr, bias_ptr,
              HAS_S1, HAS_S2, ALPHA, HAS_BIAS)


@_jit_later
def _splitk_reduce_kernel(ws_ptr, out_ptr, s1_ptr, s2_ptr, bias_ptr, M, N, stride_ws,
                          SPLITS: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
                          ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = epilogue(sum of the split-K partials ws[s] (M x N fp32), in the order s = 0, 1, ...)."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(ptrs + s * stride_ws, mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_n, M, N, out_ptr, N, s1_ptr, s2_ptr, bias_ptr, HAS_S1, HAS_S2, ALPHA, HAS_BIAS)


@_jit_later
def _decode_bits_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = _e4m3_bits_to_f32(bits), elementwise (lets the tests check the decoder on its own)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _e4m3_bits_to_f32(tl.load(bits_ptr + offs, mask=offs < n)), mask=offs < n)


# --------------------------------------------------------------------------------------------
# Launchers and the torch.library ops
# --------------------------------------------------------------------------------------------
_REDUCE_BLOCK = (16, 128)  # (rows, columns) per program of the split-K reduction


def _matmul(a: torch.Tensor, w: torch.Tensor, cfg: dict, *, out_dtype: torch.dtype, cdt: int,
            scales: tuple = (), alpha: float = 1.0, bias: Optional[torch.Tensor] = None,
            partials: bool = False) -> torch.Tensor:
    """(A @ W^T) * scales * alpha + bias, with A (S, M, K) -- S > 1: split-K partials, summed on load.

    W is (N, K) fp8; each of ``scales`` is an (N,) vector. With ``partials=True`` the result stays
    as split-K partials (splits, M, N) in ``out_dtype``, already scaled, without bias: for a consumer
    that sums them as it loads them (form (b)'s stage 2). Otherwise several splits go through an
    fp32 workspace and ``_splitk_reduce_kernel`` sums them in order, adds the bias and casts.
    """
    # Python ints: host-side choices need them (under torch.compile this specialises on the shape).
    m, k, n = int(a.shape[1]), int(a.shape[2]), int(w.shape[0])
    native = native_fp8(a.device)
    w = w if native else w.view(torch.uint8)
    block_m = _block_m(cfg, m)
    tiles = _cdiv(m, block_m) * _cdiv(n, cfg["BLOCK_N"])
    splits, per_split = _split_k(cfg, tiles, k, a.device)
    direct = splits == 1 and not partials  # the whole result from one kernel
    workspace = splits > 1 and not partials
    out = torch.empty((m, n) if direct else (splits, m, n), device=a.device,
                      dtype=torch.float32 if workspace else out_dtype)
    s1, s2 = (tuple(scales) + (None, None))[:2]
    # Absent optional pointers get the (read-only) weight as a stand-in: their flags are off.
    s1_ptr, s2_ptr, bias_ptr = (t if t is not None else w for t in (s1, s2, bias))
    wrap_triton(_matmul_kernel)[(tiles, splits)](
        a, w, out, s1_ptr, s2_ptr, bias_ptr, m, n, k, a.stride(0), a.stride(1), w.stride(0), m * n, n, per_split,
        A_SPLITS=a.shape[0], HAS_S1=s1 is not None, HAS_S2=s2 is not None, ALPHA=alpha,
        HAS_BIAS=direct and bias is not None, USE_DOT=cfg["USE_DOT"], NATIVE_FP8=native, CDT=cdt,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 1),
        num_warps=cfg["num_warps"], num_stages=_num_stages(cfg, block_m, a))
    if direct or partials:
        return out
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    bm, bn = _REDUCE_BLOCK
    wrap_triton(_splitk_reduce_kernel)[(_cdiv(n, bn), _cdiv(m, bm))](
        out, y, out, out, bias_ptr, m, n, m * n, SPLITS=splits, HAS_S1=False, HAS_S2=False, ALPHA=1.0,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


def _fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::fp8_linear: x (M, in) with unit column stride, checks already done."""
    cfg = _choose_config(int(x.shape[0]), x.device)
    return _matmul(x.unsqueeze(0), weight, cfg, out_dtype=x.dtype, cdt=_CDT_CODE[x.dtype],
                   scales=(scale,), bias=bias)


def _fp8_lowrank_triton(x: torch.Tensor, u: torch.Tensor, u_scale: torch.Tensor, vt: torch.Tensor,
                        v_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Body of zskernels::fp8_lowrank_matmul: x (M, in) with unit column stride, checks done."""
    cfg = _choose_config(int(x.shape[0]), x.device)
    cdt = _CDT_CODE[x.dtype]
    # Stage 1: t = (x Vt^T) * v_scale * u_scale * 2^8. Decode keeps it as split-K partials, which
    # stage 2 sums as it loads them (fp32 for the GEMV; x's dtype, half the shared memory, for the
    # dot); prefill stores it in x's dtype, the next tensor-core operand.
    stage1 = dict(cdt=cdt, scales=(v_scale, u_scale), alpha=FOLD)
    if cfg["path"] == "decode":
        part_dtype = x.dtype if cfg["USE_DOT"] else torch.float32
        t = _matmul(x.unsqueeze(0), vt, cfg, out_dtype=part_dtype, partials=True, **stage1)
    else:
        t = _matmul(x.unsqueeze(0), vt, cfg, out_dtype=x.dtype, **stage1).unsqueeze(0)
    return _matmul(t, u, cfg, out_dtype=x.dtype, cdt=cdt, alpha=1.0 / FOLD, bias=bias)


def _decode_e4m3_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 e4m3 codes, through the in-kernel decoder (for tests)."""
    _register_ops()
    out = torch.empty(bits.shape, dtype=torch.float32, device=bits.device)
    _decode_bits_kernel[(_cdiv(bits.numel(), 256),)](bits, out, bits.numel(), BLOCK=256)
    return out


_OPS: Optional[types.SimpleNamespace] = None  # set once the kernels are jitted and the ops registered


def _register_ops() -> types.SimpleNamespace:
    """JIT the kernels and register the torch.library ops, on the first Triton call only.

    A plain global (not lru_cache) so that torch.compile traces straight past it once it has run:
    run one eager call before compiling code whose first Triton call would otherwise be traced.
    """
    global _OPS
    if _OPS is None:
        jit_kernels(globals(), _JIT_NAMES)
        _OPS = types.SimpleNamespace(
            linear=triton_op("zskernels::fp8_linear", mutates_args=())(_fp8_linear_triton),
            lowrank=triton_op("zskernels::fp8_lowrank_matmul", mutates_args=())(_fp8_lowrank_triton),
        )
    return _OPS
