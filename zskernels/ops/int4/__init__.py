"""int4_linear / int4_lowrank_matmul over int4-packed weights (``kernels``: Triton; ``naive``: torch;
``cpu``: torch's int4 weight-only CPU kernel or chunked de-quantisation)."""
from .kernels import int4_linear, int4_lowrank_matmul
from .naive import int4_linear_reference, int4_lowrank_matmul_reference

__all__ = ["int4_linear", "int4_lowrank_matmul", "int4_linear_reference", "int4_lowrank_matmul_reference"]
