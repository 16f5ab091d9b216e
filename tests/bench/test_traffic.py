"""bench/traffic.py: the bytes counted in the interpreter equal the tiling arithmetic, on small shapes.

The arithmetic is what extrapolates the traffic account to LLaMA-7B shapes; these tests hold it to
the interpreter's own count of every load, store and atomic of every kernel, at the configs an
H100 picks (split-K, GEMV and tensor-core paths, tails, bias), and check that the counter sees
every byte of the packed weights exactly as the arithmetic's "must" says.
"""
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import traffic  # noqa: E402

KERNELS = {"_remap_stage1_kernel", "_remap_stage2_kernel", "_matmul_kernel", "_int4_matmul_kernel",
           "_score_kernel", "_reduce_kernel", "_batched_score_kernel", "_batched_reduce_kernel"}


@pytest.fixture(scope="module")
def counted():
    return traffic.check(quick=True)  # raises, naming the launch and argument, on any difference


def test_counts_equal_arithmetic_for_every_kernel(counted):
    assert {la.kernel for la in counted} == KERNELS
    assert all(not traffic.mismatches(la) for la in counted)
    # split-K (workspace, counters) and the GEMV path were among the launches checked
    assert any("ws_ptr" in la.counted and la.counted["ws_ptr"]["load"] for la in counted)
    assert any(la.kernel == "_matmul_kernel" and not la.args["USE_DOT"] for la in counted)
    # int4: GEMV, 16-row dot and prefill tiles, split-K summed in-launch, V and U with their own groups
    int4 = [la for la in counted if la.kernel == "_int4_matmul_kernel"]
    assert {(la.args["USE_DOT"], la.args["LAST_SUMS"]) for la in int4} >= {(False, True), (True, True), (True, False)}
    assert {la.args["GROUP"] for la in int4} == {32, 64} and any(la.args["HAS_BIAS"] for la in int4)


def test_every_weight_byte_is_read_and_counted_once_as_must(counted):
    weights = {"_remap_stage1_kernel": ("vq_ptr",), "_remap_stage2_kernel": ("uq_ptr",), "_matmul_kernel": ("w_ptr",),
               "_int4_matmul_kernel": ("codes_ptr", "scales_ptr", "mins_ptr")}
    for la in counted:
        for name in weights.get(la.kernel, ()):
            label = la.labels()[name]
            must = traffic.FORMULAS[la.kernel](la).must[name]
            assert la.counted[label]["unique"] == must == la.args[name].end - la.args[name].start, (la.case, name)


def test_distinct_bytes_equal_the_counted_ones(counted):
    # every argument a launch touches is touched entirely (the table of the batched scores aside)
    for la in counted:
        want = traffic.distinct_bytes(la, traffic.FORMULAS[la.kernel](la))
        got = {label: e["unique"] for label, e in la.counted.items() if label != "meta_ptr"}
        assert got == {label: n for label, n in want.items() if label != "meta_ptr"}, (la.kernel, la.case)


def test_a_wrong_formula_is_caught(counted, monkeypatch):
    la = next(la for la in counted if la.kernel == "_remap_stage1_kernel")
    honest = traffic.FORMULAS["_remap_stage1_kernel"]

    def off_by_one_tile(launch):
        t = honest(launch)
        t.requested["x_ptr"]["load"] += launch.args["x_ptr"].itemsize
        return t

    monkeypatch.setitem(traffic.FORMULAS, "_remap_stage1_kernel", off_by_one_tile)
    assert traffic.mismatches(la) == [f"x_ptr load: counted {la.counted['x_ptr']['load']} arithmetic "
                                      f"{la.counted['x_ptr']['load'] + la.args['x_ptr'].itemsize}"]


def test_llama_report_has_every_op_and_gpu():
    text = traffic.report()
    for op in ("remap-int8 4096x4096 M=1", "fp8-lowrank 11008x4096 M=16", "fp8-dense 4096x11008 M=2048",
               "remap-int8 rho0.8 4096x4096 M=2048", "int4-dense 4096x4096 M=1", "int4-lowrank 4096x11008 M=16",
               "int4-lowrank 11008x4096 M=2048", "sigma_scores_batched x3"):
        assert f"| {op} |" in text
    assert "H200 floor µs" in text and "H100 floor µs" in text
    rows = traffic.launch_rows(traffic.launches_7b())
    # a weight-reading launch requests at least what it must move, and decode is judged on those
    assert all(r["requested"] >= r["must"] > 0 for r in rows if r["kernel"] in traffic.WEIGHT_KERNELS)
    assert any(r["judged"] for r in rows)
    # int4 decode: one launch per stage (split-K summed in-launch, no reduction kernel)
    ops = {r["case"]: r for r in traffic.op_rows(rows)}
    for shape in ("4096x4096", "11008x4096", "4096x11008"):
        for m in (1, 16):
            assert ops[f"int4-dense {shape} M={m}"]["launches"] == 1
            assert ops[f"int4-lowrank {shape} M={m}"]["launches"] == 2
