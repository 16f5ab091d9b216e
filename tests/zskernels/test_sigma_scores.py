"""Tests of zskernels.sigma_scores (zskernels/ops/scores): s_i = u_i^T H v_i.

Every result is compared with a float64 einsum of the same (already rounded) inputs, on odd
shapes that cross the interpreter's 16-wide blocks. Without CUDA the Triton kernels run in the
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1); with CUDA the same
tests run the real kernels, and the GPU-only tests at the end add large shapes,
torch.compile and CUDA-graph capture.
"""
import pytest
import torch

import zskernels
from zskernels import _triton, sigma_scores, sigma_scores_batched, sigma_scores_reference
from zskernels.ops.scores import kernels as ss

SHAPES = [(37, 29, 13), (5, 70, 5), (64, 48, 48), (17, 3, 1)]  # (m, n, k)
# Relative Frobenius error allowed against float64. 16-bit inputs: exact products, fp32 sums.
# fp32 inputs: by tensor-core mode (exact in the interpreter, which computes fp32 dots exactly).
TOL_16BIT = 1e-5
TOL_FP32 = {"ieee": 1e-5, "tf32x3": 1e-5, "bf16x3": 2e-4, "tf32": 3e-3}


def triton_device() -> str:
    """Where backend="triton" runs here: CUDA, else the interpreter on CPU; skip otherwise."""
    if not zskernels.triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if not zskernels.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    return "cpu"


def device_for(backend: str) -> str:
    return triton_device() if backend == "triton" else "cpu"


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Kernel outputs start as NaN, so any entry a kernel fails to write shows up."""
    monkeypatch.setattr(_triton, "POISON", True)


def rand(gen, rows, cols, dtype=torch.float32, device="cpu", layout="row"):
    """Fresh random rows x cols matrix: row-major, column-major ("col") or a strided slice."""
    shape = {"col": (cols, rows), "slice": (2 * rows, 3 * cols)}.get(layout, (rows, cols))
    t = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)  # view after the move
    if layout == "col":
        return t.t()
    return t[::2, ::3] if layout == "slice" else t  # a slice has no unit stride at all


def triple(gen, m, n, k, dtype=torch.float32, device="cpu", layouts=("row", "row", "row")):
    return tuple(rand(gen, r, c, dtype, device, lay) for (r, c), lay in zip(((m, k), (m, n), (n, k)), layouts))


def exact(U, H, V):
    """float64 scores of the given inputs, on the CPU."""
    return torch.einsum("ik,ij,jk->k", *(t.detach().cpu().double() for t in (U, H, V)))


def rel_err(s, ref):
    assert s.shape == ref.shape
    assert torch.isfinite(s).all(), "non-finite scores (unwritten output?)"
    return ((s.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def tolerance(dtype, precision=ss.DEFAULT_PRECISION):
    return TOL_FP32[precision] if dtype == torch.float32 else TOL_16BIT


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(rng, backend, dtype, shape):
    U, H, V = triple(rng, *shape, dtype=dtype, device=device_for(backend))
    s = sigma_scores(U, H, V, backend=backend)
    assert s.dtype == torch.float32 and s.device == U.device
    assert rel_err(s, exact(U, H, V)) < tolerance(dtype)


def test_bfloat16_inputs(rng):
    U, H, V = triple(rng, 37, 29, 13, dtype=torch.bfloat16, device=triton_device())
    assert rel_err(sigma_scores(U, H, V, backend="triton"), exact(U, H, V)) < TOL_16BIT


@pytest.mark.parametrize("precision", list(ss.PRECISIONS))
def test_precision_modes(rng, precision):
    """Each tensor-core mode for fp32 inputs; n = 300 spans many n-chunks."""
    U, H, V = triple(rng, 40, 300, 24, device=triton_device())
    H = H * 1e-3  # gradients are small; bf16 has fp32's exponent range, so the split still works
    err = rel_err(sigma_scores(U, H, V, backend="triton", precision=precision), exact(U, H, V))
    assert err < TOL_FP32[precision]


def test_mixed_dtypes(rng):
    """The pipeline's case: fp32 factors with a bf16 gradient (dot in fp32 then)."""
    dev = triton_device()
    U, H, V = triple(rng, 37, 29, 13, device=dev)
    H = H.to(torch.bfloat16)
    assert rel_err(sigma_scores(U, H, V, backend="triton"), exact(U, H, V)) < TOL_FP32[ss.DEFAULT_PRECISION]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layouts", [("col", "col", "col"), ("slice", "col", "slice"), ("row", "slice", "col")])
def test_non_contiguous(rng, backend, layouts):
    U, H, V = triple(rng, 37, 29, 13, device=device_for(backend), layouts=layouts)
    assert not (U.is_contiguous() and H.is_contiguous() and V.is_contiguous())
    assert rel_err(sigma_scores(U, H, V, backend=backend), exact(U, H, V)) < TOL_FP32[ss.DEFAULT_PRECISION]


def test_reference_chunks_and_float64(rng):
    """Odd chunk sizes cover the reference's block loop; float64 stays float64."""
    U, H, V = triple(rng, 37, 29, 13, dtype=torch.float64)
    s = sigma_scores_reference(U, H, V, chunk=7)
    assert s.dtype == torch.float64
    assert rel_err(s, exact(U, H, V)) < 1e-12
    assert sigma_scores(U, H, V).dtype == torch.float64  # "auto" sends float64 to torch


def test_deterministic(rng):
    U, H, V = triple(rng, 64, 48, 48, device=triton_device())
    first = sigma_scores(U, H, V, backend="triton")
    assert torch.equal(first, sigma_scores(U, H, V, backend="triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_empty_dimensions(backend, shape):
    m, n, k = shape
    dev = device_for(backend)
    U, H, V = torch.ones(m, k, device=dev), torch.ones(m, n, device=dev), torch.ones(n, k, device=dev)
    assert torch.equal(sigma_scores(U, H, V, backend=backend).cpu(), torch.zeros(k))


# ----------------------------------------------------------------------------------------------
# Batched
# ----------------------------------------------------------------------------------------------
def check_batched(items, backend, precision=ss.DEFAULT_PRECISION):
    out = sigma_scores_batched(items, backend=backend, precision=precision)
    assert len(out) == len(items)
    for (U, H, V), s in zip(items, out):
        ref = exact(U, H, V)
        if ref.numel() == 0 or ref.norm() == 0:
            assert torch.equal(s.cpu(), torch.zeros_like(s.cpu()))
        else:
            assert rel_err(s, ref) < tolerance(V.dtype, precision)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_matches_single(rng, backend, dtype):
    dev = device_for(backend)
    items = [triple(rng, *shape, dtype=dtype, device=dev) for shape in SHAPES]
    items.insert(2, triple(rng, 0, 4, 3, dtype=dtype, device=dev))  # nothing to compute: zeros
    out = check_batched(items, backend)
    for item, s in zip(items, out):
        single = sigma_scores(*item, backend=backend)
        assert torch.allclose(s, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layouts", [("col", "col", "col"), ("row", "col", "slice")])
def test_batched_layouts(rng, layouts):
    """Mixed layouts and strided slices in one role (the kernel's STRIDED path)."""
    dev = triton_device()
    items = [triple(rng, *shape, device=dev, layouts=layouts) for shape in SHAPES[:3]]
    items.append(triple(rng, 9, 11, 7, device=dev))
    check_batched(items, "triton")


def test_batched_column_major(rng):
    """Every operand column-major (e.g. transposed views): the kernel's COL_MAJOR path."""
    dev = triton_device()
    items = [triple(rng, *shape, device=dev, layouts=("col", "col", "col")) for shape in SHAPES]
    assert all(ss._layout(list(role)) == ss.COL_MAJOR for role in zip(*items))
    check_batched(items, "triton")


def test_batched_aligned(rng):
    """Sizes that are multiples of 16 take the kernel's aligned (vectorised) path."""
    dev = triton_device()
    items = [triple(rng, 32, 16, 16, device=dev), triple(rng, 16, 48, 32, device=dev, layouts=("row",) * 3)]
    assert all(ss._aligned(t, ss.ROW_MAJOR) for item in items for t in item)
    check_batched(items, "triton", precision="ieee")


def test_batched_empty_list():
    assert sigma_scores_batched([]) == []


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, message", [
    (((5, 3), (4, 6), (6, 3)), "U has 5 rows but H has 4"),
    (((4, 3), (4, 6), (5, 3)), "H has 6 columns but V has 5 rows"),
    (((4, 3), (4, 6), (6, 2)), "U has 3 columns but V has 2"),
    (((4, 3, 1), (4, 6), (6, 3)), "U must be 2-D"),
])
def test_shape_errors(shapes, message):
    U, H, V = (torch.ones(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        sigma_scores(U, H, V)


def test_dtype_errors():
    U, H, V = torch.ones(4, 3), torch.ones(4, 6, dtype=torch.int32), torch.ones(6, 3)
    with pytest.raises(TypeError, match="H has dtype torch.int32"):
        sigma_scores(U, H, V)
    U64, H64, V64 = (torch.ones(s, dtype=torch.float64) for s in ((4, 3), (4, 6), (6, 3)))
    triton_device()
    with pytest.raises(TypeError, match="does not take float64"):
        sigma_scores(U64, H64, V64, backend="triton")


def test_device_and_argument_errors():
    U, H, V = torch.ones(4, 3), torch.ones(4, 6), torch.ones(6, 3, device="meta")
    with pytest.raises(ValueError, match="one device"):
        sigma_scores(U, H, V)
    U, H, V = torch.ones(4, 3), torch.ones(4, 6), torch.ones(6, 3)
    with pytest.raises(ValueError, match="precision must be one of"):
        sigma_scores(U, H, V, precision="fp8")
    with pytest.raises(ValueError, match="backend must be one of"):
        sigma_scores(U, H, V, backend="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    if not zskernels.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    U, H, V = torch.ones(4, 3), torch.ones(4, 6), torch.ones(6, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sigma_scores(U, H, V, backend="triton")


def test_batched_errors():
    good = (torch.ones(4, 3), torch.ones(4, 6), torch.ones(6, 3))
    with pytest.raises(TypeError, match="every H must share one dtype"):
        sigma_scores_batched([good, (good[0], good[1].half(), good[2])])
    with pytest.raises(ValueError, match="one device"):
        sigma_scores_batched([good, (good[0], good[1], good[2].to("meta"))])
    with pytest.raises(ValueError, match="item 1: H has 6 columns but V has 5 rows"):
        sigma_scores_batched([good, (good[0], good[1], torch.ones(5, 3))])
    with pytest.raises(ValueError, match="item 0 must be a \\(U, H, V\\) triple"):
        sigma_scores_batched([good[:2]])


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(4096, 4096, 1024), (11008, 4096, 333)])
@pytest.mark.parametrize("precision", ["bf16x3", "tf32x3", "ieee"])
def test_gpu_large_fp32(m, n, k, precision):
    gen = torch.Generator(device="cuda").manual_seed(0)
    U, H, V = (torch.randn(r, c, device="cuda", generator=gen) for r, c in ((m, k), (m, n), (n, k)))
    ref = (U.double() * (H.double() @ V.double())).sum(0)
    s = sigma_scores(U, H, V, backend="triton", precision=precision)
    assert rel_err(s, ref.cpu()) < TOL_FP32[precision]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_16bit_and_transposed(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    U = torch.randn(2048, 4096, device="cuda", generator=gen).to(dtype)
    H = torch.randn(4096, 4096, device="cuda", generator=gen).to(dtype)
    V = torch.randn(2048, 4096, device="cuda", generator=gen).to(dtype).t()  # n x k, column-major
    U = U.t()  # m x k, column-major
    ref = (U.double() * (H.double() @ V.double())).sum(0)
    assert rel_err(sigma_scores(U, H, V, backend="triton"), ref.cpu()) < 1e-5


@pytest.mark.gpu
def test_gpu_batched_large():
    gen = torch.Generator(device="cuda").manual_seed(2)
    shapes = [(4096, 4096, 2048), (11008, 4096, 1000), (4096, 11008, 4096)]
    items = [tuple(torch.randn(r, c, device="cuda", generator=gen) for r, c in ((m, k), (m, n), (n, k)))
             for m, n, k in shapes]
    for (U, H, V), s in zip(items, sigma_scores_batched(items)):
        ref = (U.double() * (H.double() @ V.double())).sum(0)
        assert rel_err(s, ref.cpu()) < TOL_FP32[ss.DEFAULT_PRECISION]


@pytest.mark.gpu
def test_gpu_extra_memory_is_small():
    """No m x k intermediate: the only extra memory is the (m/BM) x k partial buffer."""
    m = n = k = 4096
    U, H, V = (torch.randn(r, c, device="cuda") for r, c in ((m, k), (m, n), (n, k)))
    sigma_scores(U, H, V)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sigma_scores(U, H, V)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4 * 2**20  # H @ V alone would be 64 MiB


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    U, H, V = (torch.randn(r, c, device="cuda") for r, c in ((300, 40), (300, 200), (200, 40)))

    @torch.compile(fullgraph=True)
    def scaled_scores(U, H, V, sigma):
        return -sigma * sigma_scores(U, H, V)

    sigma = torch.rand(40, device="cuda")
    out = scaled_scores(U, H, V, sigma)
    assert torch.allclose(out, -sigma * sigma_scores(U, H, V), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_batched_under_torch_compile():
    items = [tuple(torch.randn(r, c, device="cuda") for r, c in ((m, k), (m, n), (n, k)))
             for m, n, k in ((64, 48, 32), (37, 29, 13))]

    @torch.compile(fullgraph=True)
    def scores(items):
        return sigma_scores_batched(items)

    for got, want in zip(scores(items), sigma_scores_batched(items)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    U, H, V = (torch.randn(r, c, device="cuda") for r, c in ((1000, 300), (1000, 500), (500, 300)))
    want = sigma_scores(U, H, V)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sigma_scores(U, H, V)
    for t in (U, H, V):
        t.copy_(torch.randn_like(t))  # new values, same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sigma_scores(U, H, V))
    assert not torch.equal(out, want)
