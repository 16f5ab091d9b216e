"""fp8 (e4m3) storage for Zero-Sum SVD's "HQ" mode: quantise, dequantise, layout, bytes.

Two forms, both dicts of plain tensors (module buffers or safetensors entries as they are):

(a) a matrix kept dense::

        quantize_fp8_dense(W) -> {"weight_fp8":   (out, in) float8_e4m3fn, row-major,
                                  "weight_scale": (out,)    float32}
        W_hat[o, i] = weight_fp8[o, i] * weight_scale[o]          (one scale per output row)

(b) a factor pair W ~= U V^T (U: out x k, V: in x k)::

        pack_fp8_lowrank(U, V) -> {"u_fp8":   (out, k) float8_e4m3fn, row-major,
                                   "u_scale": (k,)      float32,
                                   "vt_fp8":  (k, in)   float8_e4m3fn, row-major (V stored transposed),
                                   "v_scale": (k,)      float32}
        U_hat[o, j] = u_fp8[o, j] * u_scale[j],   V_hat[i, j] = vt_fp8[j, i] * v_scale[j]

    Payload k (out + in) bytes, plus 8 k bytes of scales (one per component and factor).
    V is stored transposed so that both factors, like the dense weight, are row-major in the
    dimension their matmul reduces over (nn.Linear's layout).

Scales are ``amax / 448`` (448 is e4m3's largest finite value), so every row / component uses the
full fp8 range; all-zero rows get scale 1. Non-finite weights are rejected at quantisation time.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import check_same_device

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8 = torch.float8_e4m3fn
DENSE_KEYS = ("weight_fp8", "weight_scale")
LOWRANK_KEYS = ("u_fp8", "u_scale", "vt_fp8", "v_scale")


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


def packed_form(packed: dict) -> str:
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
    if packed_form(packed) == "dense":
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
    form = packed_form(packed)
    payload_keys = ("weight_fp8",) if form == "dense" else ("u_fp8", "vt_fp8")
    payload = sum(packed[k].numel() * packed[k].element_size() for k in payload_keys)
    scales = sum(t.numel() * t.element_size() for k, t in packed.items() if k not in payload_keys)
    return {"payload": payload, "scales": scales, "total": payload + scales}

