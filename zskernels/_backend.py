"""Backend choice shared by every op, and the lazy Triton import.

Each public op takes ``backend="auto" | "triton" | "torch"``:

* ``"torch"``  runs the plain-torch reference that sits beside every kernel;
* ``"triton"`` runs the Triton kernel: on CUDA tensors, or on CPU tensors when the
  Triton interpreter is enabled (``TRITON_INTERPRET=1``), which is how the tests run;
* ``"auto"``   picks Triton for CUDA tensors when Triton can be imported, else torch.

Triton is imported only when a Triton path is actually taken, so ``import zskernels``
works on machines without it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton; a plain constant also keeps torch.compile quiet.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn the user's ``backend`` argument into ``"triton"`` or ``"torch"``.

    Raises a ValueError/RuntimeError naming the problem and the fix when the request
    cannot be honoured (unknown name, Triton missing, CPU tensors without the interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = len(tensors) > 0 and all(t.is_cuda for t in tensors)  # bool(tuple): a graph break in torch 2.11
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors; move them to CUDA, or set TRITON_INTERPRET=1 "
            "to run the kernel in Triton's interpreter, or use backend='torch'"
        )
    return "triton"


def native_fp8(device: torch.device) -> bool:
    """True where Triton can load float8e4nv directly (NVIDIA sm_89+, and the CPU interpreter).

    Older GPUs (A100: 8.0, ...) get the kernels' uint8 + bit-decoding paths instead.
    """
    if device.type != "cuda":
        return True  # the CPU interpreter
    if torch.version.hip is not None:
        return False  # ROCm: AMD's native fp8 flavours vary by chip; decode e4m3fn bits ourselves
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors must live on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def jit_kernels(module_globals: dict, names: list[str]) -> None:
    """Turn a kernel module's plain functions ``names`` into triton.jit functions, on first use.

    Also gives the module ``tl`` (its kernels' annotations name it) and ``wrap_triton``, which
    makes launches visible to torch.compile. In the interpreter nothing is compiled or traced,
    so launches go straight to the kernel: torch 2.11's wrap_triton refuses interpreted kernels
    (2.13 passes them through).
    """
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    module_globals.update(tl=tl, wrap_triton=_unwrapped if interpreting() else wrap_triton)
    for name in names:
        module_globals[name] = triton.jit(module_globals[name])


def _unwrapped(kernel):
    return kernel
