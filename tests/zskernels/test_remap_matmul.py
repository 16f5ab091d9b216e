"""Tests for zskernels.remap_matmul (zskernels/ops/remap) and its storage (zskernels/formats/remap.py).

Two different things are checked separately:
* the KERNEL: y against a float64 computation from the dequantised factors (tight tolerance);
* the QUANTISER: dequantised factors against the original float64 factors (per-element bounds
  of each 8-bit format, and a loose relative tolerance for realistic factors).
Triton tests run in the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU); the "cpu" entry of configs/remap_matmul.json uses tiny tiles and splits
the reduction for M <= 16, so both the split-K (decode) and the plain (prefill) paths run.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from zskernels import _configs, _device, _triton, remap_matmul, remap_matmul_reference
from zskernels._backend import triton_available
from zskernels._configs import pick_config
from zskernels._device import interpreting
from zskernels.formats.remap import FORMATS, PACKED_KEYS, pack_remap, remap_nbytes, unpack_remap
from zskernels.ops.remap import kernels as rm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not interpreting()),
    reason="needs triton (and TRITON_INTERPRET=1 without a GPU)")

SHAPES = [(37, 23, 9), (23, 37, 9), (48, 48, 48), (37, 23, 1)]  # (out, in, k): U big, V big, k = s, k = 1
shape_id = "x".join
KERNEL_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    monkeypatch.setattr(_triton, "POISON", True)


def balanced_factors(out, in_, k, gen, decay=0.5):
    """U = P_k sqrt(S), V = Q_k sqrt(S) for a random W with sigma_i ~ i^-decay (float64)."""
    rank = min(out, in_)
    p, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(in_, rank, generator=gen, dtype=torch.float64))
    root = torch.arange(1, k + 1, dtype=torch.float64).pow(-decay / 2)
    return p[:, :k] * root, q[:, :k] * root


def rel_err(a, b):
    return float(torch.linalg.norm((a.double() - b.double()).flatten()) / torch.linalg.norm(b.double().flatten()))


def expected(x, packed, bias):
    u_hat, v_hat = unpack_remap(packed)
    y = (x.double() @ v_hat.double()) @ u_hat.double().t()
    return y if bias is None else y + bias.double()


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 17], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(map(str, s)))
def test_kernel_matches_float64(shape, fmt, dtype, m, with_bias, backend, rng):
    out, in_, k = shape
    packed = pack_remap(*balanced_factors(out, in_, k, rng), fmt=fmt)
    packed = {key: t.to(DEVICE) for key, t in packed.items()}
    bias = torch.randn(out, generator=rng).to(DEVICE) if with_bias else None
    x = torch.randn(m, in_, generator=rng).to(DEVICE, dtype)
    y = remap_matmul(x, packed, bias, backend=backend)
    assert y.shape == (m, out) and y.dtype == dtype
    assert rel_err(y, expected(x, packed, bias)) < KERNEL_RTOL[dtype]


@needs_triton
def test_both_paths_are_exercised():
    """The interpreter config splits the reduction for M <= 16 and not above (see module doc)."""
    assert pick_config("remap_matmul", 3, torch.device("cpu"))["target_programs"] > 0
    assert pick_config("remap_matmul", 17, torch.device("cpu"))["target_programs"] == 0
    assert rm._split_plan(1, 3, 64) == (3, 1)
    assert rm._split_plan(2, 5, 64) == (5, 1)
    assert rm._split_plan(8, 20, 24) == (3, 7)  # 3 splits of 7, 7, 6 steps: none empty
    assert rm._split_plan(1, 7, 4) == (4, 2)  # the straddling case of test_split_k_edge_cases
    assert rm._split_plan(300, 20, 264) == (1, 20)


@needs_triton
@pytest.mark.parametrize("m", [5, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", [(40, 90, 9), (90, 40, 33)], ids=lambda s: shape_id(map(str, s)))
@pytest.mark.parametrize("target", [4, 64], ids=["straddle", "many"])
def test_split_k_edge_cases(target, shape, m, rng):
    """Splits that straddle V's head/tail boundary (40 x 90: head steps 0-2, tail 3-6, two
    steps per split), several row tiles with a partial GROUP_M group, odd M."""
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1,
           "target_programs": target}
    out, in_, k = shape
    packed = {key: t.to(DEVICE) for key, t in pack_remap(*balanced_factors(out, in_, k, rng)).items()}
    bias = torch.randn(out, generator=rng).to(DEVICE)
    x = torch.randn(m, in_, generator=rng).to(DEVICE, torch.float32)
    with _configs.use_config("remap_matmul", cfg):
        assert rel_err(remap_matmul(x, packed, bias, backend="triton"), expected(x, packed, bias)) < 1e-5


@needs_triton
@pytest.mark.parametrize("m", [1, 17], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fp8_codes_decoded_without_native_fp8(monkeypatch, dtype, shape, m, rng):
    """Before sm_89 (A100) the e4m3 heads load as uint8 codes and are decoded in the kernel.

    The decoded tile is the values times 2^-8 and the scales take the 2^8 back, both exact, so the
    result equals the native-fp8 path bit for bit, on the split-K and plain paths alike.
    """
    out, in_, k = shape
    packed = {key: t.to(DEVICE) for key, t in pack_remap(*balanced_factors(out, in_, k, rng), fmt="fp8").items()}
    x = torch.randn(m, in_, generator=rng).to(DEVICE, dtype)
    monkeypatch.setattr(_device, "native_fp8", lambda device: True)
    native = remap_matmul(x, packed, backend="triton")
    monkeypatch.setattr(_device, "native_fp8", lambda device: False)
    decoded = remap_matmul(x, packed, backend="triton")
    assert torch.equal(decoded, native)
    assert rel_err(decoded, expected(x, packed, None)) < KERNEL_RTOL[dtype]


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batched_leading_dims(backend, rng):
    out, in_, k = 37, 23, 9
    packed = {key: t.to(DEVICE) for key, t in pack_remap(*balanced_factors(out, in_, k, rng)).items()}
    x = torch.randn(2, 3, in_, generator=rng).to(DEVICE, torch.float16)
    bias = torch.randn(out, generator=rng).to(DEVICE, torch.float16)
    y = remap_matmul(x, packed, bias, backend=backend)
    assert y.shape == (2, 3, out)
    assert rel_err(y, expected(x.reshape(6, in_), packed, bias).reshape(2, 3, out)) < KERNEL_RTOL[torch.float16]
    # also a non-contiguous x
    xt = torch.randn(in_, 5, generator=rng).to(DEVICE, torch.float32).t()
    assert rel_err(remap_matmul(xt, packed, backend=backend), expected(xt, packed, None)) < 1e-5


@needs_triton
def test_bf16_tail_and_zero_tokens(rng):
    out, in_, k = 23, 37, 9
    packed = pack_remap(*balanced_factors(out, in_, k, rng), fmt="int8", tail_dtype=torch.bfloat16)
    packed = {key: t.to(DEVICE) for key, t in packed.items()}
    assert packed["v_tail"].dtype == torch.bfloat16
    x = torch.randn(3, in_, generator=rng).to(DEVICE, torch.float16)
    assert rel_err(remap_matmul(x, packed, backend="triton"), expected(x, packed, None)) < 2e-3
    empty = remap_matmul(x[:0], packed, backend="triton")
    assert empty.shape == (0, out)


# ----------------------------------------------------------------------------------------------
# Quantiser and storage
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: shape_id(map(str, s)))
def test_quantiser_error_bounds(shape, fmt, rng):
    out, in_, k = shape
    s = min(out, in_)
    U, V = balanced_factors(out, in_, k, rng)
    packed = pack_remap(U, V, fmt=fmt)
    u_hat, v_hat = unpack_remap(packed)
    assert u_hat.dtype == v_hat.dtype == torch.float32
    assert u_hat.shape == (out, k) and v_hat.shape == (in_, k)
    for f, f_hat, scale in ((U, u_hat, packed["u_scale"]), (V, v_hat, packed["v_scale"])):
        err = (f_hat.double() - f)[:s].abs()
        sc = scale.double()[None, :]
        if fmt == "int8":  # round to nearest on a grid of step `scale`
            bound = 0.5 * sc
        else:  # e4m3: half a unit in the last place, 2^-4 relative (2^-10 * scale among subnormals)
            bound = torch.maximum(f[:s].abs() * 2.0**-4, 2.0**-10 * sc)
        assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
        tail = (f_hat.double() - f)[s:]
        assert tail.numel() == 0 or float(tail.abs().max()) <= float(f[s:].abs().max()) * 2.0**-11
    loose = {"int8": 0.02, "fp8": 0.06}[fmt]
    assert rel_err(u_hat @ v_hat.t(), U @ V.t()) < loose


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(map(str, s)))
def test_layout_and_byte_count(shape, rng):
    out, in_, k = shape
    s, big = min(out, in_), max(out, in_)
    packed = pack_remap(*balanced_factors(out, in_, k, rng))
    assert set(packed) == set(PACKED_KEYS)
    assert packed["v_q"].shape == (k, s) and packed["u_q"].shape == (s, k)
    assert packed["v_tail"].shape == (k, in_ - s) and packed["u_tail"].shape == (out - s, k)
    assert all(t.is_contiguous() for t in packed.values())
    sizes = {key: t.numel() * t.element_size() for key, t in packed.items()}
    nbytes = remap_nbytes(out, in_, k)
    assert nbytes["payload"] == 2 * k * big == sum(v for key, v in sizes.items() if "scale" not in key)
    assert nbytes["scales"] == sizes["u_scale"] + sizes["v_scale"] == 8 * k
    assert nbytes["total"] == sum(sizes.values())


def test_zero_component_is_exact(rng):
    U, V = balanced_factors(23, 37, 5, rng)
    U[:, 2] = 0.0
    u_hat, v_hat = unpack_remap(pack_remap(U, V))
    assert bool((u_hat[:, 2] == 0).all()) and bool(torch.isfinite(v_hat).all())


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_safetensors_round_trip(tmp_path, backend, rng):
    out, in_, k = 23, 37, 9
    packed = {key: t.to(DEVICE) for key, t in pack_remap(*balanced_factors(out, in_, k, rng)).items()}
    path = tmp_path / "remap.safetensors"
    save_file({key: t.cpu() for key, t in packed.items()}, str(path))
    loaded = {key: t.to(DEVICE) for key, t in load_file(str(path)).items()}
    assert all(torch.equal(loaded[key].flatten().view(torch.uint8), packed[key].flatten().view(torch.uint8))
               for key in packed)
    x = torch.randn(3, in_, generator=rng).to(DEVICE, torch.float16)
    assert torch.equal(remap_matmul(x, loaded, backend=backend), remap_matmul(x, packed, backend=backend))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_pack_errors(rng):
    U, V = torch.randn(8, 4, generator=rng), torch.randn(6, 4, generator=rng)
    with pytest.raises(ValueError, match="rank k=7"):
        pack_remap(torch.randn(8, 7), torch.randn(6, 7))
    with pytest.raises(ValueError, match="2-D"):
        pack_remap(U[:, 0], V)
    with pytest.raises(ValueError, match="same number of columns"):
        pack_remap(U, V[:, :3])
    with pytest.raises(TypeError, match="floating"):
        pack_remap(U.to(torch.int32), V)
    bad = V.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pack_remap(U, bad)
    with pytest.raises(ValueError, match="fmt"):
        pack_remap(U, V, fmt="int4")
    with pytest.raises(ValueError, match="tail_dtype"):
        pack_remap(U, V, tail_dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        pack_remap(U * 1e5, V)  # U's tail rows overflow fp16
    with pytest.raises(ValueError, match="k <= min"):
        remap_nbytes(8, 6, 7)


def test_call_errors(rng):
    packed = pack_remap(torch.randn(8, 4, generator=rng), torch.randn(6, 4, generator=rng))
    x = torch.randn(2, 6, generator=rng)
    with pytest.raises(ValueError, match="in_features = 6"):
        remap_matmul(torch.randn(2, 5), packed)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        remap_matmul(x.to(torch.int32), packed)
    with pytest.raises(ValueError, match=r"need \(8,\)"):
        remap_matmul(x, packed, torch.randn(7))
    with pytest.raises(ValueError, match="lacks"):
        remap_matmul(x, {k: v for k, v in packed.items() if k != "u_scale"})
    with pytest.raises(ValueError, match="malformed"):
        remap_matmul(x, {**packed, "v_scale": packed["v_scale"].double()})
    with pytest.raises(ValueError, match="backend"):
        remap_matmul(x, packed, backend="cuda")
    with pytest.raises(TypeError, match="packed"):
        remap_matmul_reference(x, [packed])


# ----------------------------------------------------------------------------------------------
# GPU only: real tile sizes, bf16, determinism, torch.compile and CUDA graphs
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1000, 520, 208), (520, 1000, 208), (512, 512, 512)], ids=str)
def test_gpu_paths(shape, fmt):
    gen = torch.Generator().manual_seed(0)
    out, in_, k = shape
    packed = {key: t.cuda() for key, t in pack_remap(*balanced_factors(out, in_, k, gen), fmt=fmt).items()}
    bias = torch.randn(out, generator=gen).cuda()
    for m in (1, 5, 16, 64, 200, 700):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(m, in_, generator=gen).to("cuda", dtype)
            y = remap_matmul(x, packed, bias, backend="triton")
            tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]  # fp32: ieee dots
            assert rel_err(y, expected(x, packed, bias)) < tol, (m, dtype)
            assert torch.equal(y, remap_matmul(x, packed, bias, backend="triton")), "not deterministic"


@pytest.mark.gpu
def test_gpu_compile_and_graph():
    gen = torch.Generator().manual_seed(0)
    packed = {key: t.cuda() for key, t in pack_remap(*balanced_factors(1000, 520, 208, gen)).items()}
    x = torch.randn(4, 520, generator=gen).to("cuda", torch.float16)
    want = remap_matmul(x, packed, backend="triton")
    compiled = torch.compile(lambda inp: remap_matmul(inp, packed, backend="triton"), fullgraph=True)
    assert torch.equal(compiled(x), want)
    static_y = remap_matmul(x, packed, backend="triton")  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = remap_matmul(x, packed, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, want)
