"""Backend choice shared by every op.

Each public op takes ``backend="auto" | "triton" | "torch"``:

* ``"torch"``  runs the plain-torch reference (``ops/<op>/naive.py``);
* ``"triton"`` runs the Triton kernel: on CUDA tensors, or on CPU tensors when the
  Triton interpreter is enabled (``TRITON_INTERPRET=1``), which is how the tests run;
* ``"auto"``   picks Triton for CUDA tensors when Triton can be imported; on CPU tensors the op's
  fast CPU path (``ops/<op>/cpu.py``: int8 weight-only GEMMs, see ``_cpu``); else torch.

Triton is imported only when a Triton path is actually taken (``_triton``), so
``import zskernels`` works on machines without it.
"""
from __future__ import annotations

import importlib.util

import torch

from . import _device

BACKENDS = ("auto", "triton", "torch")

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
    if not on_cuda and not _device.interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors; move them to CUDA, or set TRITON_INTERPRET=1 "
            "to run the kernel in Triton's interpreter, or use backend='torch'"
        )
    return "triton"


def cpu_fast_path(backend: str, *tensors: torch.Tensor) -> bool:
    """True when ``backend="auto"`` meets CPU tensors: the op runs its ``cpu.py`` path (int8 weight-only
    GEMMs, see ``_cpu``) instead of the plain reference, which ``backend="torch"`` keeps. Under
    torch.compile the path is one opaque op (``_cpu.opaque_when_compiled``)."""
    if backend != "auto":
        return False
    for t in tensors:  # a plain loop: this runs on every call (a generator costs about a microsecond)
        if t.device.type != "cpu":
            return False
    return True


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors must live on one device; return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first
