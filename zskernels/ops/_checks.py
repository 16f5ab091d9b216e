"""Argument checks and the reference epilogue shared by the weight-only ops' ``naive.py`` (fp8, int4)."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import check_same_device


def check_x_bias_device(x: torch.Tensor, packed: dict, bias: Optional[torch.Tensor], in_features: int,
                        out_features: int, op: str) -> None:
    """x is (..., in_features), bias None or a float (out_features,) tensor, all on x's device."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must be (..., {in_features}), got shape {tuple(x.shape)}")
    tensors = {"x": x, **packed}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias must be a floating-point tensor of shape ({out_features},), got "
                             f"{getattr(bias, 'dtype', None)} {tuple(getattr(bias, 'shape', ()))}")
        tensors["bias"] = bias
    check_same_device(**tensors)


def finish(y32: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The references' epilogue: + bias in fp32, cast to x's dtype."""
    if bias is not None:
        y32 = y32 + bias.float()
    return y32.to(dtype)
