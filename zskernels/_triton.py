"""Triton plumbing shared by every op: lazy jit, op registration, launches, buffers, the host rules
more than one launcher follows (row tile, split-K count) and the jitted helpers more than one kernel
calls (in-launch split-K sum, tile order, e4m3 decoding).

Lazy jit. Kernels and helpers are plain functions marked ``@jit_later``; ``ready(module)`` turns
every marked global of that module (and of this one) into a ``triton.jit`` function on the first
Triton call. So ``import zskernels`` needs no triton, and TRITON_INTERPRET may still be set after
import (triton.jit reads it when it decorates). A helper defined here and imported by a kernel
module is jitted once and the same jitted function replaces it in every namespace.

Registration, the one pattern every op uses::

    @_triton.triton_op("zskernels::name", schema="(...) -> Tensor")   # or _triton.custom_op(..., fake=...)
    def _name_triton(...): ...               # host launcher: launch(kernel)[grid](...)
    _triton.ready(__name__); torch.ops.zskernels.name(...)             # in the public function

``ready`` is marked ``assume_constant_result``: torch.compile runs it eagerly while tracing a caller
instead of tracing into it (it rewrites module globals), so even a first call under fullgraph works.
The ops are ``torch.library`` ops (``triton_op`` + ``wrap_triton``), so torch.compile sees through
them and CUDA graphs capture them: every host-side choice is made from shapes (``_device``), and
nothing syncs.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

import sys
import threading
from typing import Callable, NamedTuple, Optional

import torch

from . import _device

# Tests set this to fill every floating buffer the launchers allocate with NaN, so unwritten entries show.
POISON = False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-filled while POISON is set (floating dtypes)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON and out.is_floating_point() else out


# ----------------------------------------------------------------------------------------------
# Lazy jit
# ----------------------------------------------------------------------------------------------
_JITTED: dict = {}  # plain function -> its triton.jit function, shared by every namespace


def jit_later(fn):
    """Mark a kernel or helper to be wrapped by triton.jit on first use (see ``ready``)."""
    fn._zskernels_jit = True
    return fn


def _jit_namespace(namespace: dict) -> None:
    import triton
    import triton.language as tl

    namespace["tl"] = tl  # the kernels' annotations and bodies name it
    for name, value in list(namespace.items()):
        if getattr(value, "_zskernels_jit", False):
            if value not in _JITTED:
                _JITTED[value] = triton.jit(value)
            namespace[name] = _JITTED[value]


def _pass_through(kernel):
    return _Interpreted(kernel)


class _Interpreted:
    """An interpreted kernel, launched directly; under fake tensors (opcheck, tracing) launches are
    skipped, since outputs were already allocated from shapes."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        from torch._subclasses.fake_tensor import is_fake

        def run(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
                return None
            return self.kernel[grid](*args, **kwargs)
        return run


_wrap: Callable = _pass_through  # set by the first jit: torch.library.wrap_triton on GPUs


def launch(kernel):
    """``launch(kernel)[grid](...)``: wrap_triton, so torch.compile sees the launch. In the interpreter
    the kernel runs as it is: torch 2.11's wrap_triton refuses interpreted kernels."""
    return _wrap(kernel)


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------
class _Op(NamedTuple):
    kind: str  # "triton_op" (traceable launches) or "custom_op" (opaque, needs a fake)
    name: str
    schema: Optional[str]
    fn: Callable
    fake: Optional[Callable]


_PENDING: dict[str, list[_Op]] = {}  # module name -> ops it declares
_CONSTANTS: dict[str, dict[str, int]] = {}  # module name -> globals its kernels read as tl.constexpr
_READY: set[str] = set()
_LOCK = threading.Lock()


def triton_op(name: str, schema: Optional[str] = None):
    """Declare ``fn`` as the body of the torch.library triton_op ``name`` (registered by ``ready``)."""
    def declare(fn):
        _PENDING.setdefault(fn.__module__, []).append(_Op("triton_op", name, schema, fn, None))
        return fn
    return declare


def custom_op(name: str, schema: str, fake: Callable):
    """Declare an opaque custom op (launches torch.compile must not trace), with its fake."""
    def declare(fn):
        _PENDING.setdefault(fn.__module__, []).append(_Op("custom_op", name, schema, fn, fake))
        return fn
    return declare


def constants(module: str, **values: int) -> None:
    """Module globals the kernels of ``module`` read, made ``tl.constexpr`` when it is jitted."""
    _CONSTANTS.setdefault(module, {}).update(values)


@torch.compiler.assume_constant_result
def ready(module: str) -> bool:
    """Jit ``module``'s kernels and register its ops, once; the one "jit and register" step."""
    with _LOCK:
        if module not in _READY:
            _register(module)
            _READY.add(module)
    return True


def _register(module: str) -> None:
    global _wrap
    from torch.library import custom_op as torch_custom_op
    from torch.library import triton_op as torch_triton_op
    from torch.library import wrap_triton

    _wrap = _pass_through if _device.interpreting() else wrap_triton
    import triton.language as tl

    namespace = sys.modules[module].__dict__
    namespace.update({name: tl.constexpr(value) for name, value in _CONSTANTS.get(module, {}).items()})
    _jit_namespace(globals())
    _jit_namespace(namespace)
    for op in _PENDING.get(module, []):
        if op.kind == "triton_op":
            torch_triton_op(op.name, mutates_args=(), schema=op.schema)(op.fn)
        else:
            torch_custom_op(op.name, mutates_args=(), schema=op.schema)(op.fn).register_fake(op.fake)


# ----------------------------------------------------------------------------------------------
# Host rules shared by the launchers (fp8 and int4 matmuls): shapes and device only, no sync
# ----------------------------------------------------------------------------------------------
def row_tile(cfg: dict, m: int) -> int:
    """Row tile (BLOCK_M) for ``m`` rows: the GEMV (no USE_DOT) handles one row per program; prefill
    takes the config's tile; decode tl.dot takes the next power of two of m in [16, BLOCK_M]."""
    if not cfg["USE_DOT"]:
        return 1
    if cfg["path"] == "prefill":
        return cfg["BLOCK_M"]
    return max(16, min(cfg["BLOCK_M"], 1 << max(m - 1, 0).bit_length()))


def split_k(cfg: dict, tiles: int, k: int, device: torch.device) -> tuple[int, int]:
    """(number of K splits, K length per split) for the decode path; (1, K) for prefill.

    Splits only when the output tiles alone would leave SMs idle: about ``programs_per_sm`` programs
    per SM in total, at most ``max_split`` (``SPLIT_K`` other than "auto" fixes the count). Each split
    covers whole BLOCK_K blocks so that no block straddles two splits; the count returned is the
    number of non-empty splits. The splits meet in ``last_split_sums``.
    """
    block_k = cfg["BLOCK_K"]
    k_blocks = cdiv(k, block_k)
    if cfg["path"] != "decode":
        return 1, k_blocks * block_k
    want = cfg.get("SPLIT_K", "auto")
    if want == "auto":
        want = round(cfg["programs_per_sm"] * _device.num_sms(device) / tiles)
        want = min(want, cfg["max_split"])
    split = max(1, min(int(want), k_blocks))
    per_split = cdiv(k_blocks, split) * block_k
    return cdiv(k, per_split), per_split


# ----------------------------------------------------------------------------------------------
# Jitted helpers shared by the kernels
# ----------------------------------------------------------------------------------------------
@jit_later
def last_split_sums(acc, ws_ptr, cnt_ptr, tile, split, splits, offs_m, offs_n, M, N):
    """Deterministic split-K inside one launch: (sum of the tile's partials, whether this program has it).

    Every split stores its fp32 partial to ws[split] (M x N), then -- after a CTA barrier, so that
    every thread's stores are released with it -- bumps the tile's counter (acq_rel). The program
    that finds splits - 1 arrivals already counted arrives last: it reloads the partials from L2
    (.cg: other SMs wrote them) and adds them in split order, whatever order they arrived in.
    The host zeroes the counters for each call.
    """
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    plane = M * N
    tl.store(ws_ptr + split * plane + offs, acc, mask=mask)
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == splits - 1
    if last:
        acc = tl.zeros_like(acc)
        for s in range(0, splits):
            acc += tl.load(ws_ptr + s * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc, last


@jit_later
def tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of a linear tile index, GROUP_M row tiles per column sweep, so
    programs running together share column-operand tiles in L2; GROUP_M = 1 is row-major."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@jit_later
def e4m3_codes_as_f16(codes):
    """fp16 numbers equal to the e4m3fn values of ``codes`` (uint8) times 2^-8, exactly.

    Sign and the 7 exponent+mantissa bits move to their fp16 positions; fp16's exponent bias (15
    instead of 7) supplies the 2^-8, for normals and subnormals alike. For GPUs that cannot load
    e4m3 (before sm_89). The NaN codes 0x7F / 0xFF come out finite: the quantisers never write them.
    """
    c = codes.to(tl.int32)
    return (((c & 0x7F) << 7) | ((c & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)


@jit_later
def e4m3_bits_to_f32(bits):
    """float32 value of e4m3fn codes (0..255), exactly: the fp16 decoding times 2^8, NaN codes NaN."""
    value = e4m3_codes_as_f16(bits).to(tl.float32) * 256.0
    return tl.where((bits.to(tl.int32) & 0x7F) == 0x7F, float("nan"), value)
