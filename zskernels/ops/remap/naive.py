"""remap_matmul in plain torch: argument checks shared with the kernel path, and the reference
(the CPU fallback and what the tests compare the kernels with)."""
from __future__ import annotations

from typing import Optional

import torch

from ..._backend import check_same_device
from ...formats.remap import PACKED_KEYS, Layout, packed_layout, unpack_remap

Tensor = torch.Tensor
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_call(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor], where: str) -> Layout:
    lay = packed_layout(packed)
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
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
    check_call(x, packed, bias, "remap_matmul_reference")
    u_hat, v_hat = unpack_remap(packed)
    y = (x.to(torch.float32) @ v_hat) @ u_hat.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

