"""Every question the launchers ask about the device, in one module.

Host-side choices (configs, split-K, pipeline depth, fp8 loads) depend only on these answers and
on shapes, so nothing here syncs and CUDA-graph capture is safe. ``bench/aot_check.py`` compiles
for a GPU it does not have by replacing these functions (module attributes, looked up at call
time: callers write ``_device.native_fp8(...)``, never ``from ._device import native_fp8``).
"""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_fp8(device: torch.device) -> bool:
    """True where Triton can load float8e4nv directly (NVIDIA sm_89+, and the CPU interpreter).

    Older GPUs (A100: 8.0, ...) get the kernels' uint8 + bit-decoding paths instead.
    """
    if device.type != "cuda":
        return True  # the CPU interpreter
    if torch.version.hip is not None:
        return False  # ROCm: AMD's native fp8 flavours vary by chip; decode e4m3fn bits ourselves
    return torch.cuda.get_device_capability(device) >= (8, 9)


def native_bf16_dot() -> bool:
    """True where tl.dot takes bf16 operands: every GPU, not the interpreter."""
    return not interpreting()


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The key of ``configs/<op>.json``: the GPU's name as CUDA prints it, or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: no reason to split
    return torch.cuda.get_device_properties(device).multi_processor_count


def shared_memory_per_block(device: torch.device) -> int:
    """Opt-in shared memory one block may use (CUDA devices only)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)
