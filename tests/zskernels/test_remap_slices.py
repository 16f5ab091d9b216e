"""remap_matmul on tensor-parallel slices of a packed dict (issue 13): heads of different lengths.

A column-parallel rank holds rows [a, b) of U (u_q's head rows in the range, then u_tail's) and all
of V; a row-parallel rank holds rows [a, b) of V and all of U. The two heads then differ in length
(one may be empty), and the ops read each from its tensor. Each slice's output is checked against
float64 products of the WHOLE dict's dequantised factors, restricted to the slice, on every path:
Triton (interpreted on CPU; M = 1 and 3 take the split-K decode path, M = 17 the prefill path, see
test_remap_matmul.py), the torch reference, and "auto" (the fast CPU path on CPU tensors).
"""
import pytest
import torch

from zskernels import _configs, remap_matmul
from zskernels.formats.remap import packed_layout, pack_remap, unpack_remap
from test_cpu_paths import remap_budget
from test_remap_matmul import DEVICE, KERNEL_RTOL, balanced_factors, needs_triton, rel_err, shape_id

SHAPES = [(37, 23, 9), (23, 37, 9), (29, 29, 7)]  # (out, in, k): U has a tail, V has a tail, square


def slice_rows(packed, role, a, b):
    """Rows [a, b) of U ("column") or of V ("row"): the head rows in range, then the tail rows."""
    out = dict(packed)
    if role == "column":
        s = packed["u_q"].shape[0]
        out["u_q"], out["u_tail"] = packed["u_q"][a:b], packed["u_tail"][max(a - s, 0):max(b - s, 0)]
    else:  # V is stored transposed: its rows are columns of v_q / v_tail
        s = packed["v_q"].shape[1]
        out["v_q"], out["v_tail"] = packed["v_q"][:, a:b], packed["v_tail"][:, max(a - s, 0):max(b - s, 0)]
    return {key: t.contiguous() for key, t in out.items()}


def ranges(n, s):
    """Uneven slices of n rows whose head is s rows: a 3-way split, plus, when there is a tail, one
    exactly on it, one straddling the boundary and one wholly inside it."""
    cuts = [(0, 7), (7, n - 3), (n - 3, n)]
    if n > s:
        cuts += [(s, n), (s - 2, s + 3), (s + 1, n - 1)]
    return cuts


def cases(shape):
    out, in_, _ = shape
    s = min(out, in_)
    return [("column", a, b) for a, b in ranges(out, s)] + [("row", a, b) for a, b in ranges(in_, s)]


def sliced_problem(packed, role, a, b, m, dtype, gen):
    """(sliced dict, x for the slice, float64 expectation from the whole dict's factors)."""
    u_hat, v_hat = (f.double() for f in unpack_remap(packed))
    if role == "column":
        u_hat = u_hat[a:b]
    else:
        v_hat = v_hat[a:b]
    x = torch.randn(m, v_hat.shape[0], generator=gen).to(dtype)
    sliced = {key: t.to(DEVICE) for key, t in slice_rows(packed, role, a, b).items()}
    return sliced, x.to(DEVICE), ((x.double() @ v_hat) @ u_hat.t()).to(DEVICE)


def paths():
    """(backend, fmt) pairs: the CPU path ("auto" on CPU tensors) re-encodes fp8 heads, which
    test_cpu_paths.py covers with its own budget, so it runs with int8 heads here (its tails'
    re-encoding gets test_cpu_paths's budget)."""
    return [(backend, fmt) for backend in ("triton", "torch") for fmt in ("int8", "fp8")] + [("auto", "int8")]


@needs_triton
@pytest.mark.parametrize("backend,fmt", paths(), ids="-".join)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(map(str, s)))
def test_slices_match_float64(shape, backend, fmt, rng):
    packed = pack_remap(*balanced_factors(*shape, rng), fmt=fmt)
    for role, a, b in cases(shape):
        for m in (1, 17):
            sliced, x, want = sliced_problem(packed, role, a, b, m, torch.float16, rng)
            y = remap_matmul(x, sliced, backend=backend)
            assert y.shape == want.shape and y.dtype == torch.float16
            err = rel_err(y, want)
            tolerance = KERNEL_RTOL[torch.float16]
            if backend == "auto":  # the CPU path re-encodes 16-bit tails to int8 rows
                tolerance = remap_budget({key: t.cpu() for key, t in sliced.items()}, torch.float16, tolerance)
            assert err < tolerance, (role, a, b, m, err)


@needs_triton
@pytest.mark.parametrize("target", [4, 64], ids=["straddle", "many"])
def test_slices_with_split_k_and_bias(target, rng):
    """Split-K plans over a stage-1 reduction whose head is short or empty (row slices of V: 12 head
    rows then 30 tail rows, and tail rows only), with a bias, in fp32 (exact dots)."""
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1,
           "target_programs": target}
    packed = pack_remap(*balanced_factors(40, 90, 9, rng))
    bias = torch.randn(40, generator=rng).to(DEVICE)
    with _configs.use_config("remap_matmul", cfg):
        for a, b in ((28, 70), (45, 90)):
            for m in (5, 40):
                sliced, x, want = sliced_problem(packed, "row", a, b, m, torch.float32, rng)
                y = remap_matmul(x, sliced, bias, backend="triton")
                assert rel_err(y, want + bias.double()) < 1e-5, (a, b, m)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(map(str, s)))
def test_sliced_layout_and_factors(shape, rng):
    """Each slice is a valid layout whose head lengths are its tensors', and de-quantises to exactly
    the rows of the whole dict's factors."""
    out, in_, k = shape
    packed = pack_remap(*balanced_factors(*shape, rng))
    u_hat, v_hat = unpack_remap(packed)
    for role, a, b in cases(shape):
        sliced = slice_rows(packed, role, a, b)
        lay = packed_layout(sliced)
        s = min(out, in_)
        head = max(min(b, s) - a, 0)
        if role == "column":
            assert (lay.out_features, lay.in_features, lay.head_out, lay.head) == (b - a, in_, head, s)
        else:
            assert (lay.out_features, lay.in_features, lay.head_out, lay.head) == (out, b - a, s, head)
        u_part, v_part = unpack_remap(sliced)
        assert torch.equal(u_part, u_hat[a:b] if role == "column" else u_hat)
        assert torch.equal(v_part, v_hat[a:b] if role == "row" else v_hat)
    whole = packed_layout(packed)
    assert whole.head == whole.head_out == min(out, in_) and whole.rank == k


def test_inconsistent_dicts_are_refused_in_one_line(rng):
    packed = pack_remap(*balanced_factors(37, 23, 9, rng))  # U: 23 head rows + 14 tail rows
    sliced = slice_rows(packed, "column", 10, 30)
    x = torch.randn(2, 23, generator=rng)
    bad = {
        "disagree on the rank k": {**sliced, "u_q": sliced["u_q"][:, :8].contiguous()},
        "only the bigger factor": {**sliced, "v_tail": torch.zeros(9, 2, dtype=torch.float16)},
        "must both be >= 1": {**packed, "u_q": packed["u_q"][:0], "u_tail": packed["u_tail"][:0]},
    }
    for problem, dict_ in bad.items():
        for backend in ("torch", "auto"):
            with pytest.raises(ValueError, match=problem) as err:
                remap_matmul(x, dict_, backend=backend)
            assert "\n" not in str(err.value) and str(err.value).startswith("malformed packed dict")
