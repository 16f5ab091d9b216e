"""``PackedLowRankLinear`` / ``PackedDenseLinear`` and the storage registry, on their own."""
import pytest
import torch
from torch import nn

from zssvd.nn import (LOWRANK_STORAGES, STORAGES, LowRankStorage, PackedDenseLinear, PackedLowRankLinear,
                      describe_packed, module_from_description, register_storage)

TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2, "remap": 5e-2, "fp8": 1e-1, "int4": 2e-1}


def _factors(rng, out=24, inp=40, rank=6):
    return torch.randn(out, rank, generator=rng), torch.randn(inp, rank, generator=rng), torch.randn(out, generator=rng)


@pytest.mark.parametrize("storage", LOWRANK_STORAGES)
def test_forward_matches_the_factors_it_stores(storage, rng):
    U, V, bias = _factors(rng)
    module = PackedLowRankLinear.from_factors(U, V, bias, storage=storage)
    x = torch.randn(3, 40, generator=rng)
    reference = x @ (U @ V.T).T + bias
    y = module(x, backend="torch")
    assert y.shape == (3, 24)
    scale = reference.abs().max()
    assert (y - reference).abs().max() <= TOLERANCE[storage] * scale
    su, sv = module.factors()
    torch.testing.assert_close(y, x @ (su @ sv.T).T + bias, rtol=1e-2, atol=1e-2 * float(scale))


@pytest.mark.parametrize("storage", LOWRANK_STORAGES)
def test_describe_round_trips_to_an_empty_module_of_the_same_layout(storage, rng):
    U, V, bias = _factors(rng)
    module = PackedLowRankLinear.from_factors(U, V, bias, storage=storage)
    desc = module.describe()
    assert desc["kind"] == "lowrank" and desc["storage"] == storage and desc["rank"] == 6
    assert desc["nbytes"] == module.nbytes() == STORAGES[storage].nbytes(module.packed()) + 4 * 24
    empty = module_from_description(desc)
    assert empty.describe() == desc
    empty.load_state_dict(module.state_dict())
    x = torch.randn(2, 40, generator=rng)
    torch.testing.assert_close(empty(x, backend="torch"), module(x, backend="torch"))


def test_to_linear_is_the_dense_reference(rng):
    U, V, bias = _factors(rng)
    module = PackedLowRankLinear.from_factors(U, V, bias, storage="fp32")
    linear = module.to_linear()
    x = torch.randn(2, 40, generator=rng)
    torch.testing.assert_close(linear(x), module(x), rtol=1e-5, atol=1e-4)


def test_a_new_storage_is_one_registry_entry(rng):
    halves = LowRankStorage("test-halves", pack=lambda U, V: {"u": U.half(), "v": V.half()},
                            forward=lambda x, t, bias, backend: x @ t["v"].to(x.dtype) @ t["u"].to(x.dtype).T,
                            unpack=lambda t: (t["u"].float(), t["v"].float()))
    register_storage(halves)
    try:
        U, V, _ = _factors(rng)
        module = PackedLowRankLinear.from_factors(U, V, storage="test-halves")
        x = torch.randn(2, 40, generator=rng)
        torch.testing.assert_close(module(x), x @ V @ U.T, rtol=1e-2, atol=1e-1)
        assert module_from_description(module.describe()).storage == "test-halves"
    finally:
        del STORAGES["test-halves"]


@pytest.mark.parametrize("bad", [
    pytest.param(dict(storage="int3"), id="unknown-storage"),
    pytest.param(dict(U=torch.ones(4, 2), V=torch.ones(5, 3)), id="ranks-differ"),
    pytest.param(dict(U=torch.full((4, 2), float("nan")), V=torch.ones(5, 2)), id="nan-factors"),
])
def test_bad_factors_are_refused(bad):
    args = dict(U=torch.ones(4, 2), V=torch.ones(5, 2), storage="fp32") | bad
    with pytest.raises(ValueError):
        PackedLowRankLinear.from_factors(args.pop("U"), args.pop("V"), **args)


def test_describe_packed_lists_every_packed_module(rng):
    U, V, bias = _factors(rng)
    model = nn.Sequential(nn.Linear(40, 40), PackedLowRankLinear.from_factors(U, V, bias, storage="fp16"),
                          PackedDenseLinear.from_weight(torch.randn(8, 24, generator=rng)))
    manifest = describe_packed(model)
    assert list(manifest) == ["1", "2"]
    assert manifest["1"]["kind"] == "lowrank" and manifest["2"]["kind"] == "dense"


@pytest.mark.parametrize("storage, options", [("fp8", {}), ("int4", {"group_size": 32}), ("int4", {})])
def test_dense_storages_compute_with_the_weight_they_store(storage, options, rng):
    weight, bias = torch.randn(24, 80, generator=rng), torch.randn(24, generator=rng)
    module = PackedDenseLinear.from_weight(weight, bias, storage=storage, **options)
    x = torch.randn(3, 80, generator=rng)
    y = module(x, backend="torch")
    torch.testing.assert_close(y, x @ module.dense_weight().T + bias, rtol=1e-4, atol=1e-4)
    assert (module.dense_weight() - weight).abs().max() <= 0.1 * weight.abs().max()  # 4 bits: 1/30 of a range
    desc = module.describe()
    assert desc["storage"] == storage and desc["nbytes"] == module.nbytes()
    empty = module_from_description(desc)
    assert empty.describe() == desc
    empty.load_state_dict(module.state_dict())
    torch.testing.assert_close(empty(x, backend="torch"), y, rtol=0, atol=0)


def test_int4_dense_bytes_are_the_formats_and_its_group_size_is_in_the_shapes(rng):
    from zskernels.formats.int4 import check_int4, int4_nbytes_for_shape

    module = PackedDenseLinear.from_weight(torch.randn(24, 80, generator=rng), storage="int4", group_size=32)
    assert module.nbytes() == int4_nbytes_for_shape(24, 80, 32)  # 80 -> 96 padded: 3 groups per row
    assert check_int4(module.kernel_tensors())[2] == 32  # a checkpoint's shapes give the group size back
    assert module.weight_in_features.item() == 80 and module.in_features == 80


def test_unknown_dense_storage_is_refused():
    with pytest.raises(ValueError, match="storage must be one of"):
        PackedDenseLinear.from_weight(torch.ones(4, 4), storage="int3")
