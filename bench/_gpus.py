"""The GPUs the offline reports target, and the device answers the launchers get for one of them.

``answering_as(gpu)`` replaces zskernels' device questions (``_device`` module attributes, looked
up at call time) with the answers ``gpu`` would give, so a CPU-only run makes the launchers pick
the configs, split-K plans and fp8 paths they would pick on that GPU. Used by ``aot_check.py``
(compile for it) and ``traffic.py`` (count the bytes its launches request).

Figures: NVIDIA's datasheets for bandwidth, SMs, L2 and shared memory; the H200's bf16 matmul rate
is the one measured on the lent H200 (issue 17), and the H100 SXM is the same chip.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class GPU:
    arch: int
    name: str  # as torch.cuda.get_device_name() prints it (the configs' key)
    sms: int
    smem_limit: int  # bytes of shared memory one block may use (opt-in maximum)
    bandwidth_tbs: float  # HBM, TB/s
    l2_mib: int
    matmul_tflops: float  # 16-bit tensor-core matmul rate used by the rooflines
    fp32_tflops: float  # FMA units (the exact "ieee" fp32 dots)


H100 = GPU(90, "NVIDIA H100 80GB HBM3", 132, 232448, 3.35, 50, 790.0, 67.0)
H200 = GPU(90, "NVIDIA H200", 132, 232448, 4.8, 60, 790.0, 67.0)
A100 = GPU(80, "NVIDIA A100-SXM4-80GB", 108, 166912, 2.04, 40, 312.0, 19.5)
BY_ARCH = {90: H100, 80: A100}

# Per-SM limits of sm_80 / sm_90 used by the occupancy arithmetic.
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {90: 64, 80: 64}
SMEM_PER_SM = {90: 233472, 80: 167936}  # bytes; each resident block also reserves 1 KiB
MAX_BLOCKS_PER_SM = 32


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """(resident blocks per SM, the limit that sets it) for one kernel on one SM."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256 registers
    limits = {"registers": (REGS_PER_SM // regs_per_warp) // num_warps,
              "shared memory": SMEM_PER_SM[arch] // (smem + 1024),
              "warps": MAX_WARPS_PER_SM[arch] // num_warps,
              "blocks": MAX_BLOCKS_PER_SM}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


@contextlib.contextmanager
def answering_as(gpu: GPU, *, bf16_dot: bool = True) -> Iterator[None]:
    """zskernels' device questions answered as ``gpu`` would answer them, inside the block.

    ``bf16_dot=False`` keeps the interpreter's answer (no bf16 tl.dot) for runs that execute kernels.
    """
    from zskernels import _device

    answers = {"device_name": lambda device: gpu.name, "num_sms": lambda device: gpu.sms,
               "native_fp8": lambda device: gpu.arch >= 89, "native_bf16_dot": lambda: bf16_dot}
    saved = {name: getattr(_device, name) for name in answers}
    for name, value in answers.items():
        setattr(_device, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_device, name, value)
