"""CPU building blocks shared by every op's fast CPU path (``ops/<op>/cpu.py``).

Nothing here de-quantises a whole factor per call:

* ``int8_rows`` / ``int8_apply``: y = x (w * scale[:, None])^T for an 8-bit weight ``w`` (N, K) with one
  scale per output row, prepared once (``Int8Rows``) and applied per call. For bf16 activations on a CPU
  with AVX-512 BF16 it is zskernels' own kernel (``_cpu_kernel``: each weight loaded once per 8 rows of x,
  faster than every route below at every M measured, zskernels/README.md). Otherwise, for bf16/fp16 activations
  and few rows it is ``torch._weight_int8pack_mm`` (vectorised int8 weight-only kernel: reads 1 byte
  per weight; K zero-padded to a multiple of 16 in a copy where needed); otherwise (fp32 activations, whose int8pack kernel is scalar on the CPU,
  or prefill-sized M, where int8pack does not block for the cache) the weight is converted in row
  chunks of about ``CHUNK_BYTES`` (cache-sized, reused) and multiplied by plain GEMMs, so the
  conversion costs O(chunk) memory and is amortised over M rows. ``int8_linear`` is both in one call.
  For prefill-sized M on large weights, 16-bit activations go through ``torch._int_mm`` instead
  (``_int8_planes_mm``): each row of x is split into two int8 planes, hi + lo / 254 in steps of its
  absmax / 127, which carries x to 1/64516 of its absmax (error ~3e-5 relative, below bf16's and
  fp16's own rounding), and the integer GEMM (exact int32 sums) is several times faster than a
  16-bit GEMM on the CPU. ``int8_path`` picks the route from M and the weight's shape.
* ``float_linear(x, w)``: F.linear with a 16-bit weight in another dtype, converted in chunks; bf16 x and w
  with few rows through zskernels' bf16 kernel (``_cpu_kernel.bf16_linear``, on the weight as stored).
* ``fp8_rows_as_int8(w_fp8)``: a one-time re-encoding of fp8 e4m3 rows to int8 (torch's fp8 -> float
  conversion is scalar on the CPU, ~30 ns/element), cached by ``derived``; ``float_rows_as_int8(w)``
  the same for float rows (remap's de-quantised factors under 16-bit activations).
* ``intermediate_width`` / ``component_scale``: a low-rank op's rank-k intermediate kept at a multiple
  of 16 from stage 1 to stage 2 (zero rows and columns in the int8 copies), so int8pack needs no pad
  per call.
* ``derived(source, key, make, also)``: a cache of values derived from stored tensors (the cast
  scales, the re-encoded weights, an op's prepared ``plan``). It never touches the module's buffers,
  state_dict or byte counts; an entry is dropped with its source tensor and rebuilt when the source or
  one of ``also`` changes (in-place write, ``.to(device)``, a checkpoint loaded into it), so it is
  always those tensors' current derivative.
* ``plan(op, dtype, packed, bias, make)``: an op's checked, prepared operands, so that a call on
  unchanged tensors skips the layout checks and casts (per-call overhead was ~50 us a layer).
  ``derived_nbytes(tensors)``: what the cache holds for them (``bench-serve``'s ``cpu_path_gib``).
* ``opaque_when_compiled(name, out_features)``: each op's CPU path, seen by torch.compile as one
  opaque op (``zskernels::cpu_path``), so compiled and eager code compute the same numbers;
  ``register_path`` / ``run_path`` do the same for a caller's own path (zssvd's vLLM layers).

Thresholds were measured on the development machine (bench/RESULTS.md); the ones that differ between CPUs are
data (``configs/cpu_routes.json``).
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Callable, Hashable, NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F

from . import _cpu_kernel as cpu_kernel

Tensor = torch.Tensor
T = TypeVar("T")

# torch._weight_int8pack_mm is vectorised for these activation dtypes (its fp32 kernel is scalar).
INT8PACK_DTYPES = (torch.bfloat16, torch.float16)
# Up to this many rows int8pack beats de-quantise-then-GEMM; above, the GEMM's blocking wins.
INT8PACK_MAX_ROWS = 16
# From this many rows on, large weights (both dimensions at least PLANES_MIN_DIM) take the
# two-plane integer GEMM; below either bound its quantisation of x costs more than it saves.
PLANES_MIN_ROWS = 16
PLANES_MIN_DIM = 256
# int8pack's CPU kernel reads K in steps of 16 (8 for one row) without a remainder loop: other K
# give wrong results or a crash (measured on torch 2.13), so they take the chunked path.
INT8PACK_K_MULTIPLE = 16
CHUNK_BYTES = 1 << 20  # converted weight rows per chunk: about half an L2 of the machine measured

_CACHE: dict[tuple[int, Hashable], tuple[tuple[weakref.ref, ...], tuple[int, ...], object]] = {}
_LOCK = threading.RLock()  # re-entrant: a source freed while the lock is held runs _forget in this thread


def derived(source: Tensor, key: Hashable, make: Callable[[], T], also: tuple[Tensor, ...] = ()) -> T:
    """``make()``, computed once per (source tensor, key) while ``source`` and ``also`` live unchanged.

    ``make`` must not return (or hold) ``source`` or ``also`` themselves: the cache would keep them alive.
    """
    slot = (id(source), key)
    tensors = (source, *also)
    entry = _CACHE.get(slot)
    if entry is not None and _current(entry, tensors):
        return entry[2]
    value = make()
    with _LOCK:
        if slot not in _CACHE:  # first entry of this source: drop its entries when it dies
            weakref.finalize(source, _forget, id(source))
        _CACHE[slot] = (tuple(weakref.ref(t) for t in tensors), _state(tensors), value)
    return value


def _state(tensors: tuple[Tensor, ...]) -> tuple:
    # In-place writes bump _version; ``t.data = other`` (nn.Module casts do it to parameters) does
    # not, but moves the data: both are part of the state an entry was derived from. Tensors made under
    # torch.inference_mode have no version counter (None here): only a move is seen for them.
    return tuple((None if t.is_inference() else t._version, t.data_ptr()) for t in tensors)


def _current(entry, tensors: tuple[Tensor, ...]) -> bool:
    # A plain loop: this runs on every call of every CPU path (generators cost microseconds here).
    refs, state, _ = entry
    if len(refs) != len(tensors):
        return False
    for ref, t, (version, pointer) in zip(refs, tensors, state):
        if ref() is not t or (version is not None and t._version != version) or t.data_ptr() != pointer:
            return False
    return True


def _forget(source_id: int) -> None:
    with _LOCK:
        for slot in [s for s in _CACHE if s[0] == source_id]:
            del _CACHE[slot]


def cache_entries() -> int:
    """Number of cached derived tensors (for tests)."""
    return len(_CACHE)


def derived_nbytes(sources) -> int:
    """Bytes held by the cache for values derived from any of the tensors ``sources`` (e.g. one model's
    buffers): the CPU paths' re-encoded weights, padded copies and cast scales, each storage counted once."""
    ids = {id(t) for t in sources}
    seen: dict[int, int] = {}
    with _LOCK:
        values = [entry[2] for (source, _), entry in _CACHE.items() if source in ids]
    for value in values:
        for t in _tensors_in(value):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _tensors_in(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):  # NamedTuples (plans, Int8Rows) included
        return [t for item in value for t in _tensors_in(item)]
    return []


def plan(op: str, dtype: torch.dtype, packed: dict, make: Callable[[], T]) -> T:
    """An op's operands prepared once per (packed dict, x dtype): ``make()`` checks the arguments
    and builds them from copies only (the cache must not hold the stored tensors themselves).

    Later calls with the same tensors, unchanged, find it here: the per-call cost is a few dict
    lookups and version reads instead of re-checking the layout and re-casting scales. The bias is
    not part of it: nn.Module casts replace a parameter's data in place, which no cache can see
    (``finish`` adds it per call).
    """
    tensors = tuple(packed.values()) if isinstance(packed, dict) else ()
    key = ("plan", op, dtype)
    entry = _CACHE.get((id(tensors[0]), key)) if tensors else None
    if entry is not None and _current(entry, tensors):  # the per-call path: nothing else runs
        return entry[2]
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        return make()  # malformed arguments: make() raises the op's message
    return derived(tensors[0], key, make, also=tensors[1:])


def check_fits(x: Tensor, bias: Optional[Tensor], sizes, check: Callable[[], object]) -> None:
    """A later call against its op's plan (``sizes``: anything with ``in_features`` and ``out_features``): x's
    width and the bias (the rest was checked when the plan was made). Where they do not fit, ``check()`` --
    the op's full argument check -- raises, naming what the op needs."""
    if x.dim() < 1 or x.shape[-1] != sizes.in_features or not bias_fits(bias, sizes.out_features):
        check()


def bias_fits(bias: Optional[Tensor], out_features: int) -> bool:
    return bias is None or (isinstance(bias, Tensor) and bias.is_floating_point() and bias.dim() == 1
                            and bias.shape[0] == out_features and bias.device.type == "cpu")


def finish(y: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (M, out) + bias, shaped like x's leading dimensions."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def rows_of(x: Tensor) -> Tensor:
    """x (..., K) as an (M, K) matrix (a view where x is not 2-D already: a reshape costs about a microsecond)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _chunk_rows(w: Tensor, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // max(1, w.shape[1] * dtype.itemsize))


def _chunked_linear(x: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
    """x (w * scale)^T with w converted to x's dtype one row chunk at a time."""
    rows = _chunk_rows(w, x.dtype)
    if rows >= w.shape[0]:
        y = F.linear(x, w.to(x.dtype))
    else:
        y = torch.cat([F.linear(x, w[r:r + rows].to(x.dtype)) for r in range(0, w.shape[0], rows)], dim=-1)
    return y if scale is None else y.mul_(scale)


class Int8Rows(NamedTuple):
    """One GEMM's 8-bit weight prepared for activations of one dtype: y = x (rows * scale[:, None])^T.

    ``rows`` is None when the stored int8 tensor serves as it is, else an int8 copy (fp8 re-encoded,
    realigned, or zero-padded to K % 16 == 0); ``scale`` is a copy in x's dtype; ``packable``: int8pack
    applies to these rows; ``pad``: zero columns appended to the rows (x gets as many per call).
    ``kernel``: for bf16 x where zskernels' CPU kernel runs (``_cpu_kernel``), the rows in its layout; every
    call then takes it, ``rows`` is None (no second copy is kept), ``packable`` False and ``scale`` in float32.
    """

    rows: Optional[Tensor]
    scale: Tensor
    packable: bool
    pad: int = 0
    kernel: Optional[Tensor] = None


def int8_rows(w: Tensor, row_scale: Optional[Tensor], dtype: torch.dtype, *, normalised: bool = False,
              out_rows: int = 0, in_cols: int = 0, owned: bool = False) -> Int8Rows:
    """Prepare a stored 8-bit weight (int8, or fp8 e4m3 re-encoded once) with an optional per-row scale.

    ``normalised``: the stored rows were scaled to the format's full range when packed (see
    ``fp8_rows_as_int8``). ``out_rows`` / ``in_cols``: grow the weight with zero rows (outputs that
    come out 0) or zero columns (the activations arrive that wide) -- how a low-rank op keeps its
    rank-k intermediate at a multiple of 16 from stage 1 to stage 2 without a pad per call.
    ``owned``: ``w`` is already a copy the caller hands over (e.g. a re-encoded factor), never the stored
    tensor, so the plan may hold it.
    """
    kernel = (dtype == torch.bfloat16 and w.device.type == "cpu"
              and max(w.shape[1], in_cols) <= cpu_kernel.INT8_MAX_K and cpu_kernel.available())
    if w.dtype == torch.int8:
        rows, scale = (w if owned or w.data_ptr() % ALIGN else None), row_scale
        rows = rows.clone() if rows is not None and rows.data_ptr() % ALIGN else rows
    else:
        rows, scale = fp8_rows_as_int8(w, row_scale, normalised=normalised, cached=not kernel)
    scale_dtype = torch.float32 if kernel else dtype  # the kernel scales its fp32 sums before rounding
    scale = torch.ones(w.shape[0], dtype=scale_dtype, device=w.device) if scale is None else \
        scale.to(scale_dtype, copy=True)
    grow_rows, grow_cols = max(out_rows - w.shape[0], 0), max(in_cols - w.shape[1], 0)
    # int8pack reads K in steps of 16: zero columns make any K fit (a rank of 460 -> 464), at the
    # cost of this padded copy (stored int8 heads; fp8 ones are re-encoded into a copy anyway). The
    # kernel reads K in quads.
    multiple = 4 if kernel else INT8PACK_K_MULTIPLE if dtype in INT8PACK_DTYPES else 1
    pad = -(w.shape[1] + grow_cols) % multiple
    if grow_rows or grow_cols or pad:
        rows = F.pad(w if rows is None else rows, (0, grow_cols + pad, 0, grow_rows)).contiguous()
        scale = F.pad(scale, (0, grow_rows), value=1.0)
    if kernel:  # its layout replaces the rows
        return Int8Rows(None, scale.contiguous(), False, pad, cpu_kernel.pack(w if rows is None else rows))
    return Int8Rows(rows, scale, dtype in INT8PACK_DTYPES, pad)


def intermediate_width(rank: int, dtype: torch.dtype) -> int:
    """Width of a low-rank op's intermediate t for activations of ``dtype``: the rank, rounded up to a
    multiple of 16 where int8pack will read it (stage 1 writes zeros there, stage 2 reads them as is)."""
    return rank + (-rank % INT8PACK_K_MULTIPLE if dtype in INT8PACK_DTYPES else 0)


def component_scale(scale: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """A per-component scale cast to ``dtype`` (a copy) and padded with zeros to t's ``width``."""
    return F.pad(scale.to(dtype, copy=True), (0, width - scale.shape[0]))


def int8_path(rows: int, out_features: int, in_features: int, sixteen_bit: bool) -> str:
    """Which CPU route ``int8_apply`` takes for ``rows`` activations of a 16-bit dtype (or not) against
    an (out_features, in_features) int8 weight: "planes", "int8pack" or "chunked" (measured
    crossovers: bench/RESULTS.md, "CPU routes of an int8 weight")."""
    if sixteen_bit and rows >= PLANES_MIN_ROWS and min(out_features, in_features) >= PLANES_MIN_DIM:
        return "planes"
    if sixteen_bit and rows <= INT8PACK_MAX_ROWS:
        return "int8pack"
    return "chunked"


def int8_apply(x: Tensor, stored: Tensor, prepared: Int8Rows) -> Tensor:
    """y = x (w * scale)^T for x (M, K) in the dtype ``prepared`` was made for."""
    if prepared.kernel is not None:
        xk = F.pad(x, (0, prepared.pad)) if prepared.pad else x.contiguous()
        return cpu_kernel.matmul(xk, prepared.kernel, prepared.scale)
    w = stored if prepared.rows is None else prepared.rows
    path = int8_path(x.shape[0], w.shape[0], w.shape[1] - prepared.pad, prepared.packable)
    if path != "chunked":
        xk = F.pad(x, (0, prepared.pad)) if prepared.pad else _aligned(x.contiguous())
        if path == "int8pack":
            return torch._weight_int8pack_mm(xk, w, prepared.scale)
        y = _int8_planes_mm(xk, w, prepared.scale)
        if y is not None:
            return y
    return _chunked_linear(x, w if not prepared.pad else w[:, :w.shape[1] - prepared.pad], prepared.scale)


def _int8_planes_mm(x: Tensor, w: Tensor, scale: Tensor) -> Optional[Tensor]:
    """x (w * scale[:, None])^T through one integer GEMM, for 16-bit x (M, K) and int8 w (N, K).

    Each row of x is a * absmax / 127 with |a| <= 127, and a = hi + lo / 254 + e with hi, lo integers
    in [-127, 127] and |e| <= 1/508: the rows [hi; lo] (2M x K int8) times w^T are exact int32 sums,
    combined as hi + lo / 254 in float32. None when a row is not finite (the caller's float path then
    gives IEEE results).
    """
    rows = x.shape[0]
    a = x.to(torch.float32, copy=True)
    absmax = a.abs().amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(absmax).all()):
        return None
    step = absmax.clamp_min_(torch.finfo(torch.float32).tiny).div_(127.0)
    a.div_(step)
    hi = a.round()
    lo = a.sub_(hi).mul_(254.0).round_()
    acc = torch._int_mm(torch.cat([hi, lo]).to(torch.int8), w.t()).to(torch.float32)
    y = acc[rows:].div_(254.0).add_(acc[:rows])
    return y.mul_(step).mul_(scale).to(x.dtype)


def int8_linear(x: Tensor, w: Tensor, scale: Tensor | None) -> Tensor:
    """y = x (w * scale[:, None])^T in x's dtype: x (M, K) float, w (N, K) int8 contiguous, scale (N,) or None."""
    also = () if scale is None else (scale,)
    prepared = derived(w, f"rows:{x.dtype}:{scale is None}", lambda: int8_rows(w, scale, x.dtype), also=also)
    return int8_apply(x, w, prepared)


# int8pack's vector loads need 16-byte aligned operands: a tensor viewed at an odd offset of a
# memory-mapped checkpoint crashes it (measured). torch's allocator aligns to 64 bytes.
ALIGN = 64


def _aligned(t: Tensor) -> Tensor:
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def float_linear(x: Tensor, w: Tensor) -> Tensor:
    """F.linear(x, w) for a float weight of any dtype, without converting all of it at once; bf16 with few
    rows through zskernels' CPU kernel, which reads w where it lies."""
    if w.dtype != x.dtype:
        return _chunked_linear(x, w, None)
    if bf16_kernel_takes(x, w):
        return cpu_kernel.bf16_linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def bf16_kernel_takes(x: Tensor, w: Tensor) -> bool:
    """Whether F.linear(x, w) goes through zskernels' bf16 CPU kernel: bf16 operands on the CPU, few rows (it
    beats torch's GEMM up to ``BF16_MAX_ROWS``), eager and without gradients (it has neither a compiled form
    nor a backward)."""
    if torch.compiler.is_compiling():  # first: the row test below would guard on a dynamic batch size
        return False
    return (x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu" and w.dim() == 2
            and w.is_contiguous() and x.numel() <= cpu_kernel.BF16_MAX_ROWS * max(1, x.shape[-1])
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) and cpu_kernel.available())


def _fp8_values(w: Tensor) -> Tensor:
    """float32 values of an fp8 e4m3 tensor through a 256-entry table (the direct cast is scalar)."""
    table = torch.arange(256, dtype=torch.uint8, device=w.device).view(torch.float8_e4m3fn).float()
    return table[w.view(torch.uint8).long()]


FP8_MAX = 448.0  # the largest finite e4m3 value: a normalised row's absmax


def fp8_rows_as_int8(w: Tensor, row_scale: Tensor | None = None, *,
                     normalised: bool = False, cached: bool = True) -> tuple[Tensor, Tensor]:
    """Re-encode fp8 e4m3 rows as int8, w * row_scale[:, None] ~= q * scale[:, None] (cached).

    The one rounding (to 1/254 of each row's absmax) is the only change; its effect on accuracy is
    measured in tests/zskernels/test_cpu_paths.py and noted in zskernels/README.md. Rows that were
    ``normalised`` when packed (a per-row scale mapped each row's absmax to 448) get the fixed step
    448/127 -- what their absmax gives, but also for any column slice of them, so a tensor-parallel
    shard re-encodes to exactly the columns of the whole matrix's re-encoding.
    """
    def make() -> tuple[Tensor, Tensor]:
        values = _fp8_values(w)
        absmax = torch.full((w.shape[0],), FP8_MAX, device=w.device) if normalised else None
        q, scale = _rows_as_int8(values, absmax)
        return q, scale if row_scale is None else scale * row_scale.float()

    if not cached:  # the caller keeps a derivative of it instead (the CPU kernel's layout)
        return make()
    also = () if row_scale is None else (row_scale,)
    return derived(w, f"int8rows:{normalised}:{row_scale is None}", make, also=also)


def float_rows_as_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Re-encode float rows as int8 with one scale per row, w ~= q * scale[:, None] (step absmax / 127).

    For a 16-bit weight that int8 GEMMs read faster than 16-bit ones (remap's tails): the rounding,
    at most half a step per element, is the one change, measured in bench/RESULTS.md.
    """
    return _rows_as_int8(w.float())


def _rows_as_int8(values: Tensor, absmax: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    if absmax is None:
        absmax = values.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = (values / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


# ----------------------------------------------------------------------------------------------
# The CPU paths under torch.compile
# ----------------------------------------------------------------------------------------------
# The paths keep Python state (``derived``, ``plan``) that traced code cannot hold. Tracing into
# the reference instead gave compiled code other numbers than eager code: fp8's re-encoding is not
# exact, and vLLM's compiled hq model parted from Hugging Face's eager one after a few dozen greedy
# tokens (measured on SmolLM2, fp32). So while compiling, a path is one opaque op whose body is the
# same Python function, run eagerly on the real tensors: the same numbers and the same speed.
_PATHS: dict[str, tuple[Callable, Callable[[dict], int]]] = {}
_PATH_OP = "zskernels::cpu_path"
_path_library: Optional[torch.library.Library] = None  # kept: the definition lives as long as it


def register_path(name: str, fn: Callable, out_features: Callable[[dict], int]) -> None:
    """Make ``fn(x, packed, bias)`` callable as ``run_path(name, ...)``; ``out_features(packed)`` gives y's width
    from shapes only (the compiler's fake tensors have no values). Names are global: one per op, or one per
    object that registers itself (zssvd's vLLM layers), which drops its entry with ``unregister_path``."""
    _PATHS[name] = (fn, out_features)


def unregister_path(name: str) -> None:
    _PATHS.pop(name, None)


def run_path(name: str, x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """The registered path ``name``: called directly, or, while torch.compile traces, as one opaque op."""
    if not torch.compiler.is_compiling():
        return _PATHS[name][0](x, packed, bias)
    _register_path_op()
    return torch.ops.zskernels.cpu_path(name, x, ",".join(packed), list(packed.values()), bias)


def opaque_when_compiled(name: str, out_features: Callable[[dict], int]):
    """Decorate an op's CPU path ``fn(x, packed, bias)`` so that compiled code calls it as one opaque op."""
    def wrap(fn):
        register_path(name, fn, out_features)

        @functools.wraps(fn)
        def path(x: Tensor, packed: dict[str, Tensor], bias: Optional[Tensor] = None) -> Tensor:
            return run_path(name, x, packed, bias)
        return path
    return wrap


def _run_path(name: str, x: Tensor, names: str, tensors: list[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _PATHS[name][0](x, dict(zip(names.split(","), tensors)), bias)


def _path_shape(name: str, x: Tensor, names: str, tensors: list[Tensor], bias: Optional[Tensor]) -> Tensor:
    width = _PATHS[name][1](dict(zip(names.split(","), tensors)))
    return x.new_empty(*x.shape[:-1], width)


@torch.compiler.assume_constant_result
def _register_path_op() -> bool:
    """Define zskernels::cpu_path once, on the first compiled call (``import zskernels`` stays lean).

    A plain ``torch.library.Library`` definition with a CPU kernel, not ``torch.library.custom_op``: compiled
    code calls it once per layer per step, and custom_op's Python wrapper cost 6-10 us more per call than
    this (measured, zskernels/README.md), against 15-30 us for a SmolLM2 layer's GEMMs at one row.
    """
    global _path_library
    with _LOCK:
        if _path_library is None:
            library = torch.library.Library("zskernels", "FRAGMENT")
            library.define("cpu_path(str name, Tensor x, str names, Tensor[] tensors, Tensor? bias) -> Tensor")
            library.impl("cpu_path", _run_path, "CPU")
            torch.library.register_fake(_PATH_OP, _path_shape, lib=library)
            _path_library = library
    return True
