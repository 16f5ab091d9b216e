"""int4_linear / int4_lowrank_matmul in plain torch: argument checks shared with the kernel path,
and the references (fp32 math; what backend="torch" runs and what the tests compare the kernels with)."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_x_bias_device, finish
from ...formats.int4 import check_int4, dequantize_int4, int4_form, unpack_int4_lowrank

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _in_features(packed: dict, prefix: str, width: int) -> int:
    """The true K of one matrix: read from the dict on the CPU; on a GPU (reading it would sync) the
    caller's ``width`` when the codes' padded shape allows it, else the padded width (so the check fails)."""
    if packed[prefix + "in_features"].device.type == "cpu":
        return int(packed[prefix + "in_features"])
    _, kp, group_size = check_int4(packed, prefix)
    return width if kp - group_size < width <= kp or width == kp == 0 else kp


def check_call(x: torch.Tensor, packed: dict, bias: Optional[torch.Tensor], form: str, op: str) -> tuple[int, int]:
    """Validate x, packed and bias for ``op``; return (in_features, out_features)."""
    if int4_form(packed) != form:
        other = "int4_lowrank_matmul" if form == "dense" else "int4_linear"
        raise ValueError(f"{op} got a packed dict of the other form; use {other} for it")
    if not isinstance(x, torch.Tensor) or x.dtype not in X_DTYPES:
        raise TypeError(f"{op}: x must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    first = "" if form == "dense" else "v_"
    check_int4(packed, first)
    in_features = _in_features(packed, first, x.shape[-1] if x.dim() else -1)
    if form == "dense":
        out_features = packed["codes"].shape[0]
    else:
        out_features = check_int4(packed, "u_")[0]
        rank = packed["v_codes"].shape[0]
        if _in_features(packed, "u_", rank) != rank:
            raise ValueError(f"{op}: stage 2 (u_*) does not reduce over the {rank} components stage 1 "
                             f"(v_*) makes; repack with pack_int4_lowrank")
    check_x_bias_device(x, packed, bias, in_features, out_features, op)
    return in_features, out_features


def int4_linear_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: dequantise W, matmul in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "dense", "int4_linear_reference")
    return finish(x.float() @ dequantize_int4(packed).T, bias, x.dtype)


def int4_lowrank_matmul_reference(x: torch.Tensor, packed: dict[str, torch.Tensor],
                                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: dequantise U and V, two matmuls in fp32, cast to x's dtype."""
    check_call(x, packed, bias, "lowrank", "int4_lowrank_matmul_reference")
    u_hat, v_hat = unpack_int4_lowrank(packed)
    return finish((x.float() @ v_hat) @ u_hat.T, bias, x.dtype)
