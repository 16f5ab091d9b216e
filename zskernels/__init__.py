"""zskernels: Triton kernels for Zero-Sum SVD compressed models.

* ``sigma_scores``  -- s_i = u_i^T H v_i for every singular component (and a batched form);
* ``remap_matmul``  -- y = x V U^T over remap-packed factors (8-bit head, 16-bit tail);
* ``fp8_linear`` / ``fp8_lowrank_matmul`` -- fp8 (e4m3) weights with fused dequantisation;
* ``int4_linear`` / ``int4_lowrank_matmul`` -- group-wise int4 weights (``quantize_int4``).

Layout: ``formats/`` (storage: pack / unpack / layout / bytes), ``ops/<op>/kernels.py`` (Triton)
beside ``ops/<op>/naive.py`` (plain torch, the CPU fallback and the tests' reference), and the
shared plumbing ``_triton`` (lazy jit, op registration), ``_device`` (every device question),
``_configs`` (block configs in ``configs/*.json``). Notes: ``zskernels/README.md``.

Every public op takes ``backend="auto" | "triton" | "torch"`` (see ``_backend``).
Triton is imported lazily, so this package imports on machines without it.
"""
from . import formats
from ._backend import BACKENDS, resolve_backend, triton_available
from ._device import interpreting
from .formats.fp8 import dequantize_fp8, fp8_nbytes, fp8_nbytes_for_shape, pack_fp8_lowrank, quantize_fp8_dense
from .formats.int4 import (dequantize_int4, int4_bits_per_weight, pack_int4_lowrank, quantize_int4,
                           unpack_int4_lowrank)
from .formats.remap import pack_remap, remap_nbytes, unpack_remap
from .ops.fp8 import fp8_linear, fp8_linear_reference, fp8_lowrank_matmul, fp8_lowrank_matmul_reference
from .ops.int4 import int4_linear, int4_linear_reference, int4_lowrank_matmul, int4_lowrank_matmul_reference
from .ops.remap import remap_matmul, remap_matmul_reference
from .ops.scores import sigma_scores, sigma_scores_batched, sigma_scores_reference

__all__ = [
    "BACKENDS",
    "interpreting",
    "resolve_backend",
    "triton_available",
    "formats",
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
    "quantize_int4",
    "dequantize_int4",
    "int4_bits_per_weight",
    "pack_int4_lowrank",
    "unpack_int4_lowrank",
    "int4_linear",
    "int4_linear_reference",
    "int4_lowrank_matmul",
    "int4_lowrank_matmul_reference",
]
