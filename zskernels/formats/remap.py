"""Remap storage of a factor pair W ~= U V^T (8-bit head, 16-bit tail): pack, unpack, layout, bytes.

ZS-SVD's "remap" storage (after Dobi-SVD) charges each kept component max(out, in) fp16 slots.
With L = max(out, in) and s = min(out, in), for EACH factor F (U: out x k or V: in x k) its
first s rows are its "head" (8 bits, one absmax scale per component) and its remaining rows its
"tail" (16-bit; only the factor with L rows has one, and neither for a square W). That is
2*k*L bytes of payload plus two fp32 scales per component (``remap_nbytes``).

Packed layout (``pack_remap`` returns plain named tensors, all contiguous). Both factors are
stored "K-major", like an nn.Linear weight: the reduction dimension of the GEMM that reads them
is contiguous (stage 1 reduces over ``in`` and reads V^T; stage 2 reduces over ``k`` and reads U).

  name     shape          dtype        content
  v_q      (k, s)         int8 | fp8   (V[:s, :] / v_scale)^T   8-bit head of V, transposed
  v_tail   (k, in - s)    fp16 | bf16  V[s:, :]^T               empty unless in > out
  v_scale  (k,)           fp32         per-component dequantisation scale of V's head
  u_q      (s, k)         int8 | fp8   U[:s, :] / u_scale       8-bit head of U
  u_tail   (out - s, k)   fp16 | bf16  U[s:, :]                 empty unless out > in
  u_scale  (k,)           fp32         per-component dequantisation scale of U's head

Head lengths. ``pack_remap`` gives both factors a head of s = min(out, in) rows, but stage 1
(reducing over ``in``) only needs V's head length s_in = v_q.shape[1] and stage 2 (writing ``out``)
only U's, s_out = u_q.shape[0]; ``packed_layout`` and the ops read each from its tensor. So a
tensor-parallel slice is itself a valid dict: rows [a, b) of U keep the head rows they contain
(u_q) and then the tail rows (u_tail), leaving V whole, and likewise for V. A head may be empty (a
slice that lies in the tail); the two factors' tails may not both be non-empty (no slice of a
packed matrix has that), and in, out >= 1.

Dequantisation: V_hat[:s_in, j] = v_q[j, :] * v_scale[j], U_hat[:s_out, j] = u_q[:, j] * u_scale[j],
tails as stored. The 8-bit format is read from the dtype (torch.int8: symmetric integers in
[-127, 127], scale = absmax / 127; torch.float8_e4m3fn: scale = absmax / 448); nothing else is
needed to interpret the dict, so it survives safetensors unchanged. int8 is the default: it gave
equal or lower perplexity on SmolLM2-135M (``zskernels/README.md``, ``bench/RESULTS.md``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import check_same_device

Tensor = torch.Tensor

FORMATS = ("int8", "fp8")
DEFAULT_FMT = "int8"  # chosen by perplexity on SmolLM2-135M (zskernels/README.md)
TAIL_DTYPES = (torch.float16, torch.bfloat16)
PACKED_KEYS = ("v_q", "v_tail", "v_scale", "u_q", "u_tail", "u_scale")

_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0}
_FMT_OF_DTYPE = {dtype: fmt for fmt, dtype in _QDTYPE.items()}


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
    head: int  # s_in: V's 8-bit head rows among ``in`` (stage 1); min(out, in) for pack_remap's dicts
    fmt: str
    tail_dtype: torch.dtype
    head_out: int  # s_out: U's 8-bit head rows among ``out`` (stage 2); equal to head unless sliced


def _layout_problems(v_q: Tensor, v_tail: Tensor, v_scale: Tensor, u_q: Tensor, u_tail: Tensor,
                     u_scale: Tensor) -> list[str]:
    k = v_q.shape[0]
    problems = []
    if v_q.dtype not in _FMT_OF_DTYPE or u_q.dtype != v_q.dtype:
        problems.append(f"v_q/u_q dtypes {v_q.dtype}/{u_q.dtype} (need both int8 or both float8_e4m3fn)")
    if v_tail.dtype not in TAIL_DTYPES or u_tail.dtype != v_tail.dtype:
        problems.append(f"tail dtypes {v_tail.dtype}/{u_tail.dtype} (need both float16 or both bfloat16)")
    if u_q.shape[1] != k or v_tail.shape[0] != k or u_tail.shape[1] != k:
        problems.append(f"shapes v_q {tuple(v_q.shape)}, u_q {tuple(u_q.shape)}, v_tail {tuple(v_tail.shape)}, "
                        f"u_tail {tuple(u_tail.shape)} disagree on the rank k")
    if v_tail.shape[1] and u_tail.shape[0]:
        problems.append("both factors have a 16-bit tail; only the bigger factor may have one")
    if v_q.shape[1] + v_tail.shape[1] < 1 or u_q.shape[0] + u_tail.shape[0] < 1:
        problems.append("in_features and out_features must both be >= 1")
    for name, sc in (("v_scale", v_scale), ("u_scale", u_scale)):
        if sc.dtype != torch.float32 or tuple(sc.shape) != (k,):
            problems.append(f"{name} is {sc.dtype} {tuple(sc.shape)} (need float32 ({k},))")
    return problems


def packed_layout(packed: dict[str, Tensor]) -> Layout:
    """Shapes and formats of a packed dict, checked for consistency (shapes only, no sync).

    Each factor's head length is read from its own tensor (module docstring), so pack_remap's dicts
    and their tensor-parallel slices both pass; dicts whose tensors disagree are refused.
    """
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
    problems = _layout_problems(v_q, v_tail, v_scale, u_q, u_tail, u_scale)
    if problems:
        raise ValueError("malformed packed dict: " + "; ".join(problems) + "; build it with pack_remap "
                         "(or slice one with zssvd.io.vllm.sharding)")
    (k, s_in), s_out = v_q.shape, u_q.shape[0]
    return Layout(s_out + u_tail.shape[0], s_in + v_tail.shape[1], k, s_in, _FMT_OF_DTYPE[v_q.dtype],
                  v_tail.dtype, s_out)


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

