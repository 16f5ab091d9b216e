"""Tensor-parallel slices of every packed layout (plain torch; runs without vLLM too).

Column-parallel slices concatenated, and row-parallel slices summed, must give the module's own
output; at tp 1 each slice is the module itself and runs the storage's own op.
"""
import pytest
import torch

from zssvd.io.vllm.sharding import COLUMN, ROW, WHOLE, FusedParts, ShardingError, slice_module
from zssvd.nn.packed_linear import PackedDenseLinear, PackedLowRankLinear

SHAPES = [(12, 18, 5), (18, 12, 5), (12, 12, 4)]  # (out, in, rank): wide, tall, square
STORAGES = ["fp32", "bf16", "remap", "fp8"]


def _lowrank(out_f, in_f, k, storage, gen):
    U, V = torch.randn(out_f, k, generator=gen), torch.randn(in_f, k, generator=gen)
    return PackedLowRankLinear.from_factors(U, V, storage=storage)


def _module_and_desc(kind, shape, gen):
    out_f, in_f, k = shape
    if kind == "weight":
        weight = torch.randn(out_f, in_f, generator=gen)
        return (lambda x: x @ weight.T), None, {"weight": weight}
    if kind == "dense-fp8":
        module = PackedDenseLinear.from_weight(torch.randn(out_f, in_f, generator=gen))
    else:
        module = _lowrank(out_f, in_f, k, kind, gen)
    return (lambda x: module(x, backend="torch")), module.describe(), module.packed()


def _slices(desc, tensors, role, full, tp):
    size = full // tp
    return [slice_module(desc, tensors, role, r * size, size, "m") for r in range(tp)]


@pytest.mark.parametrize("kind", STORAGES + ["dense-fp8", "weight"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tp", [2, 3])
def test_column_and_row_slices_reassemble_the_module(kind, shape, tp, rng):
    forward, desc, tensors = _module_and_desc(kind, shape, rng)
    x = torch.randn(7, shape[1], generator=rng)
    expected = forward(x)
    columns = _slices(desc, tensors, COLUMN, shape[0], tp)
    torch.testing.assert_close(torch.cat([p.forward(x, "torch") for p in columns], -1), expected,
                               rtol=1e-5, atol=1e-4)
    rows = _slices(desc, tensors, ROW, shape[1], tp)
    size = shape[1] // tp
    partial = [p.forward(x[:, r * size:(r + 1) * size], "torch") for r, p in enumerate(rows)]
    torch.testing.assert_close(sum(partial), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_remap_slices_run_the_kernel_op(shape, backend, rng, monkeypatch):
    """Every remap slice (heads of different lengths, some empty) calls zskernels.remap_matmul with the
    backend asked for, no torch fallback: Triton (interpreted on CPU) and "auto" (the fast CPU path)."""
    import zskernels

    module = _lowrank(*shape, "remap", rng)
    desc, tensors = module.describe(), module.packed()
    x = torch.randn(5, shape[1], generator=rng)
    expected = module(x, backend="torch")
    calls = []
    op = zskernels.remap_matmul
    monkeypatch.setattr(zskernels, "remap_matmul", lambda *a, **kw: calls.append(kw["backend"]) or op(*a, **kw))
    for tp in (2, 3):
        columns = _slices(desc, tensors, COLUMN, shape[0], tp)
        torch.testing.assert_close(torch.cat([p.forward(x, backend) for p in columns], -1), expected,
                                   rtol=1e-4, atol=1e-4)
        size = shape[1] // tp
        rows = _slices(desc, tensors, ROW, shape[1], tp)
        partial = [p.forward(x[:, r * size:(r + 1) * size], backend) for r, p in enumerate(rows)]
        torch.testing.assert_close(sum(partial), expected, rtol=1e-4, atol=1e-4)
    assert calls == [backend] * (2 * (2 + 3))


def test_remap_slice_straddling_head_and_tail_keeps_both(rng):
    module = _lowrank(18, 12, 5, "remap", rng)  # U: 12 int8 head rows, 6 fp16 tail rows
    part = slice_module(module.describe(), module.packed(), COLUMN, 9, 6, "m")
    assert part.tensors["u_q"].shape[0] == 3 and part.tensors["u_tail"].shape[0] == 3


def test_out_of_range_slice_is_refused(rng):
    module = _lowrank(12, 18, 5, "fp32", rng)
    with pytest.raises(ShardingError, match="out of range"):
        slice_module(module.describe(), module.packed(), COLUMN, 8, 6, "model.layers.0.mlp.up_proj")


def test_fused_parts_share_the_first_product_and_keep_order(rng):
    """q (fp32 factors), k (an ordinary weight), v (fp32 factors of another rank), like a fused qkv_proj."""
    mods = [_module_and_desc("fp32", (12, 18, 5), rng), _module_and_desc("weight", (6, 18, 0), rng),
            _module_and_desc("fp32", (6, 18, 3), rng)]
    fused = FusedParts([slice_module(d, t, WHOLE, 0, 0) for _, d, t in mods], torch.float32)
    assert fused.shared == [0, 2] and fused.v_cat.shape == (8, 18)
    x = torch.randn(4, 18, generator=rng)
    bias = torch.randn(24, generator=rng)
    expected = torch.cat([f(x) for f, _, _ in mods], -1) + bias
    torch.testing.assert_close(fused.forward(x, bias), expected, rtol=1e-5, atol=1e-5)


def test_fused_parts_on_the_cpu_are_one_opaque_path(rng):
    """bf16 on the CPU, every kind of part: compiled code (vLLM's default) calls the layer as one opaque op and
    gets eager's numbers bit for bit, both near the float64 modules; the path's name goes with the layer."""
    import gc

    from zskernels import _cpu

    kinds = [("bf16", (12, 18, 5)), ("weight", (6, 18, 0)), ("remap", (10, 18, 4)), ("dense-fp8", (7, 18, 0)),
             ("bf16", (6, 18, 3))]
    mods = [_module_and_desc(kind, shape, rng) for kind, shape in kinds]
    fused = FusedParts([slice_module(d, t, WHOLE, 0, 0) for _, d, t in mods], torch.bfloat16)
    bias = torch.randn(41, generator=rng).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fused.forward(x, bias), fullgraph=True, dynamic=True)
    for m in (1, 9):
        x = torch.randn(m, 18, generator=rng)
        eager = fused.forward(x.bfloat16(), bias)
        assert torch.equal(compiled(x.bfloat16()), eager)
        expected = torch.cat([f(x) for f, _, _ in mods], -1) + bias.float()
        torch.testing.assert_close(eager.float(), expected, rtol=0.05, atol=0.1 * expected.abs().max().item())
    name = fused._cpu_path
    assert name in _cpu._PATHS
    del fused, compiled
    torch._dynamo.reset()
    gc.collect()
    assert name not in _cpu._PATHS
