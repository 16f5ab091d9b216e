"""The fast CPU paths (zskernels/_cpu.py, ops/remap/cpu.py, ops/fp8/cpu.py) against float64.

backend="auto" on CPU tensors takes them; backend="torch" keeps the plain reference. Under fp32
activations remap's stored values are exact inputs, so the only error is the dtype's. fp8 weights,
and remap's factors under 16-bit activations, are re-encoded once to int8 rows: that rounding is
bounded here by its own budget, and for fp8 measured against the fp8 quantisation error itself.
"""
import gc

import pytest
import torch

import zskernels
from zskernels import _cpu, _cpu_kernel as cpu_kernel
from zskernels.formats.remap import unpack_remap
from zskernels.ops.remap.cpu import product_is_smaller

SHAPES = [(37, 23, 9), (23, 37, 9), (48, 48, 48), (37, 23, 1), (64, 32, 16)]  # out>in, in>out, square, k=1, K%16=0
ROWS = [1, 3, 17]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True, params=["kernel", "torch-routes"])
def int8_route(request, monkeypatch):
    """Every test twice: int8 GEMMs of bf16 activations through zskernels' CPU kernel (where it runs here),
    and through torch's routes (int8pack, planes, chunked), which every other dtype and CPU takes."""
    if request.param == "kernel" and not cpu_kernel.available():
        pytest.skip(f"the CPU kernels are off here: {cpu_kernel.unavailable_reason() or 'their build failed'}")
    if request.param == "torch-routes":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    return request.param


def torch_routes_only(route: str, dtype: torch.dtype) -> None:
    """For the tests of torch's routes themselves: bf16 x takes the kernel instead where it runs."""
    if route == "kernel" and dtype == torch.bfloat16:
        pytest.skip("bf16 activations take the CPU kernel here, not torch's routes")


def rel_err(a, b):
    return float(torch.linalg.norm((a.double() - b).flatten()) / torch.linalg.norm(b.flatten()))


def factors(out, in_, k, gen):
    return torch.randn(out, k, generator=gen) * 0.3, torch.randn(in_, k, generator=gen) * 0.3


def reencoding_budget(w: torch.Tensor) -> float:
    """Relative error int8 re-encoding of w's rows may add: half a step (absmax/254) per element, RMS over the matrix."""
    if not w.numel():
        return 0.0
    step = w.abs().amax(dim=1, keepdim=True) / 127
    return float((step / 12 ** 0.5).expand_as(w).norm() / w.norm())


def remap_budget(packed: dict, dtype: torch.dtype, tolerance: float | None = None) -> float:
    """The dtype's ``tolerance``, plus (16-bit activations on the CPU path) the re-encoding to int8 rows of
    the factors, or of their product where that is smaller, x4 as x's direction is random."""
    tolerance = RTOL[dtype] if tolerance is None else tolerance
    if dtype == torch.float32:
        return tolerance
    u_hat, v_hat = unpack_remap(packed)
    if product_is_smaller(u_hat.shape[0], u_hat.shape[1], v_hat.shape[0]):
        return tolerance + 4 * reencoding_budget(u_hat @ v_hat.t())
    return tolerance + 4 * (reencoding_budget(v_hat.t()) + reencoding_budget(u_hat))


@pytest.mark.parametrize("tail", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_remap_int8_matches_float64(shape, dtype, m, tail, rng):
    out, in_, k = shape
    packed = zskernels.pack_remap(*factors(out, in_, k, rng), fmt="int8", tail_dtype=tail)
    u_hat, v_hat = unpack_remap(packed)
    x, bias = torch.randn(m, in_, generator=rng).to(dtype), torch.randn(out, generator=rng)
    y = zskernels.remap_matmul(x, packed, bias)
    assert y.shape == (m, out) and y.dtype == dtype
    assert rel_err(y, (x.double() @ v_hat.double()) @ u_hat.double().t() + bias.double()) < remap_budget(packed, dtype)


@pytest.mark.parametrize("m", [1, 20])
def test_remap_16_bit_path_multiplies_the_reencoded_factors(m, rng):
    """16-bit x: exactly the product of the factors' int8 re-encodings (per row), on every route;
    fp32 x: the stored values themselves."""
    packed = zskernels.pack_remap(*factors(300, 40, 24, rng), fmt="int8", tail_dtype=torch.bfloat16)
    u_hat, v_hat = unpack_remap(packed)
    x = torch.randn(m, 40, generator=rng)
    assert rel_err(zskernels.remap_matmul(x, packed), (x.double() @ v_hat.double()) @ u_hat.double().t()) < 1e-5
    (vq, vs), (uq, us) = _cpu.float_rows_as_int8(v_hat.t()), _cpu.float_rows_as_int8(u_hat)
    v8, u8 = vq.double() * vs.double()[:, None], uq.double() * us.double()[:, None]
    xb = x.to(torch.bfloat16)
    y = zskernels.remap_matmul(xb, packed)
    assert rel_err(y, (xb.double() @ v8.t()) @ u8.t()) < RTOL[torch.bfloat16]
    assert rel_err(y, (xb.double() @ v_hat.double()) @ u_hat.double().t()) < remap_budget(packed, torch.bfloat16)


def test_cache_bytes_of_a_remap_plan(rng, int8_route):
    """What the 16-bit path keeps: V_hat^T in int8 at t's width (24 -> 32 rows) and int8pack's K (40 -> 48),
    U_hat in int8 (300 x 32), and one bf16 scale per row of each; the kernel's layout instead keeps K (40:
    a multiple of 4: it reads K in quads), pads U_hat's rows to blocks of 16 (304) and keeps float32 scales."""
    packed = zskernels.pack_remap(*factors(300, 40, 24, rng), fmt="int8", tail_dtype=torch.bfloat16)
    assert _cpu.derived_nbytes(packed.values()) == 0
    zskernels.remap_matmul(torch.randn(1, 40, generator=rng).to(torch.bfloat16), packed)
    if int8_route == "kernel":
        assert _cpu.derived_nbytes(packed.values()) == 32 * 40 + 304 * 32 + 4 * (32 + 300)
    else:
        assert _cpu.derived_nbytes(packed.values()) == 32 * 48 + 300 * 32 + 2 * (32 + 300)
    assert _cpu.derived_nbytes([torch.zeros(1)]) == 0  # another tensor's entries are not counted


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("shape", [(48, 40, 40), (37, 23, 15), (23, 37, 15)], ids=shape_id)
def test_remap_16_bit_path_multiplies_the_reencoded_product_of_high_ranks(shape, m, rng, int8_route):
    """From k (out + in) > out * in on, 16-bit x meets W_hat = U_hat V_hat^T re-encoded to int8 rows: one GEMM,
    and the plan holds the product's out * in bytes (plus padding) instead of k (out + in)."""
    out, in_, k = shape
    packed = zskernels.pack_remap(*factors(out, in_, k, rng), fmt="int8", tail_dtype=torch.bfloat16)
    u_hat, v_hat = unpack_remap(packed)
    w_hat = u_hat.double() @ v_hat.double().t()
    q, scale = _cpu.float_rows_as_int8(w_hat.float())
    xb = torch.randn(m, in_, generator=rng).to(torch.bfloat16)
    y = zskernels.remap_matmul(xb, packed)
    assert rel_err(y, xb.double() @ (q.double() * scale.double()[:, None]).t()) < RTOL[torch.bfloat16]
    assert rel_err(y, xb.double() @ w_hat.t()) < remap_budget(packed, torch.bfloat16)
    if int8_route == "kernel":  # rows in blocks of 16, K in quads, float32 scales
        expected = -(-out // 16) * 16 * (in_ + -in_ % 4) + 4 * out
    else:  # int8pack's K in steps of 16, bf16 scales
        expected = out * (in_ + -in_ % 16) + 2 * out
    assert _cpu.derived_nbytes(packed.values()) == expected


def test_the_product_is_smaller_from_half_the_harmonic_rank_on():
    assert not product_is_smaller(576, 288, 576) and product_is_smaller(576, 289, 576)
    assert not product_is_smaller(1536, 418, 576) and product_is_smaller(1536, 419, 576)


def test_remap_reencoding_keeps_v_heads_that_bound_their_tail(rng):
    """A row of V_hat^T whose tail fits under its head's scale re-encodes to the stored int8 head."""
    packed = zskernels.pack_remap(*factors(20, 50, 8, rng), fmt="int8", tail_dtype=torch.bfloat16)
    _, v_hat = unpack_remap(packed)
    q, _ = _cpu.float_rows_as_int8(v_hat.t())
    fits = packed["v_tail"].float().abs().amax(dim=1) <= 127 * packed["v_scale"]
    assert fits.any()
    assert torch.equal(q[fits, :20], packed["v_q"][fits])


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fp8_paths_stay_within_the_reencoding_error(shape, dtype, m, rng):
    out, in_, k = shape
    U, V = factors(out, in_, k, rng)
    lowrank, dense = zskernels.pack_fp8_lowrank(U, V), zskernels.quantize_fp8_dense(U @ V.T)
    x = torch.randn(m, in_, generator=rng).to(dtype)
    u_hat, v_hat = zskernels.dequantize_fp8(lowrank)
    w_hat = zskernels.dequantize_fp8(dense)
    # Budget: the re-encoding's RMS rounding of each factor, times 4 (x's direction is random), plus the dtype's.
    budget_lr = 4 * (reencoding_budget(v_hat.T) + reencoding_budget(u_hat)) + RTOL[dtype]
    budget_dense = 4 * reencoding_budget(w_hat) + RTOL[dtype]
    y = zskernels.fp8_lowrank_matmul(x, lowrank)
    assert y.dtype == dtype and rel_err(y, (x.double() @ v_hat.double()) @ u_hat.double().T) < budget_lr
    y = zskernels.fp8_linear(x, dense)
    assert y.dtype == dtype and rel_err(y, x.double() @ w_hat.double().T) < budget_dense


def test_reencoding_costs_little_next_to_fp8_itself(rng):
    """On a realistic (Gaussian) matrix, int8 re-encoding's error is a fraction of fp8's own error."""
    W = torch.randn(256, 192, generator=rng, dtype=torch.float64)
    packed = zskernels.quantize_fp8_dense(W)
    fp8_values = zskernels.dequantize_fp8(packed).double()
    q, scale = _cpu.fp8_rows_as_int8(packed["weight_fp8"], packed["weight_scale"])
    reencoded = q.double() * scale.double()[:, None]
    fp8_err = float((fp8_values - W).norm() / W.norm())
    extra = float((reencoded - fp8_values).norm() / W.norm())
    assert extra < 0.35 * fp8_err, (extra, fp8_err)  # measured: 0.27x (2.60% -> 2.68% in all)


def test_remap_fp8_heads_are_reencoded_once(rng):
    packed = zskernels.pack_remap(*factors(48, 32, 16, rng), fmt="fp8")
    u_hat, v_hat = unpack_remap(packed)
    x = torch.randn(3, 32, generator=rng)
    y = zskernels.remap_matmul(x, packed)
    reference = (x.double() @ v_hat.double()) @ u_hat.double().t()
    assert rel_err(y, reference) < 4 * (reencoding_budget(v_hat.T) + reencoding_budget(u_hat))
    entries = _cpu.cache_entries()
    zskernels.remap_matmul(x, packed)
    assert _cpu.cache_entries() == entries  # the second call re-encodes nothing


def test_torch_backend_is_still_the_reference(rng):
    packed = zskernels.pack_fp8_lowrank(*factors(37, 23, 9, rng))
    x = torch.randn(3, 23, generator=rng)
    assert torch.equal(zskernels.fp8_lowrank_matmul(x, packed, backend="torch"),
                       zskernels.fp8_lowrank_matmul_reference(x, packed))


def test_derived_cache_follows_its_source(rng):
    source = torch.randn(8, generator=rng)
    first = _cpu.derived(source, "double", lambda: source * 2)
    assert _cpu.derived(source, "double", lambda: source * 3) is first  # cached
    source.add_(1)  # in-place change: rebuilt
    assert torch.equal(_cpu.derived(source, "double", lambda: source * 2), source * 2)
    entries = _cpu.cache_entries()
    del source, first
    assert _cpu.cache_entries() < entries  # dropped with its source


@pytest.mark.parametrize("k", [8, 9, 23, 32])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int8_linear_any_reduction_length(k, m, rng):
    """int8pack needs K % 16 == 0 on the CPU (wrong results or a crash otherwise): other K take the chunked path."""
    w = torch.randint(-127, 128, (12, k), generator=rng, dtype=torch.int8)
    scale = torch.rand(12, generator=rng) + 0.5
    x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
    expected = x.double() @ (w.double() * scale.double()[:, None]).T
    assert rel_err(_cpu.int8_linear(x, w, scale), expected) < RTOL[torch.bfloat16]


def test_chunked_path_covers_every_row(monkeypatch, rng):
    monkeypatch.setattr(_cpu, "CHUNK_BYTES", 64)  # several chunks, the last one short
    w = torch.randint(-127, 128, (37, 16), generator=rng, dtype=torch.int8)
    x = torch.randn(40, 16, generator=rng)
    assert rel_err(_cpu.int8_linear(x, w, None), x.double() @ w.double().T) < RTOL[torch.float32]


@pytest.mark.parametrize("offset", [0, 1, 8, 16])
def test_misaligned_weights_as_loaded_from_a_mapped_checkpoint(offset, rng):
    """int8pack crashes on weights that are not 16-byte aligned; such views come from mmap'd safetensors."""
    buffer = torch.randint(-127, 128, (offset + 48 * 32,), generator=rng, dtype=torch.int8)
    w = buffer[offset:].view(48, 32)
    x = torch.randn(2, 32, generator=rng).to(torch.bfloat16)
    assert rel_err(_cpu.int8_linear(x, w, None), x.double() @ w.double().T) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("parts", [2, 3])
def test_row_parallel_fp8_slices_reencode_like_the_whole(parts, rng):
    """Tensor parallelism slices an fp8 weight by columns (row-parallel layers); each slice's int8
    re-encoding must be the corresponding columns of the whole matrix's, so the shards' partial sums
    add up to the unsharded result."""
    W = torch.randn(24, 48, generator=rng)
    packed = zskernels.quantize_fp8_dense(W)
    x = torch.randn(3, 48, generator=rng).to(torch.bfloat16)
    whole_q, whole_scale = _cpu.fp8_rows_as_int8(packed["weight_fp8"], packed["weight_scale"], normalised=True)
    partial = []
    for cols in torch.arange(48).chunk(parts):
        shard = {"weight_fp8": packed["weight_fp8"][:, cols].contiguous(), "weight_scale": packed["weight_scale"]}
        q, scale = _cpu.fp8_rows_as_int8(shard["weight_fp8"], shard["weight_scale"], normalised=True)
        assert torch.equal(q, whole_q[:, cols]) and torch.equal(scale, whole_scale)
        partial.append(zskernels.fp8_linear(x[:, cols].contiguous(), shard).float())
    whole = zskernels.fp8_linear(x, packed).float()
    assert torch.allclose(sum(partial), whole, rtol=2e-2, atol=2e-2)  # bf16 outputs of each shard


def test_module_casts_keep_the_packed_bytes(rng):
    """Hugging Face idioms cast whole models: packed buffers keep their bytes, a changed bias is seen."""
    from zssvd.nn import PackedLowRankLinear

    U, V = factors(37, 23, 9, rng)
    for storage in ("remap", "fp8", "bf16"):
        module = PackedLowRankLinear.from_factors(U, V, torch.randn(37, generator=rng), storage=storage)
        before = {k: v.clone() for k, v in module.packed().items()}
        x = torch.randn(2, 23, generator=rng)
        module(x)  # builds the CPU plan for float32 x
        module.half().to(torch.bfloat16).float()
        for key, value in module.packed().items():
            bits = value.contiguous().reshape(-1).view(torch.uint8)
            assert value.dtype == before[key].dtype and torch.equal(bits, before[key].reshape(-1).view(torch.uint8))
        expected = x.double() @ module.dense_weight().double().T + module.bias.double()  # bias went through fp16
        assert rel_err(module(x), expected) < 1e-2


@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_int4_paths_match_float64(shape, dtype, m, rng):
    """int4 codes, scales and mins are exact inputs: only the activation dtype's error remains
    (bf16 also rounds int4pack's per-group scale and zero to bf16, within the bf16 tolerance)."""
    out, in_, k = shape
    U, V = factors(out, in_, k, rng)
    lowrank, dense = zskernels.pack_int4_lowrank(U, V, 32), zskernels.quantize_int4(U @ V.T, 32)
    x, bias = torch.randn(m, in_, generator=rng).to(dtype), torch.randn(out, generator=rng)
    u_hat, v_hat = zskernels.unpack_int4_lowrank(lowrank)
    y = zskernels.int4_lowrank_matmul(x, lowrank, bias)
    expected = (x.double() @ v_hat.double()) @ u_hat.double().T + bias.double()
    assert y.dtype == dtype and rel_err(y, expected) < RTOL[dtype]
    y = zskernels.int4_linear(x, dense)
    assert y.dtype == dtype and rel_err(y, x.double() @ zskernels.dequantize_int4(dense).double().T) < RTOL[dtype]


@pytest.mark.parametrize("offset", [1, 3, 8])
def test_int4pack_takes_misaligned_activations(offset, rng):
    packed = zskernels.quantize_int4(torch.randn(48, 64, generator=rng), 64)
    x = torch.randn(offset + 5 * 64, generator=rng).to(torch.bfloat16)[offset:].view(5, 64)
    expected = x.double() @ zskernels.dequantize_int4(packed).double().T
    assert rel_err(zskernels.int4_linear(x, packed), expected) < RTOL[torch.bfloat16]


# The two-plane integer route (_cpu._int8_planes_mm) for prefill-sized M on large weights.
PLANE_SHAPES = [(257, 300), (300, 520), (256, 256), (1536, 576)]  # odd, K % 16 != 0 (padded), bounds, SmolLM2's MLP


@pytest.mark.parametrize("m", [16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", PLANE_SHAPES, ids=shape_id)
def test_planes_route_adds_almost_nothing_to_the_dtypes_rounding(shape, dtype, m, rng, int8_route):
    """x is carried to 1/64516 of each row's absmax: the result is within 5% of the float64 product
    rounded once to the activation dtype, which is the best any path returning that dtype can do."""
    torch_routes_only(int8_route, dtype)
    n, k = shape
    w = torch.randint(-127, 128, (n, k), generator=rng, dtype=torch.int8)
    scale = torch.rand(n, generator=rng) * 0.01 + 1e-3
    x = (torch.randn(m, k, generator=rng) * torch.logspace(-2, 2, m)[:, None]).to(dtype)  # rows of every size
    prepared = _cpu.int8_rows(w, scale, dtype)
    assert _cpu.int8_path(m, n, k, True) == "planes"
    expected = x.double() @ (w.double() * prepared.scale.double()[:, None]).T
    y = _cpu.int8_apply(x, w, prepared)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, expected) <= 1.05 * rel_err(expected.to(dtype), expected)
    for row in range(m):  # no row drowned by another's scale
        assert rel_err(y[row], expected[row]) <= 1.05 * rel_err(expected[row].to(dtype), expected[row]) + 1e-6


def test_planes_route_keeps_non_finite_rows_to_themselves(rng, int8_route):
    """(The kernel, where bf16 takes it, keeps them to themselves as well: each output row is its own sums.)"""
    w = torch.randint(-127, 128, (300, 300), generator=rng, dtype=torch.int8)
    x = torch.randn(20, 300, generator=rng).to(torch.bfloat16)
    x[3, 5], x[7, 0] = float("inf"), float("nan")
    y = _cpu.int8_apply(x, w, _cpu.int8_rows(w, None, torch.bfloat16))
    assert not y[3].isfinite().all() and y[7].isnan().all()
    finite = [r for r in range(20) if r not in (3, 7)]
    assert rel_err(y[finite], x[finite].double() @ w.double().T) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 15, 16, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_remap_through_every_int8_route_matches_float64(shape, dtype, m, monkeypatch, rng, int8_route):
    """The planes route on small odd shapes too (bounds lowered): every GEMM of the op takes it from M = 16 on
    (the kernel instead, for bf16 where it runs)."""
    monkeypatch.setattr(_cpu, "PLANES_MIN_DIM", 1)
    out, in_, k = shape
    packed = zskernels.pack_remap(*factors(out, in_, k, rng), fmt="int8", tail_dtype=dtype)
    u_hat, v_hat = unpack_remap(packed)
    x, bias = torch.randn(m, in_, generator=rng).to(dtype), torch.randn(out, generator=rng)
    assert _cpu.int8_path(m, out, in_, True) == ("planes" if m >= 16 else "int8pack")
    y = zskernels.remap_matmul(x, packed, bias)
    expected = (x.double() @ v_hat.double()) @ u_hat.double().t() + bias.double()
    assert rel_err(y, expected) < remap_budget(packed, dtype)


def test_int8_routes_by_rows_and_shape():
    assert _cpu.int8_path(1, 1536, 576, True) == "int8pack"
    assert _cpu.int8_path(16, 1536, 576, True) == "planes"
    assert _cpu.int8_path(16, 64, 576, True) == "int8pack"   # a small weight: quantising x costs more
    assert _cpu.int8_path(17, 64, 576, True) == "chunked"
    assert _cpu.int8_path(64, 1536, 576, False) == "chunked"  # fp32 activations keep the exact float path


def _compiled_cases(rng):
    """(op, packed, in_features) for every op with a CPU path, odd shapes, with a bias-free call."""
    U, V = factors(37, 23, 9, rng)
    return {
        "fp8_linear": (zskernels.fp8_linear, zskernels.quantize_fp8_dense(U @ V.T)),
        "fp8_lowrank_matmul": (zskernels.fp8_lowrank_matmul, zskernels.pack_fp8_lowrank(U, V)),
        "remap_matmul": (zskernels.remap_matmul, zskernels.pack_remap(U, V, fmt="int8", tail_dtype=torch.bfloat16)),
        "int4_linear": (zskernels.int4_linear, zskernels.quantize_int4(U @ V.T, 32)),
        "int4_lowrank_matmul": (zskernels.int4_lowrank_matmul, zskernels.pack_int4_lowrank(U, V, 32)),
    }


@pytest.mark.parametrize("name", ["fp8_linear", "fp8_lowrank_matmul", "remap_matmul", "int4_linear",
                                  "int4_lowrank_matmul"])
def test_a_later_call_that_does_not_fit_the_plan_is_refused_in_one_line(name, rng):
    """Once an op's plan exists, a call checks only x's width and the bias against it (``_cpu.check_fits``);
    where they do not fit, the op's full check names the problem in one line."""
    op, packed = _compiled_cases(rng)[name]
    x = torch.randn(3, 23, generator=rng).to(torch.bfloat16)
    op(x, packed)  # makes the plan
    for bad in (lambda: op(torch.randn(3, 22).to(torch.bfloat16), packed),
                lambda: op(x, packed, torch.randn(36).to(torch.bfloat16))):
        with pytest.raises(ValueError) as err:
            bad()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["fp8_linear", "fp8_lowrank_matmul", "remap_matmul", "int4_linear",
                                  "int4_lowrank_matmul"])
def test_compiled_code_runs_the_same_cpu_path(name, dtype, rng):
    """torch.compile (fullgraph, dynamic rows) calls each CPU path as one opaque op: bit for bit the
    eager numbers (fp8's re-encoding included, which the reference does not do), and no re-encoding
    or re-planning per call (the plan cache still serves the compiled calls)."""
    op, packed = _compiled_cases(rng)[name]
    bias = torch.randn(37, generator=rng)
    torch._dynamo.reset()  # every case compiles the same lambda: start each below dynamo's recompile limit
    compiled = torch.compile(lambda x: op(x, packed, bias), fullgraph=True, dynamic=True)
    for m in (1, 5, 17):
        x = torch.randn(m, 23, generator=rng).to(dtype)
        eager = op(x, packed, bias)
        gc.collect()  # earlier tests' tensors in reference cycles would drop their entries during the count
        entries = _cpu.cache_entries()
        assert torch.equal(compiled(x), eager)
        assert torch.equal(compiled(x), eager)
        gc.collect()
        assert _cpu.cache_entries() == entries


@pytest.mark.parametrize("name", ["fp8_linear", "fp8_lowrank_matmul", "remap_matmul", "int4_linear",
                                  "int4_lowrank_matmul"])
def test_weights_made_under_inference_mode(name):
    """Tensors made under torch.inference_mode have no version counter: the plans are still built and found again
    (a moved tensor is still seen), and give the numbers of the same weights made outside it."""
    with torch.inference_mode():
        op, packed = _compiled_cases(torch.Generator().manual_seed(3))[name]
        x = torch.randn(3, 23, generator=torch.Generator().manual_seed(4)).bfloat16()
        first = op(x, packed)
        gc.collect()
        entries = _cpu.cache_entries()
        assert torch.equal(op(x, packed), first) and _cpu.cache_entries() == entries
    op, outside = _compiled_cases(torch.Generator().manual_seed(3))[name]
    assert torch.equal(op(x.clone(), outside), first)


def test_cache_bytes_of_an_fp8_plan(rng, int8_route):
    """fp8 rows re-encoded to int8 once: the plan keeps them (int8pack: 64 x 48 at K padded to 48 with bf16
    scales, and the cached re-encoding itself, 64 x 40, with float32 scales) or only the kernel's layout
    (64 x 40: it reads K in quads) and float32 scales, never both."""
    packed = zskernels.quantize_fp8_dense(torch.randn(64, 40, generator=rng))
    zskernels.fp8_linear(torch.randn(2, 40, generator=rng).to(torch.bfloat16), packed)
    if int8_route == "kernel":
        assert _cpu.derived_nbytes(packed.values()) == 64 * 40 + 4 * 64
    else:
        assert _cpu.derived_nbytes(packed.values()) == 64 * 48 + 2 * 64 + 64 * 40 + 4 * 64
