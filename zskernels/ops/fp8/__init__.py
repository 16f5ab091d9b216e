"""fp8_linear / fp8_lowrank_matmul over fp8-packed weights (``kernels``: Triton; ``naive``: torch)."""
from .kernels import fp8_linear, fp8_lowrank_matmul
from .naive import fp8_linear_reference, fp8_lowrank_matmul_reference

__all__ = ["fp8_linear", "fp8_lowrank_matmul", "fp8_linear_reference", "fp8_lowrank_matmul_reference"]
