"""zskernels' CPU kernels (``csrc/``), for bf16 activations on CPUs with AVX-512 BF16 and VNNI:

* ``int8_matmul`` (``csrc/int8_matmul_cpu.cpp``): x (M, K) times an int8 weight with one float32 scale per
  output row, in a packed layout (``int8_pack``), with VNNI on the weights as stored: x is quantised per row
  into two int8 planes (finer than bf16), so no weight is converted, and each weight load feeds up to 4 rows
  (torch's ``_weight_int8pack_mm`` converts every weight for every row, and from M = 4 on loses to a bf16 GEMM);
* ``bf16_linear`` (``csrc/bf16_matmul_cpu.cpp``): x (M, K) times a bf16 weight in its own (N, K) layout, so no
  copy is kept; it runs for few rows (``BF16_MAX_ROWS``), where it beats torch's bf16 GEMM;
* ``int4_matmul`` (``csrc/int4_matmul_cpu.cpp``): x (M, K) times an int4 weight with a scale and a min per group
  of K (``zskernels/formats/int4.py``), the codes multiplied as they are like the int8 kernel's weights, in a
  layout made once by ``int4_pack``.

Compiled on first use with torch's extension builder (g++ and ninja; about 40 s, then cached under
``TORCH_EXTENSIONS_DIR``). They need a CPU with AVX-512 BF16 and VNNI (``avx512_bf16``, ``avx512_vnni``, with
F, BW and VL: Cooper Lake, Sapphire Rapids and later Xeons, AMD Zen 4 and later). Where any of that is
missing, or ``ZSKERNELS_CPU_KERNEL=0``, ``available()`` is False, a one-line message says why, and the CPU
paths keep torch's routes.
"""
from __future__ import annotations

import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in
           ("cpu_kernels.cpp", "int8_matmul_cpu.cpp", "bf16_matmul_cpu.cpp", "int4_matmul_cpu.cpp")]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"]
ENV = "ZSKERNELS_CPU_KERNEL"
# bf16_linear up to this many rows of x (zskernels/README.md, "CPU kernels": 1.2-2.7x torch's bf16 GEMM at 64
# rows; at 128 ahead or even depending on the shape and the run, at 512 behind on some shapes).
BF16_MAX_ROWS = 64
# The int8 kernel's int32 sums are exact up to this K (csrc/int8_matmul_cpu.cpp, kMaxK); wider weights keep
# torch's routes.
INT8_MAX_K = 65536


def available() -> bool:
    """Whether the kernel runs here (it is built on the first call that needs it)."""
    return _module() is not None


def pack(w: torch.Tensor) -> torch.Tensor:
    """An int8 (N, K) weight in the int8 kernel's layout (a copy: w + 128 as uint8, [N/16][K/4][16][4], padded
    with weight zero). K is at most ``INT8_MAX_K``."""
    return _required().int8_pack(w.contiguous())


def matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 x (M, K) @ (w * scale[:, None])^T for ``packed = pack(w)``; scale float32 (N,); bf16 (M, N).
    K must be the packed width (a multiple of 4: the caller pads x as it padded w)."""
    return _required().int8_matmul(x, packed, scale)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 x (M, K) @ w^T for a contiguous bf16 w (N, K); fp32 sums, bf16 (M, N)."""
    return _required().bf16_linear(x.contiguous(), w)


def int4_pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An int4 weight as stored (codes (N, K / 2) uint8, two codes a byte, scales and mins (N, groups);
    zskernels/formats/int4.py) in the int4 kernel's layout (copies, rows zero-padded to 16): codes
    [N/16][K/8][16][4] uint8, byte j of an octet holding code j in its low nibble and code 4 + j in its high one;
    scales and mins [N/16][groups][16] float32."""
    rows = -codes.shape[0] % 16
    blocks = (codes.shape[0] + rows) // 16

    def by_block(t: torch.Tensor) -> torch.Tensor:  # (N, C, ...) -> [N/16][C][16][...]
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, rows))
        return t.view(blocks, 16, *t.shape[1:]).movedim(1, 2).contiguous()

    n, half = codes.shape
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).view(n, half // 4, 2, 4)  # (N, octets, low/high, 4)
    octets = q[:, :, 0] | (q[:, :, 1] << 4)
    return by_block(octets), by_block(scales.float()), by_block(mins.float())


def int4_matmul(x: torch.Tensor, packed: tuple[torch.Tensor, ...], out_features: int) -> torch.Tensor:
    """bf16 x (M, K) @ W_hat^T for ``packed = int4_pack(...)``, K the codes' padded width; bf16 (M, N)."""
    return _required().int4_matmul(x, *packed, out_features)


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here without trying to build it; None when it may be."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    flags = cpu_flags()
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where it cannot be read."""
    return set(cpu_info().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's name as Linux reports it (lscpu's "Model name"), else the platform's."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "vendor_id", "flags", ...); {} where it
    cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


_LOCK = threading.Lock()
_UNBUILT = object()
_loaded = _UNBUILT  # the built module, None where it is off, or _UNBUILT before the first call


def _module():
    """The built module or None; built once, whichever thread asks first (later calls take no lock: every op
    of the CPU paths calls this)."""
    global _loaded
    if _loaded is _UNBUILT:
        with _LOCK:
            if _loaded is _UNBUILT:
                _loaded = _build_or_none()
    return _loaded


def _required():
    module = _module()
    if module is None:
        raise RuntimeError(f"zskernels' CPU kernels are off here ({unavailable_reason() or 'their build failed'}): "
                           "call them only where available() is True")
    return module


def _build_or_none():
    reason = unavailable_reason()
    if reason is not None:  # expected on such machines: said once, quietly
        log.info("zskernels: the CPU kernels are off (%s); packed layers use torch's kernels", reason)
        return None
    try:
        return _build()
    except Exception as error:  # no compiler, no ninja, an old toolchain: torch's routes stay
        last = (str(error).strip().splitlines() or [""])[-1][:200]
        log.warning("zskernels: the CPU kernels are off (building them failed: %s: %s); packed layers use "
                    "torch's kernels", type(error).__name__, last)
        return None


def _build():
    from torch.utils import cpp_extension

    # torch's builder keys its cache on the name, sources and flags, not on torch itself: the name carries
    # torch's version, so that two environments never load each other's build
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    name = f"zskernels_cpu_kernels_{version}"
    if not _built_before(cpp_extension, name):  # said only when a build is likely: the builder decides
        log.info("zskernels: building the CPU kernels (once: about 40-60 s, then cached)")
    return cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=COMPILE_FLAGS,
                              extra_ldflags=["-fopenmp"], verbose=False)


def _built_before(cpp_extension, name: str) -> bool:
    try:  # a private helper of torch's builder (present in every torch this supports); a guess either way
        directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return False
    return any(directory.glob(f"{name}*.so"))
