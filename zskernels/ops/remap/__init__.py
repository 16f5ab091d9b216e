"""remap_matmul: y = x V_hat U_hat^T + bias over remap-packed factors (``kernels``: Triton; ``naive``: torch)."""
from .kernels import remap_matmul
from .naive import remap_matmul_reference

__all__ = ["remap_matmul", "remap_matmul_reference"]
