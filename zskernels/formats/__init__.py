"""Storage formats of packed weights, apart from the kernels that read them: ``remap`` (8-bit head,
16-bit tail) and ``fp8`` (e4m3 with fp32 scales)."""
from . import fp8, remap
from .fp8 import dequantize_fp8, fp8_nbytes, fp8_nbytes_for_shape, pack_fp8_lowrank, quantize_fp8_dense
from .remap import pack_remap, packed_layout, remap_nbytes, unpack_remap

__all__ = ["fp8", "remap", "dequantize_fp8", "fp8_nbytes", "fp8_nbytes_for_shape", "pack_fp8_lowrank",
           "quantize_fp8_dense", "pack_remap", "packed_layout", "remap_nbytes", "unpack_remap"]
