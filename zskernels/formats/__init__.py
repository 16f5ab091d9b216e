"""Storage formats of packed weights, apart from the kernels that read them: ``remap`` (8-bit head,
16-bit tail), ``fp8`` (e4m3 with fp32 scales) and ``int4`` (group-wise, float16 scales and mins)."""
from . import fp8, int4, remap
from .fp8 import dequantize_fp8, fp8_nbytes, fp8_nbytes_for_shape, pack_fp8_lowrank, quantize_fp8_dense
from .int4 import dequantize_int4, int4_bits_per_weight, pack_int4_lowrank, quantize_int4, unpack_int4_lowrank
from .remap import pack_remap, packed_layout, remap_nbytes, unpack_remap

__all__ = ["fp8", "int4", "remap", "dequantize_int4", "int4_bits_per_weight", "pack_int4_lowrank",
           "quantize_int4", "unpack_int4_lowrank", "dequantize_fp8", "fp8_nbytes", "fp8_nbytes_for_shape", "pack_fp8_lowrank",
           "quantize_fp8_dense", "pack_remap", "packed_layout", "remap_nbytes", "unpack_remap"]
