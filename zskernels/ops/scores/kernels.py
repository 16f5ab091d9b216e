"""sigma_scores on the GPU: s_i = u_i^T H v_i for every component, without the m x k product H @ V.

Each program owns one (BM rows x BK components) tile of H @ V, accumulated in registers by
``tl.dot`` over n in chunks of BN; it multiplies the tile by the matching U tile and sums over its
rows, giving partial scores for its row block in a small fp32 buffer ((m / BM) x k); a second,
tiny kernel adds the row blocks up in a fixed order (deterministic, no atomics).

``precision`` matters only when tl.dot gets fp32 operands (fp32 or mixed-dtype inputs): "bf16x3"
(default: three bf16 products of hi/lo splits, ~2e-5 relative), "tf32x3" (~1e-6), "tf32" (~4e-4),
"ieee" (exact, slowest). fp16 / bf16 inputs of one type multiply in their own type, accumulate in
fp32. Any strides are taken without copying.

``sigma_scores_batched`` scores many triples of different shapes in one launch (plus one for the
reduction): a device-side int64 table holds each triple's addresses, sizes and strides, and each
program finds its triple by comparing its id with the table's tile offsets; the kernel is
specialised on the layout every tensor of a role shares (ROW_MAJOR / COL_MAJOR / STRIDED) and on
16-alignment. Block configs: ``configs/sigma_scores.json``, keyed by k. Why this design, and its
precision figures: ``zskernels/README.md``.

Order: jitted kernels, host launchers and dispatch, op registration and the public ops.
"""
from __future__ import annotations  # kernel annotations name `tl`, which is imported lazily

from typing import Iterable, Sequence

import torch

from ... import _device, _triton
from ..._backend import check_same_device
from ..._configs import pick_config
from ..._triton import cdiv, empty, jit_later, launch, tile_coords
from .naive import (DEFAULT_PRECISION, PRECISIONS, check_precision, check_triple, choose_backend,  # noqa: F401
                    sigma_scores_reference, split_items)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Jitted kernels (plain functions until _triton.ready jits them)
# ----------------------------------------------------------------------------------------------
@jit_later
def _split_bf16(x, NATIVE_BF16: tl.constexpr):
    """fp32 x as hi + lo, both bf16 (x - hi - lo is about 2^-17 |x|); fp32 copies off-GPU."""
    hi = x.to(tl.bfloat16)
    lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    if not NATIVE_BF16:  # the interpreter has no bf16 tl.dot; fp32 holds bf16 values exactly
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    return hi, lo


@jit_later
def _dot(a, b, acc, PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """acc + a @ b; PRECISION (see PRECISIONS) only matters for fp32 operands."""
    if a.dtype != tl.float32:  # 16-bit operands: exact products, one native product
        acc = tl.dot(a, b, acc)
    elif PRECISION == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif PRECISION == 2:
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    else:  # bf16x3: three bf16 products, small terms first; the lo x lo term is dropped
        a_hi, a_lo = _split_bf16(a, NATIVE_BF16)
        b_hi, b_lo = _split_bf16(b, NATIVE_BF16)
        acc = tl.dot(a_lo, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    return acc


@jit_later
def _tile_scores(u_ptr, h_ptr, v_ptr, m, n, k, s_um, s_uk, s_hm, s_hn, s_vn, s_vk, rb, cb,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """Partial scores of one tile: sum over its BM rows of U * (H @ V), a (BK,) fp32 vector.

    Out-of-range rows, columns and the n tail are masked (to 0), not clamped: a clamped index
    loses the contiguity Triton needs to emit 16-byte loads.
    """
    rows = rb * BM + tl.arange(0, BM)
    cols = cb * BK + tl.arange(0, BK)
    row_ok = (rows < m)[:, None]
    col_ok = (cols < k)[None, :]
    ns = tl.arange(0, BN)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * s_hm + ns[None, :] * s_hn
    v_ptrs = v_ptr + ns[:, None] * s_vn + cols.to(tl.int64)[None, :] * s_vk
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, n, BN):
        n_ok = ns < n - n0
        h = tl.load(h_ptrs, mask=row_ok & n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & col_ok, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            v = v.to(tl.float32)
        acc = _dot(h, v, acc, PRECISION, NATIVE_BF16)
        h_ptrs += BN * s_hn
        v_ptrs += BN * s_vn
    u_ptrs = u_ptr + rows.to(tl.int64)[:, None] * s_um + cols.to(tl.int64)[None, :] * s_uk
    u = tl.load(u_ptrs, mask=row_ok & col_ok, other=0.0)
    return tl.sum(u.to(tl.float32) * acc, axis=0)


@jit_later
def _score_kernel(u_ptr, h_ptr, v_ptr, part_ptr, m, n, k,
                  s_um, s_uk, s_hm, s_hn, s_vn, s_vk,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """One (row block, column block) tile per program; partial scores to part[rb, cols]."""
    rb, cb = tile_coords(tl.program_id(0), tl.cdiv(m, BM), tl.cdiv(k, BK), GROUP)
    part = _tile_scores(u_ptr, h_ptr, v_ptr, m, n, k, s_um, s_uk, s_hm, s_hn, s_vn, s_vk, rb, cb,
                        BM, BN, BK, UPCAST, PRECISION, NATIVE_BF16)
    cols = cb * BK + tl.arange(0, BK)
    tl.store(part_ptr + rb.to(tl.int64) * k + cols, part, mask=cols < k)


@jit_later
def _sum_rows(part_ptr, out_ptr, num_rows, k, cb, RB: tl.constexpr, BLOCK: tl.constexpr):
    """out[cols] = sum over rows of part (num_rows x k, row-major), in a fixed order."""
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, RB)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, num_rows, RB):
        rows = r0 + r
        mask = (rows < num_rows)[:, None] & (cols < k)[None, :]
        block = tl.load(part_ptr + rows.to(tl.int64)[:, None] * k + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(block, axis=0)
    tl.store(out_ptr + cols, acc, mask=cols < k)


@jit_later
def _reduce_kernel(part_ptr, out_ptr, num_rows, k, RB: tl.constexpr, BLOCK: tl.constexpr):
    _sum_rows(part_ptr, out_ptr, num_rows, k, tl.program_id(0), RB, BLOCK)


# Batched form: each triple has one row of int64 fields in a device-side table (META_FIELDS):
# the addresses of U, H and V; m, n, k; the (row, column) strides of U, H and V; the offsets of
# its partial-score block and of its scores in the flat buffers; the index of its first tile in
# the score grid and of its first column block in the reduction grid. _triton.ready turns
# the names into constexpr globals _F_<name> for the kernels (declared after the kernels).
META_FIELDS = ("U", "H", "V", "M", "N", "K", "U_S0", "U_S1", "H_S0", "H_S1", "V_S0", "V_S1",
               "PART", "OUT", "TILE0", "CB0")
# Layout of all tensors of one role, a constexpr of the batched kernel (see _layout).
ROW_MAJOR, COL_MAJOR, STRIDED = 0, 1, 2


@jit_later
def _field(meta_ptr, item, FIELD: tl.constexpr, ALIGNED: tl.constexpr = False):
    """One table entry; ALIGNED declares it a multiple of 16 (checked by the launcher)."""
    value = tl.load(meta_ptr + item * _NUM_FIELDS + FIELD)
    if ALIGNED:
        value = tl.multiple_of(value, 16)
    return value


@jit_later
def _field_ptr(meta_ptr, item, FIELD: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A table entry holding an address, as a pointer to DTYPE (16-byte aligned if ALIGNED)."""
    ptr = tl.load(meta_ptr + item * _NUM_FIELDS + FIELD).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@jit_later
def _find_item(meta_ptr, num_items, pid, START: tl.constexpr, ITEMS: tl.constexpr):
    """Index of the triple whose range of program ids (starting at field START) holds pid."""
    i = tl.arange(0, ITEMS)
    starts = tl.load(meta_ptr + i * _NUM_FIELDS + START, mask=i < num_items, other=2**62)
    return tl.sum((starts <= pid).to(tl.int32), axis=0) - 1


@jit_later
def _batched_score_kernel(meta_ptr, part_ptr, num_items,
                          U_DTYPE: tl.constexpr, H_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                          U_LAYOUT: tl.constexpr, H_LAYOUT: tl.constexpr, V_LAYOUT: tl.constexpr,
                          ALIGNED: tl.constexpr, ITEMS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """_score_kernel over a flattened schedule of every triple's tiles.

    Strides read from the table are unknown to the compiler, so an operand's unit stride is
    passed as the literal 1 when its role's layout (*_LAYOUT: 0 row-major, 1 column-major,
    2 neither) says so; loads along it then vectorise as in the single kernel.
    """
    pid = tl.program_id(0)
    item = _find_item(meta_ptr, num_items, pid, _F_TILE0, ITEMS)
    m = _field(meta_ptr, item, _F_M, ALIGNED).to(tl.int32)
    n = _field(meta_ptr, item, _F_N, ALIGNED).to(tl.int32)
    k = _field(meta_ptr, item, _F_K, ALIGNED).to(tl.int32)
    u_ptr = _field_ptr(meta_ptr, item, _F_U, U_DTYPE, ALIGNED)
    h_ptr = _field_ptr(meta_ptr, item, _F_H, H_DTYPE, ALIGNED)
    v_ptr = _field_ptr(meta_ptr, item, _F_V, V_DTYPE, ALIGNED)
    su0 = _field(meta_ptr, item, _F_U_S0, ALIGNED and U_LAYOUT != 1)
    su1 = _field(meta_ptr, item, _F_U_S1, ALIGNED and U_LAYOUT != 0)
    sh0 = _field(meta_ptr, item, _F_H_S0, ALIGNED and H_LAYOUT != 1)
    sh1 = _field(meta_ptr, item, _F_H_S1, ALIGNED and H_LAYOUT != 0)
    sv0 = _field(meta_ptr, item, _F_V_S0, ALIGNED and V_LAYOUT != 1)
    sv1 = _field(meta_ptr, item, _F_V_S1, ALIGNED and V_LAYOUT != 0)
    rb, cb = tile_coords(pid - _field(meta_ptr, item, _F_TILE0), tl.cdiv(m, BM), tl.cdiv(k, BK), GROUP)
    part = _tile_scores(u_ptr, h_ptr, v_ptr, m, n, k,
                        1 if U_LAYOUT == 1 else su0, 1 if U_LAYOUT == 0 else su1,
                        1 if H_LAYOUT == 1 else sh0, 1 if H_LAYOUT == 0 else sh1,
                        1 if V_LAYOUT == 1 else sv0, 1 if V_LAYOUT == 0 else sv1,
                        rb, cb, BM, BN, BK, UPCAST, PRECISION, NATIVE_BF16)
    cols = cb * BK + tl.arange(0, BK)
    tl.store(part_ptr + _field(meta_ptr, item, _F_PART) + rb * k + cols, part, mask=cols < k)


@jit_later
def _batched_reduce_kernel(meta_ptr, part_ptr, out_ptr, num_items, BM: tl.constexpr,
                           ITEMS: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    """_reduce_kernel over a flattened schedule of every triple's column blocks."""
    pid = tl.program_id(0)
    item = _find_item(meta_ptr, num_items, pid, _F_CB0, ITEMS)
    m = _field(meta_ptr, item, _F_M)
    k = _field(meta_ptr, item, _F_K)
    _sum_rows(part_ptr + _field(meta_ptr, item, _F_PART), out_ptr + _field(meta_ptr, item, _F_OUT),
              tl.cdiv(m, BM), k, pid - _field(meta_ptr, item, _F_CB0), RB, BLOCK)


# ----------------------------------------------------------------------------------------------
# Host launchers and dispatch (block configs by k, table layout)
# ----------------------------------------------------------------------------------------------
_REDUCE_RB, _REDUCE_BLOCK = 16, 128


def _upcast(h_dtype: torch.dtype, v_dtype: torch.dtype) -> bool:
    """Whether tl.dot runs on fp32 copies of the H and V tiles (else on their 16-bit type)."""
    if h_dtype != v_dtype or h_dtype == torch.float32:
        return True
    return h_dtype == torch.bfloat16 and not _device.native_bf16_dot()  # the interpreter has none


def _config(k: int, h_dtype: torch.dtype, v_dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes for k components: shared keys plus the fp32 or 16-bit operand entry."""
    cfg = pick_config("sigma_scores", k, device)
    per_dtype = cfg.pop("fp32"), cfg.pop("16bit")
    cfg.update(per_dtype[0] if _upcast(h_dtype, v_dtype) else per_dtype[1])
    return cfg


def _launch_options(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _sigma_scores_triton(U: Tensor, H: Tensor, V: Tensor, precision: int) -> Tensor:
    """Host launcher of zskernels::sigma_scores (shapes already checked)."""
    (m, k), n = U.shape, H.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(k, dtype=torch.float32, device=U.device)
    cfg = _config(k, H.dtype, V.dtype, U.device)
    bm, bk = cfg["BM"], cfg["BK"]
    num_rb = cdiv(m, bm)
    part = empty(num_rb * k, torch.float32, U.device)
    out = empty(k, torch.float32, U.device)
    grid = (num_rb * cdiv(k, bk),)
    launch(_score_kernel)[grid](
        U, H, V, part, m, n, k, U.stride(0), U.stride(1), H.stride(0), H.stride(1),
        V.stride(0), V.stride(1), BM=bm, BN=cfg["BN"], BK=bk, GROUP=cfg["GROUP"],
        UPCAST=_upcast(H.dtype, V.dtype), PRECISION=precision, NATIVE_BF16=_device.native_bf16_dot(),
        **_launch_options(cfg))
    launch(_reduce_kernel)[(cdiv(k, _REDUCE_BLOCK),)](
        part, out, num_rb, k, RB=_REDUCE_RB, BLOCK=_REDUCE_BLOCK)
    return out


def _layout(ts: list[Tensor]) -> int:
    """Layout shared by every tensor of one role: ROW_MAJOR, COL_MAJOR, or STRIDED (mixed
    layouts or strided slices: correct, no copies, but loads no longer vectorise)."""
    if all(t.stride(1) == 1 or t.shape[1] == 1 for t in ts):
        return ROW_MAJOR
    if all(t.stride(0) == 1 or t.shape[0] == 1 for t in ts):
        return COL_MAJOR
    return STRIDED


def _aligned(t: Tensor, layout: int) -> bool:
    """16-byte aligned address; sizes and the non-unit strides multiples of 16 elements."""
    strides = {ROW_MAJOR: t.stride()[:1], COL_MAJOR: t.stride()[1:], STRIDED: t.stride()}[layout]
    return t.data_ptr() % 16 == 0 and all(x % 16 == 0 for x in (*strides, *t.shape))


def _batched_table(triples: list[tuple], bm: int, bk: int):
    """Table rows (META_FIELDS) of the triples with work to do, offsets of the empty ones'
    scores, and the sizes of the partial buffer, the score grid and the reduction grid."""
    rows, empty = [], []
    part = out = tile0 = cb0 = 0
    for u, h, v in triples:
        (m, k), n = u.shape, h.shape[1]
        if m and n and k:
            rows.append([u.data_ptr(), h.data_ptr(), v.data_ptr(), m, n, k,
                         *u.stride(), *h.stride(), *v.stride(), part, out, tile0, cb0])
            part += cdiv(m, bm) * k
            tile0 += cdiv(m, bm) * cdiv(k, bk)
            cb0 += cdiv(k, _REDUCE_BLOCK)
        else:
            empty.append((out, k))
        out += k
    return rows, empty, part, tile0, cb0


def _sigma_scores_batched_triton(us: list[Tensor], hs: list[Tensor], vs: list[Tensor],
                                 precision: int) -> Tensor:
    """Host launcher of zskernels::sigma_scores_batched: all scores in one flat vector."""
    import triton

    device = us[0].device
    layouts = [_layout(ts) for ts in (us, hs, vs)]
    cfg = _config(max(u.shape[1] for u in us), hs[0].dtype, vs[0].dtype, device)
    bm, bk = cfg["BM"], cfg["BK"]
    triples = list(zip(us, hs, vs))
    rows, no_work, num_part, num_tiles, num_cb = _batched_table(triples, bm, bk)
    out = empty(sum(u.shape[1] for u in us), torch.float32, device)
    for start, k in no_work:
        out[start:start + k] = 0.0
    if not rows:
        return out
    pinned = device.type == "cuda"  # lets the table's copy run without stalling the host
    meta = torch.tensor(rows, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)
    part = empty(num_part, torch.float32, device)
    items = triton.next_power_of_2(len(rows))
    aligned = all(_aligned(t, lay) for triple in triples for t, lay in zip(triple, layouts))
    _batched_score_kernel[(num_tiles,)](  # inside an opaque custom op: a plain launch
        meta, part, len(rows), *(_tl_dtype(t.dtype) for t in triples[0]), *layouts, aligned, items,
        BM=bm, BN=cfg["BN"], BK=bk, GROUP=cfg["GROUP"], UPCAST=_upcast(hs[0].dtype, vs[0].dtype),
        PRECISION=precision, NATIVE_BF16=_device.native_bf16_dot(), **_launch_options(cfg))
    _batched_reduce_kernel[(num_cb,)](
        meta, part, out, len(rows), BM=bm, ITEMS=items, RB=_REDUCE_RB, BLOCK=_REDUCE_BLOCK)
    return out


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]

# ----------------------------------------------------------------------------------------------
# Op registration and the public ops
# ----------------------------------------------------------------------------------------------
_triton.constants(__name__, _NUM_FIELDS=len(META_FIELDS), **{f"_F_{name}": i for i, name in enumerate(META_FIELDS)})
# Schemas spelled out; they match the annotations, which some torch versions infer them from.
_triton.triton_op("zskernels::sigma_scores",
                  schema="(Tensor U, Tensor H, Tensor V, int precision) -> Tensor")(_sigma_scores_triton)
# An opaque custom op: its table holds raw addresses, which torch.compile cannot trace.
_triton.custom_op("zskernels::sigma_scores_batched",
                  schema="(Tensor[] us, Tensor[] hs, Tensor[] vs, int precision) -> Tensor",
                  fake=lambda us, hs, vs, precision: us[0].new_empty(sum(u.shape[1] for u in us),
                                                                     dtype=torch.float32))(_sigma_scores_batched_triton)


def sigma_scores(U: Tensor, H: Tensor, V: Tensor, *, backend: str = "auto",
                 precision: str = DEFAULT_PRECISION) -> Tensor:
    """Scores s (k,) with s_i = u_i^T H v_i, for U (m x k), H (m x n), V (n x k).

    Returns float32 (float64 on the torch path when an input is float64). ``precision``
    picks the tensor-core mode for fp32 inputs on the Triton path (module docstring,
    zskernels/README.md); the torch path ignores it.
    """
    check_triple(U, H, V, "sigma_scores")
    check_same_device(U=U, H=H, V=V)
    code = check_precision(precision)
    if choose_backend(backend, (U, H, V), "sigma_scores") == "torch":
        return sigma_scores_reference(U, H, V)
    _triton.ready(__name__)
    return torch.ops.zskernels.sigma_scores(U, H, V, code)


def sigma_scores_batched(items: Iterable[Sequence[Tensor]], *, backend: str = "auto",
                         precision: str = DEFAULT_PRECISION) -> list[Tensor]:
    """``[sigma_scores(U, H, V) for U, H, V in items]``; on Triton one scoring launch for all.

    Triples may have different shapes; they must share one device and one dtype per role
    (every U one dtype, every H one dtype, every V one dtype). The torch path loops over the
    reference. Works under torch.compile (as an opaque op) but not inside CUDA-graph capture:
    every call copies a table of the triples' addresses to the device. The scores are views
    of one flat float32 buffer.
    """
    items = [tuple(item) for item in items]
    us, hs, vs = split_items(items)
    code = check_precision(precision)
    if not items:
        return []
    tensors = us + hs + vs
    if choose_backend(backend, tensors, "sigma_scores_batched") == "torch":
        return [sigma_scores_reference(*item) for item in items]
    _triton.ready(__name__)
    flat = torch.ops.zskernels.sigma_scores_batched(us, hs, vs, code)
    return list(flat.split([u.shape[1] for u in us]))
