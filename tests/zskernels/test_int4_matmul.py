"""Tests of the int4 ops (zskernels/ops/int4): the Triton kernel (interpreter without a GPU), the plain
torch reference and the CPU fast path, each against float64 products of the *dequantised* weights.

Every kernel path (GEMV, 16-row tl.dot, prefill tiles) is forced in turn through the config hook on
odd shapes: K = 1, odd K, K not a multiple of the group, N = 1, groups whose size is not a power of
two (the K tile shrinks to divide them), and factor pairs whose two stages have different group
sizes (``--group-size auto`` stores them so: each stage must take its group and K tile from its own
shapes). bf16 tl.dot does not run in the interpreter: the Triton cases use fp16 and fp32 there; the
GPU tests add bf16.
"""
import pytest
import torch

import zskernels as zk
from zskernels import _configs, _cpu, _device, _triton
from zskernels import _cpu_kernel as cpu_kernel
from zskernels._backend import triton_available
from zskernels.ops.int4 import cpu as int4_cpu
from zskernels.ops.int4 import kernels as im

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available() or (DEVICE == "cpu" and not _device.interpreting()),
                                  reason="needs triton (and TRITON_INTERPRET=1 without a GPU)")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}  # relative Frobenius error
TRITON_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# Kernel paths, forced through _configs._FORCED. BLOCK_K 32 / 16 so small K still takes several steps.
PATHS = {
    "gemv": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=32, SPLIT_K=1),
    "gemv-splitk": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=16, SPLIT_K=2),
    "gemv-128-splitk": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=128, BLOCK_K=64, SPLIT_K=3),
    "dot": dict(path="decode", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1),
    "dot-splitk": dict(path="decode", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=3),
    "prefill": dict(path="prefill", USE_DOT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
}
# (out, in, rank, group, x shape without the last dim, bias); group: one size, or (V's, U's) for a factor pair
CASES = [
    (37, 23, 9, 16, (1,), True),     # K odd, K % g != 0
    (1, 1, 1, 64, (3,), False),       # N = 1, K = 1, rank 1
    (23, 37, 17, 48, (17,), True),    # group 48: K tile 16
    (40, 130, 33, 64, (1, 3), True),  # K spans three groups, the last one padded
    (16, 64, 40, 32, (5,), False),    # exact multiples
]
# Group sizes of --group-size auto: V (stage 1, groups along the inputs) and U (stage 2, along the rank) differ.
MIXED_CASES = [
    (37, 70, 130, (32, 128), (1,), True),    # in % 32 != 0; rank 130: U's second group of 128 almost all padding
    (40, 300, 20, (256, 32), (3,), False),   # two V groups of 256, the second padded; rank 20 below U's group
    (9, 33, 5, (32, 128), (2, 35), True),    # rank 5 below either group; M = 70 rows: several row tiles
    (33, 257, 100, (256, 32), (1, 1), True),  # in one past a group; rank 100 not a multiple of 32
]
DENSE_GROUPS = [(21, 300, 0, 256, (2,), True), (21, 70, 0, 32, (1,), False)]  # dense int4 at the extremes


def case_id(case) -> str:
    out_f, in_f, k, g, lead, with_bias = case
    g = "v{}u{}".format(*g) if isinstance(g, tuple) else g
    return f"{out_f}x{in_f}k{k}g{g}-x{'x'.join(map(str, lead))}{'-bias' if with_bias else ''}"


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


def _problem(gen, case, dtype, form):
    """(x, packed, bias, float64 reference from the dequantised weights), on DEVICE."""
    out_f, in_f, k, g, lead, with_bias = case
    g, u_g = g if isinstance(g, tuple) else (g, g)
    x = torch.randn(*lead, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen) if with_bias else None
    if form == "dense":
        packed = zk.quantize_int4(torch.randn(out_f, in_f, generator=gen), g)
        ref = x.double() @ zk.dequantize_int4(packed).double().T
    else:
        packed = zk.pack_int4_lowrank(torch.randn(out_f, k, generator=gen), torch.randn(in_f, k, generator=gen), g,
                                      u_g)
        u_hat, v_hat = zk.unpack_int4_lowrank(packed)
        ref = (x.double() @ v_hat.double()) @ u_hat.double().T
    if bias is not None:
        ref = ref + bias.double()
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return move(x), {n: move(t) for n, t in packed.items()}, None if bias is None else move(bias), ref


def _run(form, x, packed, bias, backend="triton"):
    op = zk.int4_linear if form == "dense" else zk.int4_lowrank_matmul
    return op(x, packed, bias, backend=backend)


def _force(monkeypatch, cfg: dict):
    full = dict(num_warps=4, num_stages=2, programs_per_sm=2, max_split=8, **cfg)
    monkeypatch.setitem(_configs._FORCED, "int4_matmul", full)  # what _configs.use_config does






# ---------------------------------------------------------------------------------------------
# The Triton kernel against float64
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_float64(case, path, form, dtype, monkeypatch, rng, poison_empty):
    x, packed, bias, ref = _problem(rng, case, dtype, form)
    _force(monkeypatch, PATHS[path])
    y = _run(form, x, packed, bias)
    assert y.shape == (*case[4], case[0]) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("bucket", range(4), ids=lambda b: f"bucket{b}")
def test_every_shipped_config_bucket(bucket, form, rng):
    """Each shipped config (BLOCK_K lowered to the group) runs and matches float64."""
    cfg = _configs.table("int4_matmul")["default"][bucket]
    m = min(cfg["max_m"], 20)
    x, packed, bias, ref = _problem(rng, (33, 70, 9, 64, (m,), True), torch.float16, form)
    with _configs.use_config("int4_matmul", cfg):
        assert _rel_err(_run(form, x, packed, bias), ref) < TOL[torch.float16]


# Paths whose K tile is larger than the smaller group: the host must lower it for that stage only.
WIDE_K_PATHS = {
    "gemv-splitk-k64": dict(path="decode", USE_DOT=False, BLOCK_M=1, BLOCK_N=8, BLOCK_K=64, SPLIT_K=3),
    "prefill-k128": dict(path="prefill", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=2),
}


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS) + list(WIDE_K_PATHS))
@pytest.mark.parametrize("form, case", [("lowrank", c) for c in MIXED_CASES] + [("dense", c) for c in DENSE_GROUPS],
                         ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_kernel_with_mixed_group_sizes_matches_float64(form, case, path, dtype, monkeypatch, rng, poison_empty):
    x, packed, bias, ref = _problem(rng, case, dtype, form)
    _force(monkeypatch, {**PATHS, **WIDE_K_PATHS}[path])
    y = _run(form, x, packed, bias)
    assert y.shape == (*case[4], case[0]) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("case", MIXED_CASES[:2], ids=case_id)
@pytest.mark.parametrize("bucket, m", [(0, 1), (1, 16), (2, 64), (3, 65)], ids=lambda v: str(v))
def test_shipped_configs_with_mixed_group_sizes(bucket, m, case, rng):
    """Each shipped config at its largest row count (65: one past the last decode bucket, so prefill
    tiles); its BLOCK_K of 64 exceeds V's or U's group of 32 and fits the other's."""
    cfg = _configs.table("int4_matmul")["default"][bucket]
    x, packed, bias, ref = _problem(rng, (*case[:4], (m,), case[5]), torch.float16, "lowrank")
    with _configs.use_config("int4_matmul", cfg):
        assert _rel_err(_run("lowrank", x, packed, bias), ref) < TOL[torch.float16]


def _recording_launch(real_launch, seen: list):
    """A stand-in for ``_triton.launch`` (``launch(kernel)[grid](...)``) that records the (GROUP, BLOCK_K)
    of each int4 matmul launch, then runs it."""
    class Launcher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if "GROUP" in kwargs:
                    seen.append((kwargs["GROUP"], kwargs["BLOCK_K"]))
                return real_launch(self.kernel)[grid](*args, **kwargs)
            return run
    return Launcher


@needs_triton
@pytest.mark.parametrize("v_group, u_group, k_tiles", [(32, 128, (32, 64)), (256, 32, (64, 32)), (48, 256, (16, 64))])
def test_each_stage_takes_its_group_and_k_tile_from_its_own_shapes(v_group, u_group, k_tiles, rng, monkeypatch):
    """The two launches of int4_lowrank_matmul: GROUP from that stage's codes / scales, BLOCK_K the
    config's 64 lowered to divide that group (not the other stage's)."""
    launched = []
    monkeypatch.setattr(im, "launch", _recording_launch(im.launch, launched))
    _force(monkeypatch, dict(path="decode", USE_DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1))
    x, packed, bias, ref = _problem(rng, (20, 300, 70, (v_group, u_group), (3,), True), torch.float16, "lowrank")
    assert _rel_err(_run("lowrank", x, packed, bias), ref) < TOL[torch.float16]
    assert launched == [(v_group, k_tiles[0]), (u_group, k_tiles[1])]


@needs_triton
@pytest.mark.parametrize("path", ["gemv-splitk", "dot-splitk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("group", [16, (32, 16)], ids=["g16", "v32u16"])
def test_lowrank_split_k_sums_in_each_launch(path, dtype, group, monkeypatch, rng, poison_empty, record_launches,
                                             check_split):
    """Decode split-K of the factor pair: each stage's last split of each tile sums the partials in
    its own launch (no reduction kernel), so stage 2 reads one t (M x k, x's dtype on every path), and
    the result does not depend on how K was split."""
    case = (37, 70, 20, group, (3,), True)  # K = 70: a partial step; rank 20: U's second group padded
    x, packed, bias, ref = _problem(rng, case, dtype, "lowrank")
    u_hat, v_hat = zk.unpack_int4_lowrank({n: t.cpu() for n, t in packed.items()})
    results = {}
    for split in (1, 2, 3):
        _force(monkeypatch, {**PATHS[path], "SPLIT_K": split})
        seen = record_launches(im)
        results[split] = _run("lowrank", x, packed, bias)
        assert [la["kernel"] for la in seen] == [im._int4_matmul_kernel] * 2  # two launches, no reduction kernel
        stage1, stage2 = seen
        check_split(stage1, split)
        check_split(stage2, min(split, 2))  # rank 20 in K steps of 16: at most two splits
        assert stage1["args"]["HAS_BIAS"] is False and stage2["args"]["HAS_BIAS"] is True
        t = stage2["args"]["a_ptr"]
        assert t.shape == (3, 20) and t.dtype == dtype and t is stage1["args"]["out_ptr"]
        assert _rel_err(t, x.double().cpu() @ v_hat.double()) < TOL[dtype]
        assert _rel_err(results[split], ref) < TOL[dtype]
    # the splits differ only in the fp32 order of the partial sums
    assert _rel_err(results[2], results[1].double()) < TOL[dtype] / 4
    assert _rel_err(results[3], results[1].double()) < TOL[dtype] / 4


@needs_triton
@pytest.mark.parametrize("path", ["gemv-splitk", "dot-splitk"])
def test_dense_split_k_sums_in_one_launch(path, monkeypatch, rng, poison_empty, record_launches, check_split):
    """Decode split-K of int4_linear: the last split of each tile sums the partials and adds the bias
    inside the one launch; the result does not depend on how K was split."""
    x, packed, bias, ref = _problem(rng, (37, 41, 0, 16, (3,), True), torch.float32, "dense")
    results = {}
    for split in (1, 2, 3):
        _force(monkeypatch, {**PATHS[path], "SPLIT_K": split})
        seen = record_launches(im)
        results[split] = _run("dense", x, packed, bias)
        assert [la["kernel"] for la in seen] == [im._int4_matmul_kernel]
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
    a = _problem(rng, (37, 41, 20, 16, (3,), True), torch.float16, "lowrank")
    b = _problem(rng, (23, 50, 9, (32, 16), (1,), False), torch.float16, "lowrank")
    other = split_calls_repeat(im, lambda: _run("lowrank", *a[:3]), lambda: _run("lowrank", *b[:3]))
    assert _rel_err(other, b[3]) < TOL[torch.float16]


def test_split_k_covers_k_in_whole_steps(monkeypatch):
    """Decode splits K in whole BLOCK_K steps until about programs_per_sm programs per SM exist (the
    host rule int4 shares with fp8, ``_triton.split_k``)."""
    monkeypatch.setattr(_device, "num_sms", lambda device: 132)
    cfg = dict(path="decode", BLOCK_K=64, SPLIT_K="auto", programs_per_sm=4, max_split=8)
    assert _triton.split_k(cfg, 18, 1536, torch.device("cpu")) == (8, 192)  # 576 x 1536 at M = 1
    assert _triton.split_k(cfg, 528, 4096, torch.device("cpu")) == (1, 4096)  # enough tiles already


# (N, K) of every int4 M = 1 launch at LLaMA-7B shapes: dense, and low-rank stages 1 and 2 at
# fp8-lowrank's rank (1632 for 4096 x 4096, 2384 for 11008 x 4096 and 4096 x 11008)
LLAMA_M1_LAUNCHES = [(4096, 4096), (11008, 4096), (4096, 11008), (1632, 4096), (4096, 1632), (2384, 4096),
                     (11008, 2384), (2384, 11008), (4096, 2384)]


def test_m1_gemv_is_128_rows_and_fills_an_h200(monkeypatch):
    """The shipped M = 1 bucket: a 128-row GEMV (x re-read once per 128 weight rows) whose split-K gives
    every M = 1 launch at LLaMA-7B shapes at least 1.5 programs per SM of a 132-SM H100/H200, in at
    most 16 splits; the 32-row GEMV it replaced stays reachable by name, for side-by-side timing."""
    monkeypatch.setattr(_device, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    cfg = _configs.pick_config("int4_matmul", 1, cpu)
    assert (cfg["USE_DOT"], cfg["BLOCK_N"], _triton.row_tile(cfg, 1)) == (False, 128, 1)
    for n, k in LLAMA_M1_LAUNCHES:
        tiles = -(-n // cfg["BLOCK_N"])
        splits, per_split = _triton.split_k({**cfg, "BLOCK_K": im._block_k(cfg, 64)}, tiles, k, cpu)
        assert 1.5 * 132 <= tiles * splits and splits <= 16, (n, k, tiles, splits)
        assert per_split % 64 == 0 and (splits - 1) * per_split < k <= splits * per_split
    old = im.named_config("gemv-32-rows")
    assert (old["USE_DOT"], old["BLOCK_N"], old["num_warps"]) == (False, 32, 2) and "max_m" not in old
    assert old != cfg and _configs.pick_config("int4_matmul", 2, cpu)["USE_DOT"]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", ["shipped", "gemv-32-rows"])
@pytest.mark.parametrize("form, case", [
    ("lowrank", (300, 257, 20, (32, 256), (1,), True)),  # 3 row tiles, the last partial; rank 20 below U's group
    ("lowrank", (261, 70, 130, (256, 32), (1,), False)),  # in 70 below V's group of 256; rank 130 in 5 groups
    ("dense", (300, 257, 0, 32, (1,), True)),
], ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_m1_configs_with_auto_split_match_float64(form, case, config, dtype, monkeypatch, rng, poison_empty,
                                                  record_launches, check_split):
    """Both M = 1 GEMVs (shipped 128 rows, the former 32) as a 132-SM GPU would split them (auto split-K),
    on odd shapes with several row tiles and mixed group sizes, against float64."""
    monkeypatch.setattr(_device, "num_sms", lambda device: 132)
    cfg = _configs.pick_config("int4_matmul", 1, torch.device("cpu")) if config == "shipped" else \
        im.named_config(config)
    x, packed, bias, ref = _problem(rng, case, dtype, form)
    seen = record_launches(im)
    with _configs.use_config("int4_matmul", cfg):
        y = _run(form, x, packed, bias)
    assert y.shape == (1, case[0]) and torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOL[dtype]
    assert len(seen) == (1 if form == "dense" else 2)
    for la in seen:
        assert la["args"]["BLOCK_N"] == cfg["BLOCK_N"] and not la["args"]["USE_DOT"]
        check_split(la, la["grid"][1])
    assert seen[0]["grid"][1] > 1  # stage 1 / the dense launch splits K


def test_block_k_divides_the_group():
    assert [im._block_k({"BLOCK_K": 64}, g) for g in (16, 48, 64, 96, 128, 256)] == [16, 16, 64, 32, 64, 64]


# ---------------------------------------------------------------------------------------------
# The torch reference and the CPU fast path against float64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("form", ["dense", "lowrank"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", CASES + MIXED_CASES, ids=case_id)
def test_torch_and_cpu_paths_match_float64(case, backend, form, dtype, rng, one_thread):
    x, packed, bias, ref = _problem(rng, case, dtype, form)
    x, packed, bias = x.cpu(), {n: t.cpu() for n, t in packed.items()}, None if bias is None else bias.cpu()
    y = _run(form, x, packed, bias, backend)
    assert y.shape == (*case[4], case[0]) and y.dtype == dtype
    assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("min_rows", [16, 8, None], ids=lambda r: f"kernel-from-{r}")
@pytest.mark.parametrize("kernel_here", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("m", [1, 8, 16, 300])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_cpu_routes(m, dtype, kernel_here, min_rows, rng, monkeypatch, one_thread):
    """bf16 from this CPU's kernel_min_rows() on (None: never): zskernels' int4 kernel where it runs; otherwise
    bf16 with a supported group and few rows: torch's int4pack kernel; the rest chunked."""
    if kernel_here and not cpu_kernel.available():
        pytest.skip(f"the CPU kernels are off here: {cpu_kernel.unavailable_reason() or 'their build failed'}")
    if not kernel_here:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    monkeypatch.setattr(int4_cpu, "kernel_min_rows", lambda: min_rows)
    calls, kernel_calls = [], []
    real, real_kernel = torch._weight_int4pack_mm_for_cpu, cpu_kernel.int4_matmul
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_kernel, "int4_matmul", lambda *a: kernel_calls.append(1) or real_kernel(*a))
    monkeypatch.setattr(_cpu, "CHUNK_BYTES", 4096)  # several chunks even on this small weight
    x, packed, bias, ref = _problem(rng, (50, 130, 9, 64, (m,), True), dtype, "dense")
    y = zk.int4_linear(x.cpu(), {n: t.cpu() for n, t in packed.items()}, bias.cpu())
    kernel = kernel_here and dtype == torch.bfloat16 and min_rows is not None and m >= min_rows
    assert bool(kernel_calls) == kernel
    assert bool(calls) == (not kernel and dtype == torch.bfloat16 and m <= int4_cpu.INT4PACK_MAX_ROWS[torch.bfloat16])
    assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("kernel_here", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("groups", [(64, 16), (16, 32)], ids=["int4pack-then-chunked", "chunked-then-int4pack"])
def test_cpu_stages_on_different_routes(groups, m, kernel_here, rng, monkeypatch, one_thread):
    """A group size int4pack does not take sends one factor down the chunked route: t leaves V at U's padded width
    (zero rows in V's layouts) or at the true rank, and U reads either."""
    if kernel_here and not cpu_kernel.available():
        pytest.skip(f"the CPU kernels are off here: {cpu_kernel.unavailable_reason() or 'their build failed'}")
    if not kernel_here:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    monkeypatch.setattr(int4_cpu, "kernel_min_rows", lambda: 16)  # whatever this CPU's entry says
    x, packed, bias, ref = _problem(rng, (45, 70, 37, groups, (m,), True), torch.bfloat16, "lowrank")
    y = zk.int4_lowrank_matmul(x.cpu(), {n: t.cpu() for n, t in packed.items()}, bias.cpu())
    assert _rel_err(y, ref) < TOL[torch.bfloat16]


def test_cpu_conversion_is_cached_and_follows_writes(rng):
    packed = zk.quantize_int4(torch.randn(20, 64, generator=rng), 64)
    x = torch.randn(2, 64, generator=rng).bfloat16()
    first = zk.int4_linear(x, packed)
    plan = int4_cpu._plan(x, packed, None, "dense", "int4_linear")
    assert plan is int4_cpu._plan(x, packed, None, "dense", "int4_linear")
    packed["mins"].add_(1.0)  # an in-place write (a checkpoint loaded into the buffer) rebuilds the cache
    second = zk.int4_linear(x, packed)
    assert torch.allclose(second.float() - first.float(), x.float().sum(1, keepdim=True).expand(2, 20), atol=0.1)


# ---------------------------------------------------------------------------------------------
# Dispatch and errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if triton_available() else []))
def test_empty_batch_and_rank_zero(backend, rng):
    if backend == "triton" and DEVICE == "cpu" and not _device.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    dense = {n: t.to(DEVICE) for n, t in zk.quantize_int4(torch.randn(7, 5, generator=rng), 16).items()}
    assert zk.int4_linear(torch.randn(0, 5, device=DEVICE), dense, backend=backend).shape == (0, 7)
    low = {n: t.to(DEVICE) for n, t in zk.pack_int4_lowrank(torch.randn(7, 0), torch.randn(5, 0), 16).items()}
    bias = torch.randn(7, device=DEVICE)
    y = zk.int4_lowrank_matmul(torch.randn(3, 5, device=DEVICE), low, bias, backend=backend)
    assert torch.allclose(y, bias.expand(3, 7))


def test_errors(rng):
    dense = zk.quantize_int4(torch.randn(7, 5, generator=rng), 16)
    low = zk.pack_int4_lowrank(torch.randn(7, 3, generator=rng), torch.randn(5, 3, generator=rng), 16)
    x = torch.randn(2, 5, generator=rng)
    cases = [
        (lambda: zk.int4_linear(x, low), ValueError, "other form"),
        (lambda: zk.int4_lowrank_matmul(x, dense), ValueError, "other form"),
        (lambda: zk.int4_linear(torch.randn(2, 6), dense), ValueError, r"\(\.\.\., 5\)"),
        (lambda: zk.int4_linear(x.double(), dense), TypeError, "float16/bfloat16/float32"),
        (lambda: zk.int4_linear(x, dense, torch.randn(6)), ValueError, "bias"),
        (lambda: zk.int4_linear(x, dense, backend="cuda"), ValueError, "backend"),
        (lambda: zk.int4_linear(x, {"codes": dense["codes"]}), ValueError, "keys"),
        (lambda: zk.int4_linear(x, [dense]), TypeError, "dict"),
        (lambda: zk.int4_lowrank_matmul(x, {**low, "u_codes": low["u_codes"][:, :1].clone(),
                                            "u_scales": low["u_scales"][:, :1].clone()}), ValueError, "groups"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words) as err:
            call()
        assert "\n" not in str(err.value)


def test_ops_are_registered_with_torch_library(rng):
    if not triton_available():
        pytest.skip("needs triton")
    _triton.ready(im.__name__)
    assert hasattr(torch.ops.zskernels, "int4_linear") and hasattr(torch.ops.zskernels, "int4_lowrank_matmul")


# ---------------------------------------------------------------------------------------------
# GPU only: large shapes, torch.compile, CUDA graphs
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_gpu_large_shapes(form, m, dtype, poison_empty):
    gen = torch.Generator().manual_seed(m)
    for out_f, in_f, k in [(4096, 4096, 1024), (1536, 576, 200), (576, 1536, 131)]:
        x, packed, bias, ref = _problem(gen, (out_f, in_f, k, 64, (m,), True), dtype, form)
        assert _rel_err(_run(form, x, packed, bias), ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_gpu_torch_compile_and_cuda_graphs(form, m):
    x, packed, bias, _ = _problem(torch.Generator().manual_seed(0), (1024, 768, 320, 64, (m,), True),
                                  torch.float16, form)
    eager = _run(form, x, packed, bias)
    compiled = torch.compile(lambda x: _run(form, x, packed, bias), fullgraph=True)
    assert torch.equal(compiled(x), eager)
    graph = torch.cuda.CUDAGraph()
    _run(form, x, packed, bias)
    with torch.cuda.graph(graph):
        y = _run(form, x, packed, bias)
    x.copy_(x * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(y.float(), (eager.float() - bias) * 0.5 + bias, rtol=2e-2, atol=2e-2)
