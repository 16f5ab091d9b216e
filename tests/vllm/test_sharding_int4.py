"""Tensor-parallel slices of int4 layouts (plain torch; runs without vLLM too).

Output rows slice with their groups; input slices must be whole groups of the stored group size.
"""
import pytest
import torch

from zssvd.io.vllm.sharding import COLUMN, ROW, WHOLE, ShardingError, slice_module
from zssvd.nn.packed_linear import PackedDenseLinear, PackedLowRankLinear
from zssvd.stages.packing import pack_lowrank

# (out, in, rank): 96 inputs split into whole groups of 16 at tp 2 and 3 (2 x 48, 3 x 32); rank 20 and 40 leave
# U's last group padded, rank 7 is below one group.
SHAPES = [(48, 96, 20), (96, 96, 40), (36, 96, 7)]


def _module(kind, shape, gen):
    out_f, in_f, k = shape
    if kind == "dense-int4":
        return PackedDenseLinear.from_weight(torch.randn(out_f, in_f, generator=gen), storage="int4", group_size=16)
    U, V = torch.randn(out_f, k, generator=gen), torch.randn(in_f, k, generator=gen)
    return pack_lowrank(U, V, None, "int4", {"group_size": 16})


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
