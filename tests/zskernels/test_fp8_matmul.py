"""Tests of the fp8 ops (zskernels/ops/fp8) and their storage (zskernels/formats/fp8.py):
fp8 (e4m3) quantisation, the fused-dequantisation kernels, storage.

Kernel outputs are compared with float64 products of the *dequantised* weights (tight: checks the
kernel), the dequantised weights with the originals (loose: checks the quantiser). Without CUDA the
Triton kernels run in the interpreter on tiny odd shapes; every kernel path (GEMV, small-tile dot,
split-K, prefill GEMM, native fp8 and uint8 bit decoding) is forced in turn through the config hook.
"""
from types import SimpleNamespace

import pytest
import torch

import zskernels as zk
from zskernels import _configs, _device, _triton
from zskernels._backend import triton_available
from zskernels.ops.fp8 import kernels as fm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton interpreter (see conftest)
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}  # relative Frobenius error
E4M3_HALF_STEP = 2.0 ** -4  # e4m3 has 3 mantissa bits: rounding error <= 2^-4 relative (normals)

# Kernel paths, forced through _configs.use_config. Tiny BLOCK_K so the tiny K still takes several steps.
PATHS = {
    "gemv": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=16, SPLIT_K=1),
    "gemv-splitk": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=16, SPLIT_K=2),
    "dot": dict(path="decode", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1),
    "dot-splitk": dict(path="decode", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=3),
    "prefill": dict(path="prefill", USE_DOT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2),
}
# (out, in, k, x shape without the last dim, x dtype, bias): M = 1, 3, 17, odd sizes, batch dims.
CASES = [
    (37, 23, 9, (1,), torch.float16, True),
    (23, 37, 1, (3,), torch.float32, False),
    (37, 23, 9, (17,), torch.float16, False),
    (23, 37, 40, (1, 3), torch.float16, True),  # k > 2 blocks: stage 2 splits too
    (37, 23, 1, (17,), torch.float32, True),
    (1, 37, 5, (1,), torch.float16, True),  # N = 1, odd k below one block, K = 37 not a multiple of BLOCK_K
]


def case_id(case) -> str:
    out_f, in_f, k, lead, dtype, with_bias = case
    return f"{out_f}x{in_f}k{k}-x{'x'.join(map(str, lead))}-{str(dtype)[6:]}{'-bias' if with_bias else ''}"


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _problem(gen, out_f, in_f, k, lead, dtype, with_bias, form):
    """(x, packed, bias, float64 reference from the dequantised weights), on DEVICE."""
    x = _rand(gen, *lead, in_f, dtype=dtype)
    bias = _rand(gen, out_f) if with_bias else None
    if form == "dense":
        packed = zk.quantize_fp8_dense(_rand(gen, out_f, in_f))
        ref = x.double() @ zk.dequantize_fp8(packed).double().T
    else:
        packed = zk.pack_fp8_lowrank(_rand(gen, out_f, k), _rand(gen, in_f, k))
        u_hat, v_hat = zk.dequantize_fp8(packed)
        ref = (x.double() @ v_hat.double()) @ u_hat.double().T
    if bias is not None:
        ref = ref + bias.double()
    move = (lambda t: t.to(DEVICE)) if DEVICE != "cpu" else (lambda t: t)
    return move(x), {n: move(t) for n, t in packed.items()}, None if bias is None else move(bias), move(ref)


def _run(form, x, packed, bias, backend="triton"):
    op = zk.fp8_linear if form == "dense" else zk.fp8_lowrank_matmul
    return op(x, packed, bias, backend=backend)


def _force(monkeypatch, cfg: dict):
    full = dict(num_warps=4, num_stages=2, programs_per_sm=2, max_split=8, **cfg)
    monkeypatch.setitem(_configs._FORCED, "fp8_matmul", full)  # what _configs.use_config does




# ---------------------------------------------------------------------------------------------
# Kernels against float64
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_float64(form, path, case, monkeypatch, rng, poison_empty):
    out_f, in_f, k, lead, dtype, with_bias = case
    x, packed, bias, ref = _problem(rng, out_f, in_f, k, lead, dtype, with_bias, form)
    _force(monkeypatch, PATHS[path])
    y = _run(form, x, packed, bias)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("path", ["gemv-splitk", "dot", "prefill"])
def test_kernel_without_native_fp8(form, path, monkeypatch, rng, poison_empty):
    """The pre-sm_89 path: weights loaded as uint8 and decoded arithmetically in the kernel."""
    monkeypatch.setattr(_device, "native_fp8", lambda device: False)
    _force(monkeypatch, PATHS[path])
    x, packed, bias, ref = _problem(rng, 37, 23, 9, (3,), torch.float16, True, form)
    y = _run(form, x, packed, bias)
    assert _rel_err(y, ref) < TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("bucket", range(5), ids=lambda b: f"bucket{b}")
def test_every_shipped_config_bucket(bucket, form, rng):
    """Each bucket of configs/fp8_matmul.json runs correctly (both forms), whatever M picks it."""
    buckets = _configs.table("fp8_matmul")["default"]
    assert len(buckets) == 5
    cfg = {k: v for k, v in buckets[bucket].items() if k != "max_m"}
    x, packed, bias, ref = _problem(rng, 37, 23, 9, (3,), torch.float16, True, form)
    with _configs.use_config("fp8_matmul", cfg):
        assert _rel_err(_run(form, x, packed, bias), ref) < TOL[torch.float16]


@needs_triton
def test_e4m3_bit_decoder_all_256_codes():
    bits = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    decoded = fm._decode_e4m3_bits(bits).cpu()
    expected = bits.cpu().view(torch.float8_e4m3fn).float()
    nan = expected.isnan()
    assert nan.sum() == 2 and torch.equal(decoded.isnan(), nan)
    assert torch.equal(decoded[~nan], expected[~nan])  # bit-exact, signed zeros and subnormals included
    assert torch.equal(decoded[~nan].signbit(), expected[~nan].signbit())


@needs_triton
def test_ops_are_registered_with_torch_library(rng):
    x, packed, bias, _ = _problem(rng, 37, 23, 9, (3,), torch.float32, True, "lowrank")
    _run("lowrank", x, packed, bias)
    assert hasattr(torch.ops.zskernels, "fp8_linear") and hasattr(torch.ops.zskernels, "fp8_lowrank_matmul")


@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_torch_backend_is_the_reference(form, rng):
    x, packed, bias, ref = _problem(rng, 37, 23, 9, (2, 3), torch.float16, True, form)
    reference = zk.fp8_linear_reference if form == "dense" else zk.fp8_lowrank_matmul_reference
    y = _run(form, x, packed, bias, backend="torch")
    assert torch.equal(y, reference(x, packed, bias))
    assert _rel_err(y, ref) < TOL[torch.float16]
    if DEVICE == "cpu":  # auto on CPU: the int8 re-encoded path (tests/zskernels/test_cpu_paths.py), close to it
        assert _rel_err(_run(form, x, packed, bias, backend="auto"), ref) < 4 * TOL[torch.float16] + 0.02


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_batch_and_rank_zero(backend, rng):
    x, packed, bias, _ = _problem(rng, 37, 23, 9, (3,), torch.float32, True, "lowrank")
    assert _run("lowrank", x[:0], packed, bias, backend).shape == (0, 37)
    zero_rank = zk.pack_fp8_lowrank(torch.randn(37, 0), torch.randn(23, 0))
    zero_rank = {n: t.to(x.device) for n, t in zero_rank.items()}
    y = _run("lowrank", x, zero_rank, bias, backend)
    assert torch.equal(y, bias.expand(3, 37))


@needs_triton
@pytest.mark.parametrize("path", ["gemv-splitk", "dot-splitk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_lowrank_split_k_sums_once_in_stage_1(path, dtype, monkeypatch, rng, poison_empty, record_launches,
                                              check_split):
    """Decode split-K of form (b): stage 1's last split of each tile sums the partials, so stage 2
    reads one t (M x k, x's dtype) and the result does not depend on how K was split."""
    x, packed, bias, ref = _problem(rng, 37, 41, 20, (3,), dtype, True, "lowrank")  # K = 41: a partial block
    results = {}
    for split in (1, 2, 3):
        _force(monkeypatch, {**PATHS[path], "SPLIT_K": split})
        seen = record_launches(fm)
        results[split] = _run("lowrank", x, packed, bias)
        assert [la["kernel"] for la in seen] == [fm._matmul_kernel] * 2  # two launches, no reduction kernel
        stage1, stage2 = seen
        check_split(stage1, split)
        t = stage2["args"]["a_ptr"]
        assert t.shape == (3, 20) and t.dtype == dtype and t is stage1["args"]["out_ptr"]
        _, v_hat = zk.dequantize_fp8(packed)
        t_ref = (x.double() @ v_hat.double()) * packed["u_scale"].double() * fm.FOLD  # what stage 1 folds in
        assert _rel_err(t, t_ref) < TOL[dtype]
        assert _rel_err(results[split], ref) < TOL[dtype]
    # the splits differ only in the fp32 order of the partial sums
    assert _rel_err(results[2], results[1].double()) < TOL[dtype] / 4
    assert _rel_err(results[3], results[1].double()) < TOL[dtype] / 4


@needs_triton
@pytest.mark.parametrize("path", ["gemv-splitk", "dot-splitk"])
def test_dense_split_k_sums_in_one_launch(path, monkeypatch, rng, poison_empty, record_launches, check_split):
    """Decode split-K of form (a): the last split of each tile sums the partials and adds the bias
    inside the one launch (no reduction kernel); the result does not depend on how K was split."""
    x, packed, bias, ref = _problem(rng, 37, 41, None, (3,), torch.float32, True, "dense")
    results = {}
    for split in (1, 2, 3):
        _force(monkeypatch, {**PATHS[path], "SPLIT_K": split})
        seen = record_launches(fm)
        results[split] = _run("dense", x, packed, bias)
        assert [la["kernel"] for la in seen] == [fm._matmul_kernel]
        (la,) = seen
        check_split(la, split)
        assert la["args"]["HAS_BIAS"]
        assert _rel_err(results[split], ref) < TOL[torch.float32]
    assert _rel_err(results[3], results[1].double()) < TOL[torch.float32] / 4


@needs_triton
@pytest.mark.parametrize("path", ["gemv-splitk", "dot-splitk"])
def test_split_k_workspace_and_counters_across_calls(path, monkeypatch, rng, poison_empty, split_calls_repeat):
    """Consecutive calls (another shape in between) give bit-identical results (``split_calls_repeat``)."""
    _force(monkeypatch, PATHS[path])
    a = _problem(rng, 37, 41, 20, (3,), torch.float16, True, "lowrank")
    b = _problem(rng, 23, 50, 9, (1,), torch.float16, False, "lowrank")
    other = split_calls_repeat(fm, lambda: _run("lowrank", *a[:3]), lambda: _run("lowrank", *b[:3]))
    assert _rel_err(other, b[3]) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------
# Host-side dispatch
# ---------------------------------------------------------------------------------------------
def test_token_count_dispatch():
    cpu = torch.device("cpu")
    paths = {m: fm._choose_config(m, cpu)["path"] for m in (1, 4, 16, 64, 65, 256, 2048, 10**7)}
    assert paths == {1: "decode", 4: "decode", 16: "decode", 64: "decode",
                     65: "prefill", 256: "prefill", 2048: "prefill", 10**7: "prefill"}
    assert not fm._choose_config(1, cpu)["USE_DOT"] and fm._choose_config(2, cpu)["USE_DOT"]


def test_split_k_fills_the_gpu_and_covers_k(monkeypatch):
    monkeypatch.setattr(_device, "num_sms", lambda device: 132)
    cfg = fm._choose_config(16, torch.device("cpu"))  # BLOCK_N 16, BLOCK_K 256
    for n, k in [(1632, 4096), (2384, 11008), (4096, 1632), (11008, 4096), (37, 23)]:
        tiles = -(-n // cfg["BLOCK_N"])
        splits, per_split = _triton.split_k(cfg, tiles, k, torch.device("cpu"))
        assert per_split % cfg["BLOCK_K"] == 0 and (splits - 1) * per_split < k <= splits * per_split
        assert tiles >= 132 or splits > 1 or k <= cfg["BLOCK_K"]
    assert _triton.split_k(fm._choose_config(2048, torch.device("cpu")), 4, 4096, torch.device("cpu"))[0] == 1


def test_pipeline_depth_fits_shared_memory(monkeypatch):
    cfg = fm._choose_config(16, torch.device("cpu"))  # 16 x 16 tiles, BLOCK_K 256, 4 stages
    fake_a = lambda size: SimpleNamespace(  # noqa: E731
        device=torch.device("cuda"), shape=(16, 4096), element_size=lambda: size)
    # (stages - 1) x (A tile 16 x 256 x size + W tile 4 KiB) + 16 KiB of converted copies
    for smem, size, stages in [(227 * 1024, 4, 4), (99 * 1024, 4, 4), (99 * 1024, 2, 4),
                               (48 * 1024, 2, 3), (48 * 1024, 4, 2), (20 * 1024, 4, 1)]:
        props = SimpleNamespace(shared_memory_per_block_optin=smem)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, p=props: p)
        assert fm._num_stages(cfg, 16, fake_a(size)) == stages


def test_native_fp8_needs_compute_capability_8_9(monkeypatch):
    assert _device.native_fp8(torch.device("cpu"))  # the interpreter loads fp8 directly
    for capability, native in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert _device.native_fp8(torch.device("cuda")) is native


# ---------------------------------------------------------------------------------------------
# Quantiser, storage, errors
# ---------------------------------------------------------------------------------------------
def _check_rows_quantised(orig: torch.Tensor, payload: torch.Tensor, scale: torch.Tensor) -> None:
    """Per-row scales: e4m3 rounding bound elementwise, full fp8 range used, zero rows exact."""
    orig = orig.float()
    deq = payload.float() * scale[:, None]
    # normals: <= 2^-4 relative; subnormals (below 2^-6 * scale): <= half their step 2^-9 * scale
    bound = E4M3_HALF_STEP * orig.abs() + 2.0 ** -10 * scale[:, None]
    assert ((deq - orig).abs() <= bound * (1 + 1e-6)).all()
    amax = payload.float().abs().amax(dim=1)
    nonzero = orig.abs().amax(dim=1) > 0
    assert torch.equal(amax[nonzero], torch.full_like(amax[nonzero], 448.0))
    assert (scale[~nonzero] == 1).all() and (deq[~nonzero] == 0).all()
    assert (deq - orig).norm() <= E4M3_HALF_STEP * orig.norm()  # the loose, global view


def test_quantize_dense(rng):
    W = _rand(rng, 37, 23) * torch.logspace(-3, 2, 23)  # columns over five decades
    W[5] = 0.0
    packed = zk.quantize_fp8_dense(W.double())
    assert set(packed) == {"weight_fp8", "weight_scale"}
    assert packed["weight_fp8"].dtype == torch.float8_e4m3fn and packed["weight_fp8"].shape == (37, 23)
    assert packed["weight_scale"].dtype == torch.float32 and packed["weight_scale"].shape == (37,)
    _check_rows_quantised(W, packed["weight_fp8"], packed["weight_scale"])
    assert torch.equal(zk.dequantize_fp8(packed), packed["weight_fp8"].float() * packed["weight_scale"][:, None])


def test_pack_lowrank(rng):
    U, V = _rand(rng, 37, 9) * torch.logspace(-4, 1, 9), _rand(rng, 23, 9)
    V[:, 2] = 0.0
    packed = zk.pack_fp8_lowrank(U.half(), V)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in packed.items()}
    assert shapes == {"u_fp8": ((37, 9), torch.float8_e4m3fn), "u_scale": ((9,), torch.float32),
                      "vt_fp8": ((9, 23), torch.float8_e4m3fn), "v_scale": ((9,), torch.float32)}
    _check_rows_quantised(U.half().T, packed["u_fp8"].T, packed["u_scale"])
    _check_rows_quantised(V.T, packed["vt_fp8"], packed["v_scale"])
    u_hat, v_hat = zk.dequantize_fp8(packed)
    assert u_hat.shape == (37, 9) and v_hat.shape == (23, 9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_non_finite_weights_are_rejected(bad, rng):
    W = _rand(rng, 7, 5).double()
    W[3, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        zk.quantize_fp8_dense(W)
    with pytest.raises(ValueError, match="NaN/Inf"):
        zk.pack_fp8_lowrank(_rand(rng, 4, 5), W)


def test_byte_counts(rng):
    dense = zk.quantize_fp8_dense(_rand(rng, 37, 23))
    assert zk.fp8_nbytes(dense) == zk.fp8_nbytes_for_shape(37, 23) == {
        "payload": 37 * 23, "scales": 4 * 37, "total": 37 * 23 + 4 * 37}
    lowrank = zk.pack_fp8_lowrank(_rand(rng, 37, 9), _rand(rng, 23, 9))
    assert zk.fp8_nbytes(lowrank) == zk.fp8_nbytes_for_shape(37, 23, rank=9) == {
        "payload": 9 * (37 + 23), "scales": 8 * 9, "total": 9 * (37 + 23) + 8 * 9}
    assert sum(t.numel() * t.element_size() for t in lowrank.values()) == zk.fp8_nbytes(lowrank)["total"]


@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_safetensors_round_trip(form, rng, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    x, packed, bias, _ = _problem(rng, 37, 23, 9, (3,), torch.float32, True, form)
    packed = {n: t.cpu() for n, t in packed.items()}
    safetensors.save_file(packed, str(tmp_path / "w.safetensors"))
    loaded = safetensors.load_file(str(tmp_path / "w.safetensors"))
    assert set(loaded) == set(packed)
    for name, t in packed.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8))
    x, bias = x.cpu(), bias.cpu()
    assert torch.equal(_run(form, x, loaded, bias, "torch"), _run(form, x, packed, bias, "torch"))


def test_errors(rng):
    dense = zk.quantize_fp8_dense(_rand(rng, 7, 5))
    lowrank = zk.pack_fp8_lowrank(_rand(rng, 7, 3), _rand(rng, 5, 3))
    x = _rand(rng, 2, 5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        zk.fp8_linear(_rand(rng, 2, 6), dense)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        zk.fp8_linear(x.double(), dense)
    with pytest.raises(ValueError, match="bias"):
        zk.fp8_lowrank_matmul(x, lowrank, _rand(rng, 6))
    with pytest.raises(ValueError, match="use fp8_lowrank_matmul"):
        zk.fp8_linear(x, lowrank)
    with pytest.raises(ValueError, match="use fp8_linear"):
        zk.fp8_lowrank_matmul(x, dense)
    with pytest.raises(ValueError, match="keys"):
        zk.fp8_linear(x, {"weight_fp8": dense["weight_fp8"]})
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        zk.fp8_linear(x, {**dense, "weight_fp8": dense["weight_fp8"].half()})
    with pytest.raises(ValueError, match="expected"):
        zk.fp8_lowrank_matmul(x, {**lowrank, "u_scale": lowrank["u_scale"][:2]})
    with pytest.raises(ValueError, match="backend"):
        zk.fp8_linear(x, dense, backend="cuda")
    with pytest.raises(ValueError, match="same k"):
        zk.pack_fp8_lowrank(_rand(rng, 7, 3), _rand(rng, 5, 4))
    with pytest.raises(ValueError, match="2-D"):
        zk.quantize_fp8_dense(_rand(rng, 7))
    with pytest.raises(TypeError, match="floating-point"):
        zk.quantize_fp8_dense(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="dict"):
        zk.dequantize_fp8([dense["weight_fp8"]])


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
GPU_SHAPES = [(4096, 4096, 1632), (1000, 2752, 600)]


@pytest.mark.gpu
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_gpu_large_shapes(form, m, dtype, native, monkeypatch, poison_empty):
    if not native:
        monkeypatch.setattr(_device, "native_fp8", lambda device: False)
    gen = torch.Generator().manual_seed(m)
    for out_f, in_f, k in GPU_SHAPES:
        x, packed, bias, ref = _problem(gen, out_f, in_f, k, (m,), dtype, True, form)
        assert _rel_err(_run(form, x, packed, bias), ref) < TOL[dtype]


def _gpu_problem(form, m=4):
    gen = torch.Generator().manual_seed(0)
    return _problem(gen, 1024, 768, 320, (m,), torch.float16, True, form)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 512])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_gpu_torch_compile_fullgraph(form, m):
    x, packed, bias, ref = _gpu_problem(form, m)
    eager = _run(form, x, packed, bias)  # registers the ops before dynamo sees the call
    compiled = torch.compile(lambda x: _run(form, x, packed, bias), fullgraph=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_gpu_cuda_graph_capture(form, m):
    x, packed, bias, ref = _gpu_problem(form, m)
    eager = _run(form, x, packed, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _run(form, x, packed, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _run(form, x, packed, bias)
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(y.float(), (eager.float() - bias) * 0.5 + bias, rtol=2e-2, atol=2e-2)
