"""Global-memory bytes every kernel launch requests, counted in Triton's interpreter and by tiling
arithmetic, extrapolated to LLaMA-7B shapes with a predicted time on an H200 and an H100.

    python bench/traffic.py            # check the arithmetic on small shapes, then the LLaMA-7B table
    python bench/traffic.py --check    # the small-shape check only (what the tests run, a subset)

1. Count. Under TRITON_INTERPRET=1 every ``tl.load`` / ``tl.store`` / atomic goes through the
   interpreter's builder; ``Counter`` wraps those methods and adds up, per launch and per kernel
   argument, the bytes of the unmasked lanes (what the launch *requests* from the memory system:
   an L2 re-read of an activation tile counts each time) and the distinct bytes touched. The device
   questions are answered as an H100/H200 would (``_gpus.answering_as``), so the launchers pick
   the GPU's block configs, split-K plans and fp8 paths, at small odd shapes.
2. Arithmetic. ``FORMULAS`` gives, per kernel, the bytes each argument is requested, derived from
   its tiling (tiles, splits, reduction steps, masks) and the launch's own grid and arguments, and
   the bytes the launch *must* move (its weights, scales, activations in and out, once each).
   ``check`` runs every op at small shapes and requires counted == arithmetic, byte for byte.
3. Extrapolate. At LLaMA-7B shapes nothing executes: each launch is intercepted with its grid and
   arguments and the arithmetic gives its bytes. Predicted time = max(bytes / HBM bandwidth,
   FLOPs / matmul rate), at the must-move bytes (the floor) and at the requested bytes (as if every
   request missed L2). Targets: a decode launch (M <= 16) requests at most 1.1x what it must move.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: every launch runs in the interpreter

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpus import H100, H200, GPU, answering_as  # noqa: E402

import zskernels  # noqa: E402

WORKSPACE = ("ws_ptr", "cnt_ptr")  # split-K partials and counters: overhead, never "must"
DECODE_M, TARGET_RATIO = 16, 1.1


# ----------------------------------------------------------------------------------------------
# Launches: kernel, grid and bound arguments (tensors summarised by where they live)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """A tensor argument: its byte range, element size, shape (and values, for small int tables)."""
    start: int
    end: int
    itemsize: int
    shape: tuple
    values: tuple = ()

    @classmethod
    def of(cls, t: torch.Tensor) -> "Arg":
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        values = tuple(t.flatten().tolist()) if t.dtype == torch.int64 and t.numel() <= 4096 else ()
        return cls(t.data_ptr(), t.data_ptr() + extent * t.element_size(), t.element_size(), tuple(t.shape), values)


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: dict  # name -> Arg | int | float | bool | str | None
    case: str = ""
    op_must: int = 0  # the bytes the whole op call must move (Case.must)
    counted: dict = field(default_factory=dict)  # label -> {"load", "store", "atomic", "unique"} bytes

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))

    def labels(self) -> dict[str, str]:
        """Argument name -> label; arguments that share one byte range share a label ("a|b")."""
        ranges: dict[tuple, list[str]] = {}
        for name, value in self.args.items():
            if isinstance(value, Arg):
                ranges.setdefault((value.start, value.end), []).append(name)
        return {name: "|".join(names) for names in ranges.values() for name in names}


def _bind(fn: Callable, args: tuple, kwargs: dict, grid) -> Launch:
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    summary = {name: Arg.of(value) if isinstance(value, torch.Tensor) else value
               for name, value in bound.arguments.items()}
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Launch(fn.__name__, grid, summary)


@contextlib.contextmanager
def intercept(execute: bool, extra: dict[str, list[torch.Tensor]] | None = None) -> Iterator[list[Launch]]:
    """Every interpreter launch inside the block, appended to the yielded list.

    execute=False: nothing runs (LLaMA-7B shapes). execute=True: the launch runs and its requested
    bytes are counted per argument label; addresses inside ``extra`` tensors (reached through a
    device-side table, not an argument) count under the ``extra`` key.
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

    launches: list[Launch] = []
    current: list[Counter] = []
    original_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = _bind(self.fn, args, kwargs, grid)
        launches.append(launch)
        if not execute:
            return None
        counter = Counter(launch, extra or {})
        current.append(counter)
        try:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            current.pop()
            launch.counted = counter.totals()

    # (method, kind, position of the pointer, position of the mask) among the builder method's arguments
    patches = (("create_masked_load", "load", 0, 1), ("create_masked_store", "store", 0, 2),
               ("create_atomic_rmw", "atomic", 1, 3))

    def counting(method: str, kind: str, ptr_at: int, mask_at: int):
        original = getattr(InterpreterBuilder, method)

        def wrapped(builder, *args):
            if current:
                current[-1].add(kind, args[ptr_at], args[mask_at])
            return original(builder, *args)
        return original, wrapped

    saved = {}
    for method, *how in patches:
        saved[method], wrapped = counting(method, *how)
        setattr(InterpreterBuilder, method, wrapped)
    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original_run
        for method, original in saved.items():
            setattr(InterpreterBuilder, method, original)


class Counter:
    """Requested and distinct bytes of one running launch, per argument label."""

    def __init__(self, launch: Launch, extra: dict[str, list[torch.Tensor]]):
        labels = launch.labels()
        spans = [(a.start, a.end, labels[n]) for n, a in launch.args.items() if isinstance(a, Arg) and a.end > a.start]
        spans += [(Arg.of(t).start, Arg.of(t).end, label) for label, ts in extra.items() for t in ts if t.numel()]
        self.spans = spans
        self.bytes: dict[tuple, int] = {}
        self.addresses: dict[str, list[np.ndarray]] = {}

    def add(self, kind: str, ptrs, mask) -> None:
        addrs = np.broadcast_to(ptrs.data, np.shape(mask.data))[np.asarray(mask.data, dtype=bool)].astype(np.uint64)
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        unmatched = np.ones(addrs.shape, dtype=bool)
        for start, end, label in self.spans:
            inside = unmatched & (addrs >= start) & (addrs < end)
            if inside.any():
                unmatched &= ~inside
                self._record(kind, label, addrs[inside], itemsize)
        if unmatched.any():
            self._record(kind, "(unknown)", addrs[unmatched], itemsize)

    def _record(self, kind: str, label: str, addrs: np.ndarray, itemsize: int) -> None:
        self.bytes[kind, label] = self.bytes.get((kind, label), 0) + addrs.size * itemsize
        offsets = np.arange(itemsize, dtype=np.uint64)
        self.addresses.setdefault(label, []).append((addrs[:, None] + offsets[None, :]).ravel())

    def totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (kind, label), n in self.bytes.items():
            out.setdefault(label, {"load": 0, "store": 0, "atomic": 0})[kind] += n
        for label, chunks in self.addresses.items():
            out[label]["unique"] = int(np.unique(np.concatenate(chunks)).size)
        return out


# ----------------------------------------------------------------------------------------------
# Tiling arithmetic: per kernel, requested bytes per argument and the bytes the launch must move
# ----------------------------------------------------------------------------------------------
@dataclass
class Traffic:
    requested: dict = field(default_factory=dict)  # argument name -> {"load", "store", "atomic"} bytes
    must: dict = field(default_factory=dict)  # argument name -> bytes it must read or write once
    flops: int = 0

    def add(self, name: str, kind: str, nbytes: int) -> None:
        entry = self.requested.setdefault(name, {"load": 0, "store": 0, "atomic": 0})
        entry[kind] += int(nbytes)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_workspace(t: Traffic, on: bool, n_split: int, rows_cols: int, programs: int) -> None:
    """Deterministic split-K inside a launch (remap, both fp8 forms, int4): every split stores its fp32
    partial and bumps its tile's counter; the last program of each tile reloads all partials."""
    if on:
        t.add("ws_ptr", "store", n_split * rows_cols * 4)
        t.add("ws_ptr", "load", n_split * rows_cols * 4)
        t.add("cnt_ptr", "atomic", programs * 4)


def remap_stage1(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    m, in_, k, s = a["M"], a["IN"], a["K"], a["S"]
    tail = in_ - s if a["HAS_V_TAIL"] else 0
    xs, tiles_m, tiles_n = a["x_ptr"].itemsize, a["tiles_m"], a["tiles_n"]
    t.add("x_ptr", "load", m * (s + tail) * xs * tiles_n)  # each of the tiles_n column tiles re-reads x
    t.add("vq_ptr", "load", tiles_m * k * s * a["vq_ptr"].itemsize)
    if tail:
        t.add("vt_ptr", "load", tiles_m * k * tail * a["vt_ptr"].itemsize)
    t.add("sv_ptr", "load", tiles_m * a["n_split"] * k * 4)  # every program loads its v_scale slice
    _split_workspace(t, a["SPLIT_K"], a["n_split"], m * k, la.programs)
    t.add("su_ptr", "load", tiles_m * k * 4)  # epilogue, once per tile
    t.add("th_ptr", "store", m * k * a["th_ptr"].itemsize)
    if a["HAS_U_TAIL"]:
        t.add("tt_ptr", "store", m * k * a["tt_ptr"].itemsize)
    t.must = {"x_ptr": m * in_ * xs, "vq_ptr": k * s * a["vq_ptr"].itemsize, "sv_ptr": 4 * k, "su_ptr": 4 * k,
              "vt_ptr": k * tail * a["vt_ptr"].itemsize, "th_ptr": m * k * a["th_ptr"].itemsize,
              "tt_ptr": m * k * a["tt_ptr"].itemsize if a["HAS_U_TAIL"] else 0}
    t.flops = 2 * m * in_ * k
    return t


def remap_stage2(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    m, out, k, s = a["M"], a["OUT"], a["K"], a["S"]
    tiles_m, tiles_head = a["tiles_m"], a["tiles_head"]
    tiles_tail = la.grid[0] // tiles_m - tiles_head
    ts = a["th_ptr"].itemsize
    t.add("th_ptr", "load", m * k * ts * tiles_head)  # each output column tile re-reads t
    t.add("uq_ptr", "load", tiles_m * s * k * a["uq_ptr"].itemsize)
    if a["HAS_U_TAIL"]:
        t.add("tt_ptr", "load", m * k * ts * tiles_tail)
        t.add("ut_ptr", "load", tiles_m * (out - s) * k * a["ut_ptr"].itemsize)
    _split_workspace(t, a["SPLIT_K"], a["n_split"], m * out, la.programs)
    if a["HAS_BIAS"]:
        t.add("bias_ptr", "load", tiles_m * out * a["bias_ptr"].itemsize)
    t.add("y_ptr", "store", m * out * a["y_ptr"].itemsize)
    t.must = {"th_ptr": m * k * ts, "uq_ptr": s * k * a["uq_ptr"].itemsize,
              "tt_ptr": m * k * ts if a["HAS_U_TAIL"] else 0,
              "ut_ptr": (out - s) * k * a["ut_ptr"].itemsize if a["HAS_U_TAIL"] else 0,
              "bias_ptr": out * a["bias_ptr"].itemsize if a["HAS_BIAS"] else 0, "y_ptr": m * out * a["y_ptr"].itemsize}
    t.flops = 2 * m * out * k
    return t


def fp8_matmul(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    m, n, k, splits = a["M"], a["N"], a["K"], la.grid[1]
    tiles_m, tiles_n = cdiv(m, a["BLOCK_M"]), cdiv(n, a["BLOCK_N"])
    asz, osz = a["a_ptr"].itemsize, a["out_ptr"].itemsize
    t.add("a_ptr", "load", m * k * asz * tiles_n)  # re-read per column tile
    t.add("w_ptr", "load", tiles_m * n * k * a["w_ptr"].itemsize)
    for flag, name in (("HAS_S1", "s1_ptr"), ("HAS_S2", "s2_ptr")):  # one epilogue per tile (its last split)
        if a[flag]:
            t.add(name, "load", tiles_m * n * 4)
    if a["HAS_BIAS"]:
        t.add("bias_ptr", "load", tiles_m * n * a["bias_ptr"].itemsize)
    t.add("out_ptr", "store", m * n * osz)
    _split_workspace(t, a["LAST_SUMS"], splits, m * n, la.programs)
    t.must = {"a_ptr": m * k * asz, "w_ptr": n * k * a["w_ptr"].itemsize, "out_ptr": m * n * osz,
              "s1_ptr": 4 * n * a["HAS_S1"], "s2_ptr": 4 * n * a["HAS_S2"],
              "bias_ptr": n * a["bias_ptr"].itemsize * a["HAS_BIAS"]}
    t.flops = 2 * m * n * k
    return t


def int4_matmul(la: Launch) -> Traffic:
    """int4 codes (two per byte) with a float16 scale and min per group: one (scale, min) load per
    output row and K step (BLOCK_K divides the group), activations re-read per column tile."""
    a, t = la.args, Traffic()
    m, n, k, splits, bk = a["M"], a["N"], a["K"], la.grid[1], a["BLOCK_K"]
    tiles_m, tiles_n, steps = cdiv(m, a["BLOCK_M"]), cdiv(n, a["BLOCK_N"]), cdiv(k, bk)
    asz, osz = a["a_ptr"].itemsize, a["out_ptr"].itemsize
    t.add("a_ptr", "load", m * k * asz * tiles_n)
    t.add("codes_ptr", "load", tiles_m * n * steps * bk // 2)
    for name in ("scales_ptr", "mins_ptr"):
        t.add(name, "load", tiles_m * n * steps * a[name].itemsize)
    if a["HAS_BIAS"]:
        t.add("bias_ptr", "load", tiles_m * n * a["bias_ptr"].itemsize)
    t.add("out_ptr", "store", m * n * osz)  # by the last split of each tile
    _split_workspace(t, a["LAST_SUMS"], splits, m * n, la.programs)
    t.must = {"a_ptr": m * k * asz, "out_ptr": m * n * osz, "bias_ptr": n * a["bias_ptr"].itemsize * a["HAS_BIAS"],
              **{name: a[name].end - a[name].start for name in ("codes_ptr", "scales_ptr", "mins_ptr")}}
    t.flops = 2 * m * n * k
    return t


def _score_item(t: Traffic, m: int, n: int, k: int, sizes: tuple, bm: int, bk: int,
                names=("u_ptr", "h_ptr", "v_ptr", "part_ptr")) -> None:
    """One triple's scoring tiles: H re-read per column block, V per row block, U once."""
    us, hs, vs = sizes
    num_rb, tiles_k = cdiv(m, bm), cdiv(k, bk)
    t.add(names[1], "load", tiles_k * m * n * hs)
    t.add(names[2], "load", num_rb * n * k * vs)
    t.add(names[0], "load", m * k * us)
    t.add(names[3], "store", num_rb * k * 4)
    for name, nbytes in zip(names, (m * k * us, m * n * hs, n * k * vs, num_rb * k * 4)):
        t.must[name] = t.must.get(name, 0) + nbytes
    t.flops += 2 * m * n * k


def score(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    _score_item(t, a["m"], a["n"], a["k"], (a["u_ptr"].itemsize, a["h_ptr"].itemsize, a["v_ptr"].itemsize),
                a["BM"], a["BK"])
    return t


def reduce_rows(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    t.add("part_ptr", "load", a["num_rows"] * a["k"] * 4)
    t.add("out_ptr", "store", a["k"] * 4)
    t.must = {"part_ptr": a["num_rows"] * a["k"] * 4, "out_ptr": a["k"] * 4}
    return t


def _table(la: Launch) -> list[dict]:
    from zskernels.ops.scores.kernels import META_FIELDS

    values, width = la.args["meta_ptr"].values, len(META_FIELDS)
    return [dict(zip(META_FIELDS, values[i * width:(i + 1) * width])) for i in range(la.args["num_items"])]


SCORE_FIELDS, REDUCE_FIELDS = 14, 5  # table entries each program reads besides the item search


def batched_score(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    sizes = tuple(a[f"{role}_DTYPE"].primitive_bitwidth // 8 for role in "UHV")
    for row in _table(la):
        _score_item(t, row["M"], row["N"], row["K"], sizes, a["BM"], a["BK"], ("U", "H", "V", "part_ptr"))
    t.add("meta_ptr", "load", la.programs * (a["num_items"] + SCORE_FIELDS) * 8)
    t.must["meta_ptr"] = a["num_items"] * 16 * 8
    return t


def batched_reduce(la: Launch) -> Traffic:
    a, t = la.args, Traffic()
    rows = _table(la)
    for row in rows:
        num_rb = cdiv(row["M"], a["BM"])
        t.add("part_ptr", "load", num_rb * row["K"] * 4)
        t.add("out_ptr", "store", row["K"] * 4)
        t.must["part_ptr"] = t.must.get("part_ptr", 0) + num_rb * row["K"] * 4
        t.must["out_ptr"] = t.must.get("out_ptr", 0) + row["K"] * 4
    t.add("meta_ptr", "load", la.programs * (a["num_items"] + REDUCE_FIELDS) * 8)
    t.must["meta_ptr"] = a["num_items"] * 16 * 8
    return t


FORMULAS: dict[str, Callable[[Launch], Traffic]] = {
    "_remap_stage1_kernel": remap_stage1, "_remap_stage2_kernel": remap_stage2,
    "_matmul_kernel": fp8_matmul, "_int4_matmul_kernel": int4_matmul,
    "_score_kernel": score, "_reduce_kernel": reduce_rows,
    "_batched_score_kernel": batched_score, "_batched_reduce_kernel": batched_reduce,
}


def distinct_bytes(la: Launch, t: Traffic) -> dict[str, int]:
    """Per label, the distinct bytes the launch touches: the whole byte range of every argument it
    reads or writes (each is touched entirely: checked on small shapes), and for tensors reached
    through a table, their must-move bytes. An estimate of the launch's DRAM traffic when every
    re-read hits L2."""
    labels = la.labels()
    out: dict[str, int] = {}
    for name, kinds in t.requested.items():
        if not any(kinds.values()):
            continue
        arg = la.args.get(name)
        label = labels.get(name, name)
        out[label] = arg.end - arg.start if isinstance(arg, Arg) else t.must.get(name, 0)
    return out


def by_label(la: Launch, per_name: dict) -> dict[str, dict[str, int]]:
    """Per-argument traffic merged over arguments that alias one byte range (as the counter sees them)."""
    labels = la.labels()
    out: dict[str, dict[str, int]] = {}
    for name, kinds in per_name.items():
        entry = out.setdefault(labels.get(name, name), {"load": 0, "store": 0, "atomic": 0})
        for kind, n in kinds.items():
            entry[kind] += n
    return {label: e for label, e in out.items() if any(e.values())}


# ----------------------------------------------------------------------------------------------
# Ops at given shapes (small ones execute; LLaMA-7B ones are only intercepted)
# ----------------------------------------------------------------------------------------------
def remap_packed(out: int, in_: int, k: int, fmt: str = "int8", fill: bool = True) -> dict:
    """A remap-packed dict for W ~= U V^T (random factors), or uninitialised tensors of its layout."""
    if fill:
        g = torch.Generator().manual_seed(out * 7 + in_)
        return zskernels.pack_remap(torch.randn(out, k, generator=g), torch.randn(in_, k, generator=g), fmt=fmt)
    s = min(out, in_)
    q = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    return {"v_q": torch.empty(k, s, dtype=q), "v_tail": torch.empty(k, in_ - s, dtype=torch.float16),
            "v_scale": torch.empty(k), "u_q": torch.empty(s, k, dtype=q),
            "u_tail": torch.empty(out - s, k, dtype=torch.float16), "u_scale": torch.empty(k)}


def fp8_packed(out: int, in_: int, k: int | None, fill: bool = True) -> dict:
    """fp8 factors (k given) or an fp8 dense matrix (k None), random or uninitialised."""
    g = torch.Generator().manual_seed(out + 3 * in_)
    if k is None:
        if fill:
            return zskernels.quantize_fp8_dense(torch.randn(out, in_, generator=g))
        return {"weight_fp8": torch.empty(out, in_, dtype=torch.float8_e4m3fn), "weight_scale": torch.empty(out)}
    if fill:
        return zskernels.pack_fp8_lowrank(torch.randn(out, k, generator=g), torch.randn(in_, k, generator=g))
    return {"u_fp8": torch.empty(out, k, dtype=torch.float8_e4m3fn), "u_scale": torch.empty(k),
            "vt_fp8": torch.empty(k, in_, dtype=torch.float8_e4m3fn), "v_scale": torch.empty(k)}


def int4_packed(out: int, in_: int, k: int | None, fill: bool = True, group: int = 64,
                u_group: int | None = None) -> dict:
    """int4 factors (k given; U may take its own group size) or an int4 dense matrix (k None), random
    or uninitialised: codes two per byte (rows padded to whole groups), a float16 scale and min per group."""
    g = torch.Generator().manual_seed(out + 5 * in_)
    if fill:
        if k is None:
            return zskernels.quantize_int4(torch.randn(out, in_, generator=g), group)
        return zskernels.pack_int4_lowrank(torch.randn(out, k, generator=g), torch.randn(in_, k, generator=g), group,
                                           u_group_size=u_group)

    def stored(rows: int, cols: int, gs: int, prefix: str = "") -> dict:
        groups = cdiv(cols, gs)
        return {prefix + "codes": torch.empty(rows, groups * gs // 2, dtype=torch.uint8),
                prefix + "scales": torch.empty(rows, groups, dtype=torch.float16),
                prefix + "mins": torch.empty(rows, groups, dtype=torch.float16),
                prefix + "in_features": torch.tensor(cols)}
    if k is None:
        return stored(out, in_, group)
    return {**stored(k, in_, group, "v_"), **stored(out, k, u_group or group, "u_")}


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    extra: dict = field(default_factory=dict)  # tensors reached through a table (batched scores)
    must: int = 0  # bytes the op must move: packed weights and scales, x, y, bias (each once)


def _stores(out: int, in_: int, ranks: dict, fill: bool) -> dict:
    """storage name -> (op, packed weights) for each storage ``ranks`` names (a rank function, or None)."""
    makers = {"remap-int8": lambda k: (zskernels.remap_matmul, remap_packed(out, in_, k, "int8", fill)),
              "remap-int8 rho0.8": lambda k: (zskernels.remap_matmul, remap_packed(out, in_, k, "int8", fill)),
              "fp8-lowrank": lambda k: (zskernels.fp8_lowrank_matmul, fp8_packed(out, in_, k, fill)),
              "fp8-dense": lambda k: (zskernels.fp8_linear, fp8_packed(out, in_, None, fill)),
              "int4-lowrank": lambda k: (zskernels.int4_lowrank_matmul, int4_packed(out, in_, k, fill)),
              "int4-lowrank mixed": lambda k: (zskernels.int4_lowrank_matmul,
                                               int4_packed(out, in_, k, fill, group=64, u_group=32)),
              "int4-dense": lambda k: (zskernels.int4_linear, int4_packed(out, in_, None, fill))}
    return {name: makers[name](rank and rank(out, in_)) for name, rank in ranks.items()}


def matmul_cases(shapes, tokens, ranks: dict, fill: bool, dtype=torch.float16, bias_at_m1: bool = False) -> list[Case]:
    """Every storage in ``ranks`` (name -> k(out, in), None for dense) at (out, in) x M tokens."""
    cases = []
    for out, in_ in shapes:
        stores = _stores(out, in_, ranks, fill)
        for m in tokens:
            x = (torch.randn(m, in_) if fill else torch.empty(m, in_)).to(dtype)
            bias = torch.randn(out).to(dtype) if bias_at_m1 and m == 1 else None
            for storage, (op, packed) in stores.items():
                if storage.endswith("rho0.8") and m < 256:
                    continue
                tag = f"{storage} {out}x{in_} M={m}{' +bias' if bias is not None else ''}"
                must = sum(_nbytes(t) for t in (*packed.values(), x, bias)) + m * out * x.element_size()
                cases.append(Case(tag, lambda op=op, x=x, p=packed, b=bias: op(x, p, b, backend="triton"), must=must))
    return cases


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def score_cases(shapes, fill: bool, dtype=torch.float32) -> list[Case]:
    """sigma_scores on each (m, n, k), then one batched call over all of them."""
    make = (lambda *s: torch.randn(*s, dtype=dtype)) if fill else (lambda *s: torch.empty(*s, dtype=dtype))
    triples = [(make(m, k), make(m, n), make(n, k)) for m, n, k in shapes]
    musts = [sum(map(_nbytes, t)) + 4 * t[0].shape[1] for t in triples]
    cases = [Case(f"sigma_scores {m}x{n} k={k}", lambda t=t: zskernels.sigma_scores(*t, backend="triton"), must=b)
             for (m, n, k), t, b in zip(shapes, triples, musts)]
    extra = {"U": [t[0] for t in triples], "H": [t[1] for t in triples], "V": [t[2] for t in triples]}
    cases.append(Case(f"sigma_scores_batched x{len(shapes)}",
                      lambda: zskernels.sigma_scores_batched(triples, backend="triton"), extra, sum(musts)))
    return cases


def collect(cases: list[Case], gpu: GPU, execute: bool) -> list[Launch]:
    """The launches of every case, as ``gpu`` would make them (executed and counted, or only recorded)."""
    out = []
    with answering_as(gpu, bf16_dot=not execute):
        for case in cases:
            with intercept(execute, case.extra) as launches:
                case.run()
            for la in launches:
                la.case, la.op_must = case.name, case.must
            out += launches
    return out


# ----------------------------------------------------------------------------------------------
# 1 + 2: counted == arithmetic on small shapes
# ----------------------------------------------------------------------------------------------
SMALL_MATMUL_SHAPES = ((200, 136), (136, 200), (144, 144))  # U tail, V tail, square
SMALL_FP8_SHAPES = ((40, 2100),)  # long K: the fp8 decode paths split it
SMALL_TOKENS = (1, 16, 40, 130, 300)  # one per config bucket: GEMV / decode dot / M <= 64 / <= 256 / prefill
SMALL_SCORES = ((70, 50, 20), (150, 90, 100), (300, 130, 260))  # one per sigma_scores bucket (by k)
SMALL_RANKS = {"remap-int8": lambda o, i: 48, "fp8-lowrank": lambda o, i: 32, "fp8-dense": None,
               "remap-int8 rho0.8": lambda o, i: 96}
SMALL_FP8_RANKS = {"fp8-lowrank": lambda o, i: 32, "fp8-dense": None}
SMALL_INT4_RANKS = {"int4-lowrank": lambda o, i: 48, "int4-dense": None,
                    "int4-lowrank mixed": lambda o, i: 40}  # V groups of 64, U groups of 32 (padded k)


def small_cases(quick: bool = False) -> list[Case]:
    int4 = SMALL_INT4_RANKS  # at the remap shapes and at the long-K fp8 shape
    if quick:
        return (matmul_cases(SMALL_MATMUL_SHAPES[:1], (1, 16, 300), {**SMALL_RANKS, **int4}, True, bias_at_m1=True)
                + matmul_cases(SMALL_FP8_SHAPES, (1, 16), {**SMALL_FP8_RANKS, **int4}, True)
                + score_cases(SMALL_SCORES[:2], True))
    return (matmul_cases(SMALL_MATMUL_SHAPES, SMALL_TOKENS, {**SMALL_RANKS, **int4}, True, bias_at_m1=True)
            + matmul_cases(SMALL_FP8_SHAPES, (1, 16), {**SMALL_FP8_RANKS, **int4}, True)
            + score_cases(SMALL_SCORES, True))


def mismatches(la: Launch) -> list[str]:
    """Where the counted bytes differ from the arithmetic, per label and kind (empty: they agree)."""
    want = by_label(la, FORMULAS[la.kernel](la).requested)
    got = {label: {k: v for k, v in e.items() if k != "unique"} for label, e in la.counted.items()}
    got = {label: e for label, e in got.items() if any(e.values())}
    problems = []
    for label in sorted(set(want) | set(got)):
        w, g = want.get(label, {}), got.get(label, {})
        for kind in ("load", "store", "atomic"):
            if w.get(kind, 0) != g.get(kind, 0):
                problems.append(f"{label} {kind}: counted {g.get(kind, 0)} arithmetic {w.get(kind, 0)}")
    return problems


def check(quick: bool = False, gpu: GPU = H100) -> list[Launch]:
    """Run every op at small shapes with ``gpu``'s configs; raise if a count departs from the arithmetic."""
    launches = collect(small_cases(quick), gpu, execute=True)
    failures = [f"{la.kernel} ({la.case}): {p}" for la in launches for p in mismatches(la)]
    if failures:
        raise AssertionError(f"{len(failures)} counts depart from the tiling arithmetic:\n" + "\n".join(failures[:40]))
    return launches


# ----------------------------------------------------------------------------------------------
# 3: LLaMA-7B shapes
# ----------------------------------------------------------------------------------------------
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
TOKENS_7B = (1, 16, 2048)
RANKS_7B = {"remap-int8": lambda o, i: round(0.6 * min(o, i) / 16) * 16,  # rho 0.6, as bench_remap_matmul.py
            "remap-int8 rho0.8": lambda o, i: round(0.8 * min(o, i) / 16) * 16,
            "fp8-lowrank": lambda o, i: int(0.8 * o * i / (o + i)) // 16 * 16,  # storage 0.4, as bench_fp8_matmul.py
            "fp8-dense": None,
            "int4-lowrank": lambda o, i: int(0.8 * o * i / (o + i)) // 16 * 16,  # fp8-lowrank's rank
            "int4-dense": None}
SCORES_7B = ((4096, 4096, 4096), (4096, 4096, 2048), (11008, 4096, 4096))


def launches_7b(gpu: GPU = H100, forced: dict | None = None, tokens=TOKENS_7B) -> list[Launch]:
    """Every op's launches at LLaMA-7B shapes; ``forced`` maps an op's config file to the one config
    every pick returns (what-if: the arithmetic of a config before anyone times it)."""
    from zskernels._configs import use_config

    cases = matmul_cases(SHAPES_7B, tokens, RANKS_7B, fill=False) + score_cases(SCORES_7B, fill=False)
    with contextlib.ExitStack() as stack:
        for op, config in (forced or {}).items():
            stack.enter_context(use_config(op, config))
        return collect(cases, gpu, execute=False)


def compute_seconds(la: Launch, t: Traffic, gpu: GPU) -> float:
    """FLOPs at the tensor-core rate, or at the FMA rate for exact fp32 dots (and 3x for bf16x3)."""
    a = la.args
    if la.kernel in ("_score_kernel", "_batched_score_kernel"):
        fp32 = a.get("UPCAST", False)
        rate = {0: gpu.fp32_tflops, 1: gpu.matmul_tflops / 2, 2: gpu.matmul_tflops / 6, 3: gpu.matmul_tflops / 3}
        return t.flops / (rate[a["PRECISION"]] if fp32 else gpu.matmul_tflops) / 1e12
    ieee = a.get("INPUT_PRECISION") == "ieee" or a.get("CDT") == 2
    return t.flops / (gpu.fp32_tflops if ieee else gpu.matmul_tflops) / 1e12


def describe_config(la: Launch) -> str:
    a = la.args
    blocks = "x".join(str(a[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BM", "BN", "BK") if k in a)
    path = "" if a.get("USE_DOT", True) else " GEMV"
    return f"{blocks}{path}, grid {la.grid[0]}x{la.grid[1]}"


WEIGHT_KERNELS = ("_remap_stage1_kernel", "_remap_stage2_kernel", "_matmul_kernel", "_int4_matmul_kernel")


def _decode(case: str) -> bool:
    m = case.split("M=")[-1].split()[0] if "M=" in case else ""
    return m.isdigit() and int(m) <= DECODE_M


def _times(row: dict, requested: int, must: int, compute: dict, gpus) -> None:
    for gpu in gpus:
        row[f"compute {gpu.name}"] = compute[gpu.name] * 1e6
        row[f"floor {gpu.name}"] = max(must / gpu.bandwidth_tbs / 1e12, compute[gpu.name]) * 1e6
        row[f"req {gpu.name}"] = max(requested / gpu.bandwidth_tbs / 1e12, compute[gpu.name]) * 1e6


def launch_rows(launches: list[Launch], gpus=(H200, H100)) -> list[dict]:
    """One row per launch: requested and must-move bytes, their ratio, predicted µs per GPU."""
    rows = []
    for la in launches:
        t = FORMULAS[la.kernel](la)
        requested = sum(sum(e.values()) for e in t.requested.values())
        must = sum(t.must.values())
        row = {"case": la.case, "kernel": la.kernel, "config": describe_config(la), "requested": requested,
               "must": must, "distinct": sum(distinct_bytes(la, t).values()), "op_must": la.op_must,
               "ratio": requested / must if must else float("nan"),
               "workspace": sum(sum(t.requested.get(n, {}).values()) for n in WORKSPACE),
               "judged": _decode(la.case) and la.kernel in WEIGHT_KERNELS}
        _times(row, requested, must, {g.name: compute_seconds(la, t, g) for g in gpus}, gpus)
        rows.append(row)
    return rows


def op_rows(rows: list[dict], gpus=(H200, H100)) -> list[dict]:
    """Launch rows summed per op call; "must" is then what the op must move (packed, x, y)."""
    ops: dict[str, dict] = {}
    for r in rows:
        op = ops.setdefault(r["case"], {"case": r["case"], "launches": 0, "requested": 0, "must": r["op_must"],
                                        "judged": _decode(r["case"]) and not r["case"].startswith("sigma"),
                                        **{f"{k} {g.name}": 0.0 for g in gpus for k in ("compute", "req")}})
        op["launches"] += 1
        op["requested"] += r["requested"]
        op["distinct"] = op.get("distinct", 0) + r["distinct"]
        for g in gpus:
            op[f"req {g.name}"] += r[f"req {g.name}"]
            op[f"compute {g.name}"] += r[f"compute {g.name}"]
    for op in ops.values():
        dense = _dense_fp16(op["case"])
        for g in gpus:
            op[f"floor {g.name}"] = max(op["must"] / g.bandwidth_tbs / 1e6, op[f"compute {g.name}"])
            if dense:
                op[f"dense {g.name}"] = max(dense[0] / g.bandwidth_tbs / 1e6, dense[1] / g.matmul_tflops / 1e6)
        op["ratio"] = op["requested"] / op["must"] if op["must"] else float("nan")
    return list(ops.values())


def _dense_fp16(case: str) -> tuple[int, int] | None:
    """(bytes, FLOPs) of cuBLAS fp16 x W^T for a matmul case "<storage> OUTxIN M=m": the baseline's floor."""
    found = re.search(r" (\d+)x(\d+) M=(\d+)", case)
    if not found or case.startswith("sigma"):
        return None
    out, in_, m = map(int, found.groups())
    return 2 * (out * in_ + m * (in_ + out)), 2 * m * out * in_


def _verdict(r: dict) -> str:
    return ("met" if r["ratio"] <= TARGET_RATIO else "MISSED") if r["judged"] else "-"


def _short(gpu: GPU) -> str:
    return gpu.name.split()[1]


def markdown_ops(rows: list[dict], gpus=(H200, H100)) -> str:
    cols = " | ".join(f"{_short(g)} floor µs | {_short(g)} dense fp16 floor µs | {_short(g)} launches req µs"
                      for g in gpus)
    lines = [f"| op call | launches | requested MB | must MB | req/must | target <= {TARGET_RATIO} | "
             f"distinct/must | {cols} |", "|" + "---|" * (7 + 3 * len(gpus))]
    for r in rows:
        times = " | ".join(f"{r[f'floor {g.name}']:.1f} | {r.get(f'dense {g.name}', float('nan')):.1f} | "
                           f"{r[f'req {g.name}']:.1f}" for g in gpus)
        lines.append(f"| {r['case']} | {r['launches']} | {r['requested'] / 1e6:.2f} | {r['must'] / 1e6:.2f} | "
                     f"{r['ratio']:.2f} | {_verdict(r)} | {r['distinct'] / r['must']:.2f} | {times} |")
    return "\n".join(lines)


def markdown_launches(rows: list[dict], gpus=(H200, H100)) -> str:
    cols = " | ".join(f"{_short(g)} floor µs | {_short(g)} req µs" for g in gpus)
    lines = [f"| op call | kernel | tiles, grid | requested MB | must MB | req/must | workspace MB | target | {cols} |",
             "|" + "---|" * (8 + 2 * len(gpus))]
    for r in rows:
        times = " | ".join(f"{r[f'floor {g.name}']:.1f} | {r[f'req {g.name}']:.1f}" for g in gpus)
        lines.append(f"| {r['case']} | {r['kernel']} | {r['config']} | {r['requested'] / 1e6:.3f} | "
                     f"{r['must'] / 1e6:.3f} | {r['ratio']:.2f} | {r['workspace'] / 1e6:.3f} | {_verdict(r)} | "
                     f"{times} |")
    return "\n".join(lines)


def report(gpus=(H200, H100), forced: dict | None = None, tokens=TOKENS_7B) -> str:
    """The LLaMA-7B tables (ops, then launches) as markdown."""
    rows = launch_rows(launches_7b(forced=forced, tokens=tokens), gpus)
    ops = op_rows(rows, gpus)
    rates = ", ".join(f"{g.name} {g.bandwidth_tbs} TB/s" for g in gpus)
    missed = [r for r in ops if r["judged"] and r["ratio"] > TARGET_RATIO]
    return "\n".join([
        f"LLaMA-7B shapes, fp16 x, block configs as {H100.name} and {H200.name} pick them (both use the 'default' "
        f"entries). requested = bytes of the unmasked lanes of every load/store/atomic (L2 re-reads included); "
        f"must = weights + scales + x + y (+ bias) once; distinct = every byte range a launch touches, once "
        f"(its DRAM traffic if every re-read hits L2; intermediates t and split-K workspaces included). "
        f"floor = max(must / bandwidth, FLOPs / rate); "
        f"launches / req = the same per launch with every requested byte from HBM, summed. Bandwidth: {rates}; "
        f"rate {H200.matmul_tflops:.0f} TFLOP/s 16-bit (bf16x3 scores: a third), {H200.fp32_tflops:.0f} fp32 FMA.",
        "", markdown_ops(ops, gpus), "",
        f"Decode op calls (M <= {DECODE_M}) over {TARGET_RATIO}x: {len(missed)} of {sum(r['judged'] for r in ops)}.",
        "", "Per launch:", "", markdown_launches(rows, gpus)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="the small-shape check only")
    parser.add_argument("--quick", action="store_true", help="a subset of the small shapes")
    parser.add_argument("--force", action="append", default=[], metavar="OP=JSON",
                        help="what-if: every pick of OP's configs returns JSON, e.g. "
                             "'fp8_matmul={\"path\": \"decode\", ...}' (skips the check)")
    parser.add_argument("--tokens", default="1,16,2048", help="token counts M of the LLaMA-7B tables")
    args = parser.parse_args(argv)
    forced = {op: json.loads(cfg) for op, cfg in (f.split("=", 1) for f in args.force)}
    tokens = tuple(int(m) for m in args.tokens.split(","))
    if forced:
        print(report(forced=forced, tokens=tokens))
        return 0
    launches = check(args.quick)
    print(f"small shapes: {len(launches)} launches of {len({la.kernel for la in launches})} kernels, counted bytes "
          "== tiling arithmetic for every argument")
    if not args.check:
        print("\n" + report(tokens=tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
