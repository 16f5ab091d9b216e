"""Tensor-parallel slices of int4 layouts (plain torch; runs without vLLM too).

Output rows slice with their groups; input slices are whole groups: of the stored group size, or of a
smaller one the stored groups are split into (same scale and min) when a slice bound falls inside a group.
Factor pairs may store V^T and U with different group sizes (``--group-size auto``): a row slice cuts V^T's
groups (along the inputs), a column slice U's rows (its groups lie along the rank and stay whole).
"""
import pytest
import torch

from zssvd.io.vllm.sharding import COLUMN, ROW, WHOLE, ShardingError, slice_module
from zssvd.nn.packed_linear import PackedDenseLinear, PackedLowRankLinear
from zssvd.stages.packing import pack_lowrank

# (out, in, rank): 96 inputs split into whole groups of 16 at tp 2 and 3 (2 x 48, 3 x 32); rank 20 and 40 leave
# U's last group padded, rank 7 is below one group.
SHAPES = [(48, 96, 20), (96, 96, 40), (36, 96, 7)]


def _module(kind, shape, gen, group=16, u_group=None):
    out_f, in_f, k = shape
    if kind == "dense-int4":
        return PackedDenseLinear.from_weight(torch.randn(out_f, in_f, generator=gen), storage="int4", group_size=group)
    U, V = torch.randn(out_f, k, generator=gen), torch.randn(in_f, k, generator=gen)
    return pack_lowrank(U, V, None, "int4", {"group_size": group, "u_group_size": u_group or group})


@pytest.mark.parametrize("kind", ["int4", "dense-int4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tp", [2, 3])
def test_column_and_row_slices_reassemble_the_module(kind, shape, tp, rng):
    module = _module(kind, shape, rng)
    desc, tensors = module.describe(), module.packed()
    x = torch.randn(5, shape[1], generator=rng)
    expected = module(x, backend="torch")
    whole = slice_module(desc, tensors, WHOLE, 0, 0)
    torch.testing.assert_close(whole.forward(x, "torch"), expected, rtol=0, atol=0)
    size = shape[0] // tp
    columns = [slice_module(desc, tensors, COLUMN, r * size, size, "m") for r in range(tp)]
    torch.testing.assert_close(torch.cat([p.forward(x, "torch") for p in columns], -1), expected,
                               rtol=1e-5, atol=1e-4)
    size = shape[1] // tp
    rows = [slice_module(desc, tensors, ROW, r * size, size, "m") for r in range(tp)]
    partial = [p.forward(x[:, r * size:(r + 1) * size], "torch") for r, p in enumerate(rows)]
    torch.testing.assert_close(sum(partial), expected, rtol=1e-5, atol=1e-4)


def test_a_padded_last_group_slices_with_its_padding(rng):
    module = _module("int4", (24, 40, 6), rng)  # 40 inputs: groups [0, 16), [16, 32), [32, 40) + padding
    desc, tensors = module.describe(), module.packed()
    x = torch.randn(3, 40, generator=rng)
    first, last = (slice_module(desc, tensors, ROW, a, b - a, "m") for a, b in ((0, 32), (32, 40)))
    assert last.tensors["v_codes"].shape[1] == 8 and int(last.tensors["v_in_features"]) == 8
    torch.testing.assert_close(first.forward(x[:, :32], "torch") + last.forward(x[:, 32:], "torch"),
                               module(x, backend="torch"), rtol=1e-5, atol=1e-4)


def test_an_input_slice_through_a_group_is_refused_with_the_fix(rng):
    module = _module("dense-int4", (24, 96, 0), rng)
    with pytest.raises(ShardingError, match="groups of 16 inputs cannot be split"):
        slice_module(module.describe(), module.packed(), ROW, 24, 24, "model.layers.0.mlp.down_proj")


# (kind, (out, in, rank), V^T's or the weight's group, U's group, tp). 576 inputs at tp 3 (192 each) and tp 2
# (288 each) cut groups of 256 / 128 / 64: split into 64 / 32 before slicing.
MIXED = [
    ("int4", (48, 128, 20), 32, 128, 2),   # rank 20 below U's group
    ("int4", (40, 512, 70), 256, 32, 2),   # whole groups of 256; rank 70 not a multiple of 32
    ("int4", (24, 576, 9), 256, 32, 3),    # slices of 192 inside groups of 256
    ("int4", (36, 576, 130), 128, 256, 2),  # slices of 288 inside groups of 128; U's one group padded to 256
    ("dense-int4", (30, 576, 0), 256, None, 3),
    ("dense-int4", (30, 576, 0), 64, None, 2),
]


def _mixed_id(case) -> str:
    kind, (out_f, in_f, k), group, u_group, tp = case
    return f"{kind}-{out_f}x{in_f}k{k}-g{group}" + (f"u{u_group}" if u_group else "") + f"-tp{tp}"


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
@pytest.mark.parametrize("case", MIXED, ids=_mixed_id)
def test_mixed_group_sizes_slice_into_the_modules_output(case, backend, rng):
    """Column slices concatenated and row slices summed equal the whole module, with each slice run by
    the backend asked for (triton: the interpreter on the CPU; auto: the fast CPU path)."""
    kind, shape, group, u_group, tp = case
    module = _module(kind, shape, rng, group, u_group)
    desc, tensors = module.describe(), module.packed()
    x = torch.randn(3, shape[1], generator=rng)
    expected = module(x, backend="torch")
    size = shape[0] // tp
    columns = [slice_module(desc, tensors, COLUMN, r * size, size, "m").forward(x, backend) for r in range(tp)]
    torch.testing.assert_close(torch.cat(columns, -1), expected, rtol=1e-4, atol=1e-4)
    size = shape[1] // tp
    rows = [slice_module(desc, tensors, ROW, r * size, size, "m") for r in range(tp)]
    partial = [p.forward(x[:, r * size:(r + 1) * size], backend) for r, p in enumerate(rows)]
    torch.testing.assert_close(sum(partial), expected, rtol=1e-4, atol=1e-4)


def _stored_group(tensors, prefix) -> int:
    return 2 * tensors[prefix + "codes"].shape[1] // tensors[prefix + "scales"].shape[1]


@pytest.mark.parametrize("kind, prefix", [("int4", "v_"), ("dense-int4", "weight_")])
def test_a_slice_inside_groups_splits_them_exactly_and_leaves_u_alone(kind, prefix, rng):
    """576 inputs at tp 3 in groups of 256: [192, 384) starts and ends inside a group. The slice's groups
    are 64 wide, its de-quantised weights are the whole matrix's columns bit for bit, U is untouched."""
    from zskernels.formats.int4 import dequantize_int4

    module = _module(kind, (24, 576, 9), rng, 256, 32)
    tensors = module.packed()
    part = slice_module(module.describe(), tensors, ROW, 192, 192, "m")
    assert _stored_group(part.tensors, prefix) == 64 and int(part.tensors[prefix + "in_features"]) == 192
    whole = dequantize_int4({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    sliced = dequantize_int4({k[len(prefix):]: v for k, v in part.tensors.items() if k.startswith(prefix)})
    assert torch.equal(sliced, whole[:, 192:384])
    if kind == "int4":
        assert all(part.tensors["u_" + key] is tensors["u_" + key] for key in ("codes", "scales", "mins"))
        column = slice_module(module.describe(), tensors, COLUMN, 8, 8, "m")
        assert _stored_group(column.tensors, "u_") == 32 and _stored_group(column.tensors, "v_") == 256


def test_the_last_slice_may_end_inside_its_padded_group(rng):
    """300 inputs in groups of 256 (the second padded from 300 to 512): [256, 300) is one whole, padded group;
    [150, 300) would start inside a group at a multiple of 2 only, which no 16-multiple group can hold."""
    module = _module("int4", (20, 300, 6), rng, 256, 32)
    desc, tensors = module.describe(), module.packed()
    x = torch.randn(2, 300, generator=rng)
    first, last = (slice_module(desc, tensors, ROW, a, b - a, "m") for a, b in ((0, 256), (256, 300)))
    assert _stored_group(last.tensors, "v_") == 256 and int(last.tensors["v_in_features"]) == 44
    torch.testing.assert_close(first.forward(x[:, :256], "torch") + last.forward(x[:, 256:], "torch"),
                               module(x, backend="torch"), rtol=1e-5, atol=1e-4)
    with pytest.raises(ShardingError, match="groups of 256 inputs cannot be split at \\[150, 300\\)"):
        slice_module(desc, tensors, ROW, 150, 150, "m")
