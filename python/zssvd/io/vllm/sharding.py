"""Tensor-parallel slices of zssvd's packed layouts, and the forward of one slice (plain torch, no vLLM).

A vLLM linear layer holds, on each rank, a contiguous slice of the output rows (column-parallel:
q/k/v, gate/up) or of the input columns (row-parallel: o, down) of every checkpoint module it
fuses. For a factor pair W ~= U V^T this is exact without touching the numbers:

* column-parallel: the rows [a, b) of U, all of V (V replicated);
* row-parallel: the rows [a, b) of V, all of U (U replicated); vLLM all-reduces the partial outputs.

Per-component scales (remap, fp8) belong to the replicated rank dimension, so they are kept whole;
HQ's dense fp8 matrices keep one scale per output row, which is sliced with the rows. int4 keeps
one scale and min per group of inputs of each row: output rows slice with their groups (a factor
pair's U has its own groups, along the rank, which no slice cuts), and an input slice keeps whole
groups of V^T's (or the dense weight's) size. When its bounds fall inside groups (``--group-size auto``
may give o_proj groups of 256 and tp 3 slices 192 inputs), the groups are first split exactly into
smaller ones sharing their scale and min (the largest size dividing the group and both bounds; it
must be a multiple of 16, as the format's). remap's
8-bit head covers rows [0, s) of each factor and its 16-bit tail rows [s, L): a slice keeps the
head rows it contains, then the tail rows it contains. Its two heads then differ in length (one may
be empty); ``zskernels.remap_matmul`` reads each factor's head length from its own tensor, so the
slice runs the same op (Triton on a GPU, the fast CPU path on the CPU) as the whole module.

``slice_module`` returns a ``Part``; ``Part.forward(x)`` computes the slice's output.
"""
from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...nn.packed_linear import FLOAT_STORAGES, STORAGES, _kernels, dense_forward

Tensors = dict[str, torch.Tensor]
COLUMN, ROW, WHOLE = "column", "row", "whole"


class ShardingError(ValueError):
    """A checkpoint module cannot be split the way the vLLM layer asks for."""


@dataclass
class Part:
    """One checkpoint module's slice on this rank.

    ``kind``: "weight" (an ordinary matrix, ``tensors["weight"]``), "dense" (HQ's fp8 matrix),
    "lowrank" (a factor pair in ``storage``). Every slice runs its storage's own op.
    """

    kind: str
    storage: str | None
    tensors: Tensors
    out_features: int
    in_features: int
    rank: int = 0
    meta: dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        if self.kind == "weight":
            return _linear(x, self.tensors["weight"])
        if self.kind == "dense":
            return dense_forward(self.storage, x, self.tensors, None, backend)
        return STORAGES[self.storage].forward(x, self.tensors, None, backend)

    def is_float_lowrank(self) -> bool:
        return self.kind == "lowrank" and self.storage in FLOAT_STORAGES


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear; on the CPU with few bf16 rows, zskernels' bf16 kernel (faster than torch's GEMM there)."""
    return _kernels()._cpu.float_linear(x, w) if x.device.type == "cpu" else F.linear(x, w)


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b].contiguous()


def _cols(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[:, a:b].contiguous()


def _split_head_tail(a: int, b: int, s: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows [a, b) of a factor whose head is rows [0, s): (head range, tail range relative to s)."""
    head = (min(a, s), min(b, s))
    tail = (max(a, s) - s, max(b, s) - s)
    return head, tail


def _slice_remap(t: Tensors, role: str, a: int, b: int) -> Tensors:
    out = dict(t)
    if role == COLUMN:  # rows of U: u_q (s, k), u_tail (out - s, k)
        (h0, h1), (t0, t1) = _split_head_tail(a, b, t["u_q"].shape[0])
        out["u_q"], out["u_tail"] = _rows(t["u_q"], h0, h1), _rows(t["u_tail"], t0, t1)
    elif role == ROW:  # rows of V, stored transposed: v_q (k, s), v_tail (k, in - s)
        (h0, h1), (t0, t1) = _split_head_tail(a, b, t["v_q"].shape[1])
        out["v_q"], out["v_tail"] = _cols(t["v_q"], h0, h1), _cols(t["v_tail"], t0, t1)
    return out


# How each storage's tensors are sliced: {role: {tensor name: "rows" | "cols"}}; names not listed stay whole.
_SLICES = {
    "weight": {COLUMN: {"weight": "rows"}, ROW: {"weight": "cols"}},
    "float": {COLUMN: {"weight_u": "rows"}, ROW: {"weight_v": "cols"}},
    "fp8": {COLUMN: {"u_fp8": "rows"}, ROW: {"vt_fp8": "cols"}},
    "dense-fp8": {COLUMN: {"weight_fp8": "rows", "weight_scale": "rows"}, ROW: {"weight_fp8": "cols"}},
    "int4": {COLUMN: {"u_codes": "rows", "u_scales": "rows", "u_mins": "rows"}},  # ROW: _slice_int4_inputs
    "dense-int4": {COLUMN: {"weight_codes": "rows", "weight_scales": "rows", "weight_mins": "rows"}},
}
INT4_INPUTS = {"int4": "v_", "dense-int4": "weight_"}  # the int4 matrix whose inputs a row slice cuts


def _int4_group(t: Tensors, prefix: str) -> int:
    """The group size one int4 matrix was stored with: its padded width over its groups per row."""
    return 2 * t[prefix + "codes"].shape[1] // max(t[prefix + "scales"].shape[1], 1)


def _split_groups(t: Tensors, prefix: str, parts: int) -> Tensors:
    """The same matrix with every group split into ``parts`` groups that share its scale and min: the
    de-quantised weights are unchanged, only the bounds a slice may take get finer."""
    out = dict(t)
    for key in ("scales", "mins"):
        out[prefix + key] = t[prefix + key].repeat_interleave(parts, dim=1).contiguous()
    return out


def _slice_int4_inputs(t: Tensors, prefix: str, a: int, b: int, name: str) -> Tensors:
    """Input columns [a, b) of one int4 matrix (``prefix`` + codes / scales / mins / in_features): whole
    groups, after splitting the stored ones where a bound falls inside a group."""
    from zskernels.formats.int4 import GROUP_MULTIPLE  # here: importing zskernels imports Triton

    codes, stored = t[prefix + "codes"], _int4_group(t, prefix)
    true_in = int(t[prefix + "in_features"])
    group = math.gcd(stored, a, 0 if b == true_in else b)  # the last slice may end inside its padded group
    if group % GROUP_MULTIPLE:
        raise ShardingError(f"{name}: int4 groups of {stored} inputs cannot be split at [{a}, {b}) into groups "
                            f"of a multiple of {GROUP_MULTIPLE}; use a tensor-parallel size whose slices are "
                            f"multiples of {GROUP_MULTIPLE} inputs")
    if group < stored:
        t = _split_groups(t, prefix, stored // group)
    g0, g1 = a // group, -(-b // group)
    out = dict(t)
    out[prefix + "codes"] = _cols(codes, g0 * group // 2, g1 * group // 2)
    for key in ("scales", "mins"):
        out[prefix + key] = _cols(t[prefix + key], g0, g1)
    out[prefix + "in_features"] = torch.tensor(b - a, dtype=torch.int64, device=codes.device)
    return out


def _slice_plain(t: Tensors, rule: dict[str, str], a: int, b: int) -> Tensors:
    cut = {"rows": _rows, "cols": _cols}
    return {name: cut[rule[name]](x, a, b) if name in rule else x for name, x in t.items()}


def slice_module(desc: dict | None, tensors: Tensors, role: str, start: int, size: int,
                 name: str = "") -> Part:
    """This rank's ``Part`` of one checkpoint module.

    ``desc``: its description from the checkpoint (``None`` for an ordinary ``weight``);
    ``role``: COLUMN (output rows [start, start + size)), ROW (input columns) or WHOLE.
    """
    if desc is None:
        weight = tensors["weight"]
        out_f, in_f = weight.shape
        kind, storage, key = "weight", None, "weight"
    else:
        out_f, in_f = desc["out_features"], desc["in_features"]
        kind, storage = desc["kind"], desc["storage"]
        key = f"dense-{storage}" if kind == "dense" else ("float" if storage in FLOAT_STORAGES else storage)
    full = out_f if role == COLUMN else in_f
    if role != WHOLE and (start < 0 or size < 1 or start + size > full):
        raise ShardingError(f"{name}: rank slice [{start}, {start + size}) of its {full} "
                            f"{'output' if role == COLUMN else 'input'} features is out of range; the "
                            "checkpoint does not fit this model's layer sizes at this tensor-parallel size")
    a, b = start, start + size
    if role == WHOLE:
        sliced = dict(tensors)
    elif key == "remap":
        sliced = _slice_remap(tensors, role, a, b)
    elif role == ROW and key in INT4_INPUTS:
        sliced = _slice_int4_inputs(tensors, INT4_INPUTS[key], a, b, name)
    else:
        sliced = _slice_plain(tensors, _SLICES[key][role], a, b)
    out_s, in_s = (size, in_f) if role == COLUMN else (out_f, size) if role == ROW else (out_f, in_f)
    return Part(kind, storage, sliced, out_s, in_s, desc.get("rank", 0) if desc else 0)


_FUSED_IDS = itertools.count()


class FusedParts:
    """The ``Part``s of one vLLM layer (q/k/v, gate/up, or a single module), output = their concatenation.

    Float factor pairs that read the same input share the first product: t = x [V_1 ... V_n] is one
    GEMM, then one second product per part. Other parts (remap, fp8, dense) each run their own op.
    Float factors and ordinary weights are cast once to the serving dtype (what vLLM does to an
    unquantised weight), so no call converts them again.

    On the CPU the whole layer is one zskernels CPU path (``_cpu.run_path``): compiled vLLM calls it as one
    opaque op per layer instead of one per part, and its float GEMMs take zskernels' bf16 kernel where it
    beats torch's. Per-call Python around small GEMMs made compressed models much slower than dense ones in
    compiled vLLM on the CPU (bench/RESULTS.md, eleventh and twelfth sessions).
    """

    def __init__(self, parts: list[Part], dtype: torch.dtype):
        for part in parts:
            if part.is_float_lowrank() or part.kind == "weight":
                part.tensors = {k: v.to(dtype) for k, v in part.tensors.items()}
        self.parts = parts
        self.shared = [i for i, p in enumerate(parts) if p.is_float_lowrank()]
        self.v_cat = torch.cat([parts[i].tensors["weight_v"] for i in self.shared]) if self.shared else None
        self.ranks = [parts[i].tensors["weight_v"].shape[0] for i in self.shared]
        self._named = self.tensors()
        self._cpu_path = f"zssvd.fused_parts.{next(_FUSED_IDS)}"
        cpu = _kernels()._cpu
        this, width = weakref.ref(self), sum(p.out_features for p in parts)
        cpu.register_path(self._cpu_path, lambda x, _tensors, bias: this()._forward(x, bias, "auto"),
                          lambda _tensors: width)
        weakref.finalize(self, cpu.unregister_path, self._cpu_path)

    def tensors(self) -> Tensors:
        """Every tensor held, by a unique name (to register them as the layer's buffers)."""
        named = {f"part{i}_{k}": v for i, p in enumerate(self.parts) for k, v in p.tensors.items()
                 if not (i in self.shared and k == "weight_v")}
        if self.v_cat is not None:
            named["shared_weight_v"] = self.v_cat
        return named

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        if backend == "auto" and x.device.type == "cpu":  # compiled: one opaque op, handed every tensor it reads
            return _kernels()._cpu.run_path(self._cpu_path, x, self._named, bias)
        return self._forward(x, bias, backend)

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        outputs: list[torch.Tensor | None] = [None] * len(self.parts)
        if self.shared:
            t = _linear(x, self.v_cat).split(self.ranks, dim=-1)
            for i, ti in zip(self.shared, t):
                outputs[i] = _linear(ti, self.parts[i].tensors["weight_u"])
        for i, part in enumerate(self.parts):
            if outputs[i] is None:
                outputs[i] = part.forward(x, backend)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y + bias if bias is not None else y
