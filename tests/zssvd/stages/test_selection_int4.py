"""Selection under the int4 budget: exact byte costs, the round-to-nearest ceiling, the rules within it."""
import pytest
import torch

from zskernels.formats.int4 import int4_nbytes_for_shape, pack_int4_lowrank
from zssvd.nn.packed_linear import tensor_bytes
from zssvd.stages.selection import (INT4_HEADER_SLACK, STRATEGIES, RatioError, check_ratio_range, int4_bits,
                                    select, stays_dense, storage_cost)

from test_selection import _problem  # SHAPES there: 160 and 144 are not multiples of 64, so rows get padded


@pytest.mark.parametrize("m, n, k, g", [(192, 128, 5, 64), (160, 144, 70, 64), (96, 96, 96, 32), (40, 100, 17, 16)])
def test_cost_is_the_packed_bytes_over_two(m, n, k, g):
    rng = torch.Generator().manual_seed(1)
    U, V = torch.randn(m, k, generator=rng), torch.randn(n, k, generator=rng)
    lowrank = tensor_bytes(pack_int4_lowrank(U, V, g)) / 2
    dense = int4_nbytes_for_shape(m, n, g) / 2
    assert storage_cost("int4", m, n, k, g) == min(lowrank, dense)
    assert stays_dense("int4", m, n, k, g) == (lowrank >= dense)


def test_dense_int4_costs_b_over_16_of_the_16_bit_size():
    assert int4_bits(64) == 4.5 and int4_bits(32) == 5.0
    m, n = 256, 512  # g divides n: only the 8-byte header on top of b/16
    assert storage_cost("int4", m, n, min(m, n), 64) == m * n * 4.5 / 16 + 4


def test_at_the_ceiling_nothing_is_factorised():
    specs, scores, sigmas = _problem(shapes=[(1024, 1024), (1024, 2048), (2048, 1024)])
    ratio = int4_bits(64) / 16 + INT4_HEADER_SLACK  # round-to-nearest with its headers
    for strategy in ("zero-sum", "uniform"):
        sel = select(specs, scores, sigmas, ratio=ratio, storage="int4", strategy=strategy)
        assert all(sel.dense.values()) and not sel.removed
        assert sel.ranks == {s.name: s.rank for s in specs}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("group_size", [64, 32])
def test_budget_is_met_from_below_with_exact_costs(strategy, group_size):
    specs, scores, sigmas = _problem()
    ratio = 0.2
    curvature = {n: v.abs() * 0.5 for n, v in scores.items()}
    sel = select(specs, scores, sigmas, ratio=ratio, storage="int4", strategy=strategy, curvature=curvature,
                 group_size=group_size)
    assert sel.group_size == group_size and sel.storage == "int4"
    total = sum(s.params for s in specs)
    cost = sum(storage_cost("int4", s.out_features, s.in_features, sel.ranks[s.name], group_size) for s in specs)
    assert sel.achieved_ratio == pytest.approx(cost / total)
    assert sel.achieved_ratio <= ratio
    # Short of the budget by at most one removal's saving: a component, or a whole group of U's columns
    step = max(storage_cost("int4", s.out_features, s.in_features, k, group_size)
               - storage_cost("int4", s.out_features, s.in_features, k - 1, group_size)
               for s in specs for k in range(1, s.rank + 1))
    assert ratio - sel.achieved_ratio <= (0.05 if strategy == "uniform" else step / total)
    for s in specs:
        assert sel.dense[s.name] == stays_dense("int4", s.out_features, s.in_features, sel.ranks[s.name], group_size)
    assert not all(sel.dense.values())


def test_uniform_keeps_the_largest_rank_within_the_ratio_per_matrix():
    specs, scores, sigmas = _problem()
    sel = select(specs, scores, sigmas, ratio=0.15, storage="int4", strategy="uniform")
    for s in specs:
        m, n, k = s.out_features, s.in_features, sel.ranks[s.name]
        assert storage_cost("int4", m, n, k) <= 0.15 * m * n < storage_cost("int4", m, n, k + 1)


@pytest.mark.parametrize("ratio, group_size, message", [
    (0.3, 64, "reaches at most ratio 0.28125"),
    (0.32, 32, "reaches at most ratio 0.3125"),
    (0.2, 40, "multiple of 16"),
])
def test_ratios_and_group_sizes_int4_cannot_meet_are_refused(ratio, group_size, message):
    with pytest.raises(ValueError, match=message):
        check_ratio_range(ratio, "int4", group_size)


def test_error_names_the_other_storages():
    with pytest.raises(RatioError, match="use --storage hq"):
        check_ratio_range(0.4, "int4")
    check_ratio_range(0.3, "int4", 32)  # smaller groups reach further: 5 bits, 0.3125


def test_a_ratio_below_rank_one_factors_is_refused():
    specs, scores, sigmas = _problem()
    with pytest.raises(RatioError, match="below the smallest reachable"):
        select(specs, scores, sigmas, ratio=0.01, storage="int4")
