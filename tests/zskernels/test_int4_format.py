"""int4 storage (zskernels/formats/int4.py): round-to-nearest bound, layout, padding, bytes, errors."""
import pytest
import torch

import zskernels as zk
from zskernels.formats import int4

SHAPES = [(1, 1), (3, 1), (1, 17), (37, 23), (5, 64), (4, 130), (2, 200)]  # K=1, odd K, K % g != 0, N=1
GROUPS = [16, 48, 64, 128]


def _group_scales(packed, k):
    g = 2 * packed["codes"].shape[1] // packed["scales"].shape[1]
    return packed["scales"].float().repeat_interleave(g, dim=1)[:, :k]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_round_trip_within_half_a_step(shape, group_size, rng):
    w = torch.randn(*shape, generator=rng) * 3 + 0.5
    packed = zk.quantize_int4(w, group_size)
    w_hat = zk.dequantize_int4(packed)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    step = _group_scales(packed, shape[1])
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert int(packed["in_features"]) == shape[1]
    kp = -(-shape[1] // group_size) * group_size
    assert packed["codes"].shape == (shape[0], kp // 2) and packed["scales"].shape == (shape[0], kp // group_size)


def test_layout_low_nibble_first_and_min_scale_formula():
    w = torch.tensor([[0.0, 15.0] + [7.0] * 14])  # one group of 16: min 0, max 15 -> scale 1
    packed = zk.quantize_int4(w, 16)
    assert packed["codes"][0, 0] == 0 | (15 << 4) and packed["codes"][0, 1] == 7 | (7 << 4)
    assert packed["scales"].item() == 1.0 and packed["mins"].item() == 0.0
    assert torch.equal(zk.dequantize_int4(packed), w)


def test_constant_groups_are_exact_and_padding_never_widens_a_group():
    w = torch.full((2, 20), -0.3)
    w[1, 16:] = 2.0  # second group of row 1: constant, padded with its own value
    w_hat = zk.dequantize_int4(zk.quantize_int4(w, 16))
    assert torch.allclose(w_hat, w, atol=1e-3)
    assert torch.equal(w_hat[1, 16:], torch.full((4,), 2.0))


def test_bits_per_weight_matches_the_stored_bytes(rng):
    for g in (32, 64, 128):
        packed = zk.quantize_int4(torch.randn(48, 4 * g, generator=rng), g)
        payload = sum(t.numel() * t.element_size() for n, t in packed.items() if n != "in_features")
        assert payload * 8 == zk.int4_bits_per_weight(g) * 48 * 4 * g
        total = sum(t.numel() * t.element_size() for t in packed.values())
        assert total == int4.int4_nbytes_for_shape(48, 4 * g, g)
    assert int4.int4_nbytes_for_shape(3, 65, 64) == sum(
        t.numel() * t.element_size() for t in zk.quantize_int4(torch.randn(3, 65), 64).values())


def test_lowrank_pack_round_trip(rng):
    U, V = torch.randn(37, 9, generator=rng), torch.randn(23, 9, generator=rng)
    packed = zk.pack_int4_lowrank(U, V, group_size=16)
    assert set(packed) == {p + k for p in ("v_", "u_") for k in int4.KEYS}
    u_hat, v_hat = zk.unpack_int4_lowrank(packed)
    assert u_hat.shape == U.shape and v_hat.shape == V.shape
    assert ((V.T - v_hat.T).abs() <= _group_scales({k[2:]: t for k, t in packed.items() if k[:2] == "v_"}, 23) / 2
            * (1 + 1e-5) + 1e-7).all()
    assert ((U - u_hat).abs() <= _group_scales({k[2:]: t for k, t in packed.items() if k[:2] == "u_"}, 9) / 2
            * (1 + 1e-5) + 1e-7).all()


def test_lowrank_factors_may_take_different_group_sizes(rng):
    """V^T in groups of 32, U in groups of 128: each stage's readers take its own size from its shapes."""
    U, V = torch.randn(40, 150, generator=rng), torch.randn(70, 150, generator=rng)
    packed = zk.pack_int4_lowrank(U, V, group_size=32, u_group_size=128)
    assert packed["v_scales"].shape == (150, 3) and packed["u_scales"].shape == (40, 2)  # 70 -> 96 / 32, 150 -> 256 / 128
    u_hat, v_hat = zk.unpack_int4_lowrank(packed)
    assert torch.equal(u_hat, zk.dequantize_int4(zk.quantize_int4(U, 128)))
    assert torch.equal(v_hat.T, zk.dequantize_int4(zk.quantize_int4(V.T, 32)))
    x = torch.randn(3, 70, generator=rng)
    expected = (x @ v_hat) @ u_hat.T
    assert torch.allclose(zk.int4_lowrank_matmul(x, packed), expected, rtol=1e-4, atol=1e-4)


def test_empty_matrices_pack():
    for shape in ((0, 5), (4, 0)):
        packed = zk.quantize_int4(torch.zeros(shape), 16)
        assert zk.dequantize_int4(packed).shape == shape
    u_hat, v_hat = zk.unpack_int4_lowrank(zk.pack_int4_lowrank(torch.zeros(6, 0), torch.zeros(5, 0)))
    assert u_hat.shape == (6, 0) and v_hat.shape == (5, 0)


@pytest.mark.parametrize("bad, kind, words", [
    (dict(w=torch.randn(4)), ValueError, "2-D"),
    (dict(w=torch.tensor([[1.0, float("nan")]])), ValueError, "NaN/Inf"),
    (dict(w=torch.tensor([[1.0, float("inf")]])), ValueError, "NaN/Inf"),
    (dict(w=torch.tensor([[1e6, 0.0]])), ValueError, "float16"),
    (dict(w=torch.ones(2, 2, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(w=torch.ones(2, 2), group_size=24), ValueError, "multiple of 16"),
    (dict(w=torch.ones(2, 2), group_size=0), ValueError, "multiple of 16"),
    (dict(w=torch.ones(2, 2), group_size=64.0), ValueError, "multiple of 16"),
])
def test_bad_inputs_raise_one_line_errors(bad, kind, words):
    with pytest.raises(kind, match=words) as err:
        zk.quantize_int4(**bad)
    assert "\n" not in str(err.value)


def test_bad_packed_dicts_raise(rng):
    packed = zk.quantize_int4(torch.randn(4, 32, generator=rng), 16)
    with pytest.raises(ValueError, match="lacks"):
        zk.dequantize_int4({k: t for k, t in packed.items() if k != "mins"})
    with pytest.raises(TypeError, match="float16"):
        zk.dequantize_int4({**packed, "scales": packed["scales"].float()})
    with pytest.raises(ValueError, match="groups"):
        three = torch.zeros(4, 3, dtype=torch.float16)  # 32 columns do not split into 3 groups
        zk.dequantize_int4({**packed, "scales": three, "mins": three})
    with pytest.raises(ValueError, match="same k"):
        zk.pack_int4_lowrank(torch.randn(4, 3), torch.randn(5, 2))
