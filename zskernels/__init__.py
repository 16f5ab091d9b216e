"""zskernels: Triton kernels for Zero-Sum SVD compressed models.

One file per op; each holds the Triton kernels, their launcher, and a plain-torch reference
that the tests compare against and that serves as the CPU fallback:

* ``sigma_scores``  -- s_i = u_i^T H v_i for every singular component (and a batched form);
* ``remap_matmul``  -- y = x V U^T over remap-packed factors (8-bit head, 16-bit tail);
* ``fp8_matmul``    -- fp8 (e4m3) weights with fused dequantisation, factor pairs and dense.

Every public op takes ``backend="auto" | "triton" | "torch"`` (see ``_backend``).
Triton is imported lazily, so this package imports on machines without it.
"""
from ._backend import BACKENDS, interpreting, resolve_backend, triton_available
from .sigma_scores import sigma_scores, sigma_scores_batched, sigma_scores_reference
from .fp8_matmul import (
    dequantize_fp8, fp8_linear, fp8_linear_reference, fp8_lowrank_matmul, fp8_lowrank_matmul_reference,
    fp8_nbytes, fp8_nbytes_for_shape, pack_fp8_lowrank, quantize_fp8_dense,
)
from .remap_matmul import pack_remap, remap_matmul, remap_matmul_reference, remap_nbytes, unpack_remap

__all__ = [
    "BACKENDS",
    "interpreting",
    "resolve_backend",
    "triton_available",
    "sigma_scores",
    "sigma_scores_batched",
    "sigma_scores_reference",
    "quantize_fp8_dense",
    "pack_fp8_lowrank",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_lowrank_matmul",
    "fp8_lowrank_matmul_reference",
    "dequantize_fp8",
    "fp8_nbytes",
    "fp8_nbytes_for_shape",
    "pack_remap",
    "unpack_remap",
    "remap_matmul",
    "remap_matmul_reference",
    "remap_nbytes",
]
