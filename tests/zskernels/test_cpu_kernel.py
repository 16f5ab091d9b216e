"""zskernels' CPU kernels (csrc/int8_matmul_cpu.cpp, bf16_matmul_cpu.cpp and int4_matmul_cpu.cpp via _cpu_kernel.py)
against float64.

Odd shapes (N not a multiple of 16, every remainder of the row tiles and of K, one-row and one-block weights), both
thread counts (each output is summed by one thread in one order: the results are equal bit for bit), and the
arguments it refuses. Skipped, with the reason, where the kernel cannot run (no AVX-512 BF16, no compiler).
"""
import pytest
import torch

from zskernels import _cpu_kernel as cpu_kernel

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(),
                                reason=f"the CPU kernels are off here: {cpu_kernel.unavailable_reason()}")

SHAPES = [(1, 4), (16, 16), (37, 20), (17, 580), (192, 576), (1537, 64)]  # (N, K); K in quads: the caller pads
ROWS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 17, 64, 127, 130]  # every remainder of the 4-row tiles


def reference(x, w, scale):
    return x.double() @ (w.double() * scale.double()[:, None]).T


def max_rel(y, expected):
    return float((y.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_within_one_bf16_rounding(shape, rng):
    n, k = shape
    w = torch.randint(-128, 128, (n, k), generator=rng, dtype=torch.int8)
    scale = torch.rand(n, generator=rng) * 0.01 + 1e-3
    packed = cpu_kernel.pack(w)
    assert packed.shape == (-(-n // 16), k // 4, 16, 4) and packed.dtype == torch.uint8
    for m in ROWS:
        x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
        y = cpu_kernel.matmul(x, packed, scale)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        if m:
            # x in two int8 planes (steps of absmax / 32258), exact int32 sums, one rounding to bf16 (2^-8)
            assert max_rel(y, reference(x, w, scale)) <= 2 ** -8 + 1e-4, (shape, m)


# Results below FLT_MIN (2^-126) come out zero: vcvtneps2bf16, the bf16 rounding of every kernel, flushes them.
FLUSHED = 2.0 ** -126


def row_errors_within_a_bf16_rounding(y, expected):
    for r in range(y.shape[0]):
        err = float((y[r].double() - expected[r]).abs().max())
        assert err <= (2 ** -8 + 1e-4) * float(expected[r].abs().max()) + FLUSHED, r


def magnitudes(rng, k):
    """Rows of 1e-30s, 1e30s, a 1000x outlier, 1e-24 (below 2^-64: scaled by 2^64 first), subnormals, zeros."""
    x = torch.randn(6, k, generator=rng)
    x[0] *= 1e-30
    x[1] *= 1e30
    x[2, 5] = 1000.0
    x[3] *= 1e-24
    x[4] *= 1e-39  # subnormal in fp32 and bf16
    x[5] = 0.0
    return x.to(torch.bfloat16)


@needs_kernel
def test_planes_keep_rows_of_very_different_magnitudes_and_outliers(rng):
    """Each row has its own step: every row within a bf16 rounding of float64, relative to the row."""
    w = torch.randint(-128, 128, (40, 64), generator=rng, dtype=torch.int8)
    scale = torch.rand(40, generator=rng) + 0.5
    x = magnitudes(rng, 64)
    y = cpu_kernel.matmul(x, cpu_kernel.pack(w), scale)
    assert not y[5].any() and y[4].any()
    row_errors_within_a_bf16_rounding(y, reference(x, w, scale))


@needs_kernel
def test_rows_are_independent_and_threads_do_not_change_the_sums(rng):
    w = torch.randint(-127, 128, (300, 96), generator=rng, dtype=torch.int8)
    scale = torch.rand(300, generator=rng) * 0.01
    packed = cpu_kernel.pack(w)
    x = torch.randn(19, 96, generator=rng).to(torch.bfloat16)
    x[4, 7] = float("inf")
    x[9, 0] = float("nan")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.matmul(x, packed, scale)
        torch.set_num_threads(2)
        two = cpu_kernel.matmul(x, packed, scale)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    assert not one[4].isfinite().all() and one[9].isnan().all()  # IEEE: inf propagates, NaN everywhere
    finite = [r for r in range(19) if r not in (4, 9)]
    assert torch.equal(one[finite], cpu_kernel.matmul(x[finite].contiguous(), packed, scale))  # no row leaks


@needs_kernel
def test_packing_offsets_the_weights_and_pads_with_weight_zero(rng):
    w = torch.randint(-128, 128, (3, 5), generator=rng, dtype=torch.int8)
    w[0, 0], w[0, 1] = -128, 127
    packed = cpu_kernel.pack(w)
    assert packed.shape == (1, 2, 16, 4)
    unpacked = packed.permute(0, 2, 1, 3).reshape(16, 8).to(torch.int16) - 128
    assert torch.equal(unpacked[:3, :5], w.to(torch.int16))
    assert not unpacked[3:].any() and not unpacked[:, 5:].any()
    with pytest.raises(RuntimeError, match="K = 65537 is over the 65536 columns"):
        cpu_kernel.pack(torch.zeros(1, cpu_kernel.INT8_MAX_K + 1, dtype=torch.int8))


@needs_kernel
def test_bad_arguments_are_refused_in_one_line(rng):
    w = torch.randint(-127, 128, (20, 8), generator=rng, dtype=torch.int8)
    packed, scale = cpu_kernel.pack(w), torch.ones(20)
    x = torch.randn(2, 8).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 4 columns, the packed weight 8"):
        cpu_kernel.matmul(x[:, :4].contiguous(), packed, scale)
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16"):
        cpu_kernel.matmul(x.half(), packed, scale)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernel.matmul(x, packed, scale.bfloat16())
    with pytest.raises(RuntimeError, match="40 scales for 2 blocks"):
        cpu_kernel.matmul(x, packed, torch.ones(40))
    with pytest.raises(RuntimeError, match="2-D int8"):
        cpu_kernel.pack(w.float())
    with pytest.raises(RuntimeError, match="must come from int8_pack"):
        cpu_kernel.matmul(x, packed.view(torch.int8), scale)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    assert cpu_kernel.unavailable_reason() == f"{cpu_kernel.ENV}=0"


def test_a_failed_build_leaves_torchs_routes_with_one_warning(monkeypatch, caplog):
    """No compiler (or any build error, even one without a message): available() is False, one warning, and a
    direct call says why in one line."""
    def fail():
        raise RuntimeError()

    monkeypatch.setattr(cpu_kernel, "_build", fail)
    monkeypatch.setattr(cpu_kernel, "_loaded", cpu_kernel._UNBUILT)  # restored afterwards: the real build
    with caplog.at_level("WARNING", logger=cpu_kernel.__name__):
        assert not cpu_kernel.available() and not cpu_kernel.available()
    assert [r.getMessage() for r in caplog.records] == [
        "zskernels: the CPU kernels are off (building them failed: RuntimeError: ); packed layers use "
        "torch's kernels"]
    with pytest.raises(RuntimeError, match="CPU kernels are off here .* only where available"):
        cpu_kernel.pack(torch.zeros(16, 16, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="CPU kernels are off here"):
        cpu_kernel.bf16_linear(torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(16, 16, dtype=torch.bfloat16))


def test_the_build_message_is_said_only_before_a_first_build(monkeypatch, caplog, tmp_path):
    """"building" (info) when no build of this name exists yet; nothing when torch's builder only loads it."""
    from torch.utils import cpp_extension

    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built.append(kwargs["name"]) or "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level("INFO", logger=cpu_kernel.__name__):
        assert cpu_kernel._build() == "module"
        (tmp_path / built[0] / f"{built[0]}.so").write_bytes(b"")
        assert cpu_kernel._build() == "module"
    assert [r.getMessage() for r in caplog.records] == [
        "zskernels: building the CPU kernels (once: about 40-60 s, then cached)"]


def test_a_cpu_without_the_flags_is_named(monkeypatch):
    monkeypatch.delenv(cpu_kernel.ENV, raising=False)
    monkeypatch.setattr(cpu_kernel.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    assert cpu_kernel.unavailable_reason() == "this CPU lacks avx512_vnni"
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "aarch64")
    assert cpu_kernel.unavailable_reason() == "it is built for x86-64 Linux, not Linux aarch64"


def test_cpu_info_reads_the_first_processor(monkeypatch, tmp_path):
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx512f\n\n"
            "processor\t: 1\nvendor_id\t: Other\nmodel name\t: Another\nflags\t\t: fpu\n")
    real = cpu_kernel.Path
    monkeypatch.setattr(cpu_kernel, "Path", lambda p: tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else real(p))
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_kernel.cpu_info()["vendor_id"] == "GenuineIntel"
    assert cpu_kernel.cpu_model() == "Some CPU @ 2.0GHz" and cpu_kernel.cpu_flags() == {"fpu", "avx512f"}


def test_cpu_route_settings_by_model_then_vendor_then_default(monkeypatch, tmp_path):
    from zskernels import _configs

    (tmp_path / "cpu_routes.json").write_text(
        '{"_about": "x", "default": {"rows": 16}, "GenuineIntel": {"rows": null}, "Some CPU": {"rows": 64}}')
    monkeypatch.delenv("ZSKERNELS_ROWS", raising=False)
    for model, vendor, expected in [("Some CPU", "GenuineIntel", 64), ("Other", "GenuineIntel", None),
                                    ("Other", "AuthenticAMD", 16)]:
        monkeypatch.setattr(cpu_kernel, "cpu_info", lambda: {"model name": model, "vendor_id": vendor})
        assert _configs.cpu_route_setting("rows", tmp_path) == expected
    monkeypatch.setenv("ZSKERNELS_ROWS", "none")
    assert _configs.cpu_route_setting("rows", tmp_path) is None
    monkeypatch.setenv("ZSKERNELS_ROWS", "32")
    assert _configs.cpu_route_setting("rows", tmp_path) == 32
    monkeypatch.setenv("ZSKERNELS_ROWS", "many")
    with pytest.raises(ValueError, match="ZSKERNELS_ROWS='many': give a whole number of rows, or none"):
        _configs.cpu_route_setting("rows", tmp_path)


def test_the_shipped_cpu_routes_have_a_default():
    from zskernels import _configs

    table = _configs._load_cpu_routes(_configs._path(_configs.CPU_ROUTES, None))
    assert isinstance(table["default"]["int4_kernel_min_rows"], int)
    assert all(entry["int4_kernel_min_rows"] is None or entry["int4_kernel_min_rows"] > 0 for entry in table.values())


# bf16_linear: a bf16 weight as stored, (N, K) row-major. K runs in steps of 32 with a masked remainder, N in
# blocks of 16 (a partial last one), rows in tiles of 1 to 3.
BF16_SHAPES = [(1, 1), (16, 32), (37, 101), (5, 31), (17, 33), (335, 576), (1536, 335), (64, 0)]
BF16_ROWS = [0, 1, 2, 3, 4, 5, 7, 8, 11, 64]


@needs_kernel
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_kernel_matches_float64_within_one_bf16_rounding(shape, rng):
    n, k = shape
    w = torch.randn(n, k, generator=rng).to(torch.bfloat16)
    for m in BF16_ROWS:
        x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
        y = cpu_kernel.bf16_linear(x, w)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        expected = x.double() @ w.double().T
        if not k:
            assert not y.any()
        elif m:
            # fp32 sums of exact products (bf16 x bf16 fits fp32), rounded once to bf16
            assert max_rel(y, expected) <= 2 ** -8 + 1e-4, (shape, m)


@needs_kernel
def test_bf16_rows_are_independent_and_threads_do_not_change_the_sums(rng):
    w = torch.randn(300, 97, generator=rng).to(torch.bfloat16)
    x = torch.randn(11, 97, generator=rng).to(torch.bfloat16)
    x[4, 96] = float("inf")  # in the masked remainder of K
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.bf16_linear(x, w)
        torch.set_num_threads(2)
        two = cpu_kernel.bf16_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not one[4].isfinite().all()
    finite = [r for r in range(11) if r != 4]
    assert torch.equal(one[finite], cpu_kernel.bf16_linear(x[finite], w))  # no row leaks
    assert torch.equal(one[finite][:1], cpu_kernel.bf16_linear(x[finite][:1], w))  # nor tiles of different rows


@needs_kernel
def test_bf16_bad_arguments_are_refused_in_one_line(rng):
    w = torch.randn(20, 8).to(torch.bfloat16)
    x = torch.randn(2, 8).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x has 6 columns, w 8"):
        cpu_kernel.bf16_linear(x[:, :6], w)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D bf16"):
        cpu_kernel.bf16_linear(x.half(), w)
    with pytest.raises(RuntimeError, match="w must be a contiguous 2-D bf16"):
        cpu_kernel.bf16_linear(x, w.T.contiguous().T)


@needs_kernel
def test_float_linear_takes_the_bf16_kernel_for_few_rows_only(monkeypatch, rng):
    """Few rows of bf16 x on a contiguous bf16 weight, eager and without gradients: the kernel; otherwise F.linear."""
    from zskernels import _cpu

    calls = []
    real = cpu_kernel.bf16_linear
    monkeypatch.setattr(cpu_kernel, "bf16_linear", lambda x, w: calls.append(x.shape) or real(x, w))
    w = torch.randn(40, 24, generator=rng).to(torch.bfloat16)
    few = torch.randn(2, 3, 24, generator=rng).to(torch.bfloat16)
    many = torch.randn(cpu_kernel.BF16_MAX_ROWS + 1, 24, generator=rng).to(torch.bfloat16)
    y = _cpu.float_linear(few, w)
    assert calls == [(6, 24)] and y.shape == (2, 3, 40)
    assert max_rel(y, few.double() @ w.double().T) <= 2 ** -8 + 1e-4
    _cpu.float_linear(many, w)
    _cpu.float_linear(few.float(), w.float())
    _cpu.float_linear(few, w.T.contiguous().T)  # a transposed view: F.linear reads it as it is
    _cpu.float_linear(few.requires_grad_(), w).sum().backward()  # the kernel has no backward
    assert calls == [(6, 24)] and few.grad is not None


# int4_matmul: codes, scales and mins as zskernels/formats/int4.py stores them, in the kernel's layout. Groups
# of 16 to 80 (any multiple of 16), N in blocks of 16 with a partial last one, rows in tiles of 1 to 4.
INT4_SHAPES = [(1, 16, 16), (37, 101, 16), (16, 64, 64), (5, 200, 80), (335, 576, 32), (40, 130, 64)]  # (N, K, g)
INT4_ROWS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 67]


def int4_weight(n, k, g, rng):
    from zskernels.formats.int4 import dequantize_int4, quantize_int4

    stored = quantize_int4(torch.randn(n, k, generator=rng), group_size=g)
    return stored, dequantize_int4(stored).double()[:, :k]


def int4_apply(x, stored, n):
    kp = 2 * stored["codes"].shape[1]
    packed = cpu_kernel.int4_pack(stored["codes"], stored["scales"], stored["mins"])
    return cpu_kernel.int4_matmul(torch.nn.functional.pad(x, (0, kp - x.shape[1])), packed, n)


@needs_kernel
@pytest.mark.parametrize("shape", INT4_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int4_kernel_matches_float64_within_one_bf16_rounding(shape, rng):
    n, k, g = shape
    stored, w = int4_weight(n, k, g, rng)
    for m in INT4_ROWS:
        x = torch.randn(m, k, generator=rng).to(torch.bfloat16)
        y = int4_apply(x, stored, n)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        if m:
            # x in two int8 planes (steps of absmax / 32258), exact int32 sums per group, one bf16 rounding
            assert max_rel(y, x.double() @ w.T) <= 2 ** -8 + 1e-4, (shape, m)


@needs_kernel
def test_int4_packing_puts_each_outputs_octet_of_codes_in_one_lane(rng):
    stored, _ = int4_weight(20, 64, 32, rng)
    codes, scale, mins = cpu_kernel.int4_pack(stored["codes"], stored["scales"], stored["mins"])
    assert codes.shape == (2, 8, 16, 4) and scale.shape == mins.shape == (2, 2, 16)
    c = stored["codes"]
    q = torch.stack([c & 0xF, c >> 4], dim=-1).view(20, 64)  # code k of output n
    lanes = codes.permute(0, 2, 1, 3).reshape(32, 8, 4)[:20]  # output n, octet o, byte j
    octets = q.view(20, 8, 2, 4)  # output, octet, low / high nibble, byte
    assert torch.equal(lanes & 0xF, octets[:, :, 0]) and torch.equal(lanes >> 4, octets[:, :, 1])
    assert not codes.permute(0, 2, 1, 3).reshape(32, 32)[20:].any()
    assert torch.equal(scale.permute(0, 2, 1).reshape(32, 2)[:20], stored["scales"].float())
    assert torch.equal(mins.permute(0, 2, 1).reshape(32, 2)[:20], stored["mins"].float())


@needs_kernel
def test_int4_rows_of_very_different_magnitudes_outliers_and_tiny_rows(rng):
    stored, w = int4_weight(40, 64, 32, rng)
    x = magnitudes(rng, 64)
    y = int4_apply(x, stored, 40)
    assert not y[5].any()
    row_errors_within_a_bf16_rounding(y, x.double() @ w.T)


@needs_kernel
@pytest.mark.parametrize("m", [11, 70])
def test_int4_rows_are_independent_and_threads_do_not_change_the_sums(m, rng):
    stored, _ = int4_weight(300, 96, 32, rng)
    x = torch.randn(m, 96, generator=rng).to(torch.bfloat16)
    x[4, 7] = float("inf")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int4_apply(x, stored, 300)
        torch.set_num_threads(2)
        two = int4_apply(x, stored, 300)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    assert not one[4].isfinite().all()  # the fp32 path: inf propagates
    finite = [r for r in range(m) if r != 4]
    assert one[finite].isfinite().all()
    assert torch.equal(one[finite], int4_apply(x[finite].contiguous(), stored, 300))  # no row leaks


@needs_kernel
def test_int4_bad_arguments_are_refused_in_one_line(rng):
    stored, _ = int4_weight(20, 64, 32, rng)
    codes, scale, mins = cpu_kernel.int4_pack(stored["codes"], stored["scales"], stored["mins"])
    x = torch.randn(2, 64).to(torch.bfloat16)
    module = cpu_kernel._required()
    with pytest.raises(RuntimeError, match="x has 56 columns, the packed codes 64"):
        module.int4_matmul(x[:, :56].contiguous(), codes, scale, mins, 20)
    with pytest.raises(RuntimeError, match="40 outputs for 2 blocks"):
        module.int4_matmul(x, codes, scale, mins, 40)
    with pytest.raises(RuntimeError, match="scale and min must be"):
        module.int4_matmul(x, codes, scale.half(), mins, 20)
    with pytest.raises(RuntimeError, match="the codes must be"):
        module.int4_matmul(x, codes.view(torch.int8), scale, mins, 20)


def test_compiled_float_linear_traces_f_linear_without_a_guard_on_rows(rng):
    """Under torch.compile the bf16 kernel is not traced (F.linear is), and choosing it puts no guard on the
    number of rows: a dynamic batch compiles once for few and many rows."""
    import torch._dynamo
    from zskernels import _cpu

    w = torch.randn(40, 24, generator=rng).to(torch.bfloat16)
    compiled = torch.compile(lambda x: _cpu.float_linear(x, w), backend="eager", dynamic=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (2, 3, cpu_kernel.BF16_MAX_ROWS + 6):
            x = torch.randn(rows, 24, generator=rng).to(torch.bfloat16)
            assert torch.equal(compiled(x), torch.nn.functional.linear(x, w))
