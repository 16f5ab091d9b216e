"""Property-based tests of ``PackedLowRankLinear``: random shapes (1 included), storages, activation
dtypes and layouts, biases, empty batches, NaN placements and bad inputs. Every call either matches the
float64 product of the module's own de-quantised weight within its tolerance or raises a clear
TypeError / ValueError; never a wrong answer. A row of x holding NaN or Inf gives a row of non-finite
outputs and leaves the other rows alone.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from zssvd.nn import PackedLowRankLinear  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Norm-relative error against float64 of the stored values: the activations' rounding, the rank-k
# intermediate's, and on the CPU fp8's one-time int8 re-encoding (zskernels/_cpu.py).
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
REENCODED = {"fp8": 2e-2}
STORAGES = ["fp32", "fp16", "bf16", "remap", "fp8", "int4"]
PROFILE = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _module(storage: str, out: int, in_: int, k: int, with_bias: bool, gen) -> PackedLowRankLinear:
    U, V = torch.randn(out, k, generator=gen) * 0.3, torch.randn(in_, k, generator=gen) * 0.3
    bias = torch.randn(out, generator=gen) if with_bias else None
    return PackedLowRankLinear.from_factors(U, V, bias, storage=storage)


@PROFILE
@given(storage=st.sampled_from(STORAGES), out=st.integers(1, 40), in_=st.integers(1, 40), k_frac=st.floats(0, 1),
       rows=st.sampled_from([(0,), (1,), (3,), (2, 5)]), dtype=st.sampled_from(list(DTYPES)),
       strided=st.booleans(), with_bias=st.booleans(), poison=st.sampled_from(["clean", "nan", "-inf"]),
       seed=st.integers(0, 2**16))
def test_packed_linear_matches_float64_or_refuses(storage, out, in_, k_frac, rows, dtype, strided, with_bias,
                                                  poison, seed):
    gen = torch.Generator().manual_seed(seed)
    k = 1 + int(k_frac * (min(out, in_) - 1))
    module = _module(storage, out, in_, k, with_bias, gen)
    dtype = DTYPES[dtype]
    full = torch.randn(*rows, in_ * (2 if strided else 1), generator=gen).to(dtype)
    poisoned = poison != "clean" and full.numel() > 0
    if poisoned:
        full.view(-1, full.shape[-1])[0, 0] = float(poison)  # row 0, column 0: kept by the ::2 slice
    x = full[..., ::2] if strided else full
    y = module(x)
    assert y.dtype == dtype and y.shape == (*rows, out)
    want = x.double().reshape(-1, in_) @ module.dense_weight().double().T
    if module.bias is not None:
        want = want + module.bias.double()
    got = y.double().reshape(-1, out)
    if poisoned:
        assert not torch.isfinite(got[0]).any()  # a NaN or Inf input poisons its own row
        got, want = got[1:], want[1:]
    assert torch.isfinite(got).all()  # and no other
    if got.numel():
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        assert err < RTOL[dtype] + REENCODED.get(storage, 0) + (1e-2 if storage == "int4" else 0), err


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("bad", ["int", "wrong_width", "scalar", "list"])
def test_packed_linear_bad_inputs_are_clear_errors(storage, bad):
    module = _module(storage, 12, 8, 4, True, torch.Generator().manual_seed(0))
    x = {"int": torch.ones(2, 8, dtype=torch.int64), "wrong_width": torch.randn(2, 7),
         "scalar": torch.tensor(1.0), "list": [[1.0] * 8]}[bad]
    with pytest.raises((TypeError, ValueError), match="PackedLowRankLinear"):
        module(x)


def test_packed_linear_refuses_a_bias_of_the_wrong_length_when_built():
    with pytest.raises(ValueError, match=r"bias must be a floating-point tensor of shape \(12,\)"):
        PackedLowRankLinear.from_factors(torch.randn(12, 3), torch.randn(8, 3), torch.randn(11), storage="bf16")


def test_fp16_overflow_is_refused_not_stored_as_inf():
    with pytest.raises(ValueError, match="overflow fp16"):
        PackedLowRankLinear.from_factors(torch.randn(12, 3) * 1e5, torch.randn(8, 3), storage="fp16")
