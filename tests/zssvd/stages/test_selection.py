"""Selection: order, budget, the running-sum rule, SVD-LLM's uniform ranks, ablations, errors."""
import pytest
import torch

from zssvd.stages.selection import STRATEGIES, MatrixSpec, RatioError, select, storage_cost

SHAPES = [(192, 128), (128, 192), (160, 160), (320, 96), (96, 96), (240, 144)]


def _problem(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    specs = [MatrixSpec(f"m{i}", m, n) for i, (m, n) in enumerate(shapes)]
    scores = {s.name: torch.randn(s.rank, generator=g, dtype=torch.float64) * 1e-3 for s in specs}
    sigmas = {s.name: torch.rand(s.rank, generator=g, dtype=torch.float64).sort(descending=True).values
              for s in specs}
    return specs, scores, sigmas


@pytest.mark.parametrize("storage", ["dense", "remap", "hq"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ordered", [True, False])
def test_budget_is_met_from_below_and_within_one_percent(storage, strategy, ordered):
    specs, scores, sigmas = _problem()
    ratio = 0.4 if storage == "hq" else 0.6
    curvature = {n: v.abs() * 0.5 for n, v in scores.items()}  # used by zero-sum-2nd only
    sel = select(specs, scores, sigmas, ratio=ratio, storage=storage, strategy=strategy, ordered=ordered,
                 curvature=curvature)
    total = sum(s.params for s in specs)
    cost = sum(storage_cost(storage, s.out_features, s.in_features, sel.ranks[s.name]) for s in specs)
    assert sel.achieved_ratio == pytest.approx(cost / total)
    assert sel.achieved_ratio <= ratio + 1e-12
    assert ratio - sel.achieved_ratio < 0.01 or strategy == "uniform"  # uniform rounds per matrix
    assert ratio - sel.achieved_ratio < 0.05


@pytest.mark.parametrize("strategy", ["zero-sum", "most-negative", "abs-dl", "sigma"])
def test_ordered_selection_removes_each_matrix_from_the_smallest_sigma_up(strategy):
    specs, scores, sigmas = _problem(1)
    sel = select(specs, scores, sigmas, ratio=0.5, strategy=strategy)
    for s in specs:
        assert torch.equal(sel.keep[s.name], torch.arange(sel.ranks[s.name]))
    positions = {}
    for name, j in sel.removed:  # and in that order over time, too
        assert positions.get(name, j + 1) == j + 1
        positions[name] = j


def test_zero_sum_follows_the_running_sum_rule():
    specs, scores, sigmas = _problem(2)
    sel = select(specs, scores, sigmas, ratio=0.5, strategy="zero-sum")
    running, tails = 0.0, {s.name: s.rank - 1 for s in specs}
    for step, (name, j) in enumerate(sel.removed):
        candidates = [(abs(scores[n][t].item()), n) for n, t in tails.items() if t >= 1]
        positive = [c for c in candidates if scores[c[1]][tails[c[1]]] >= 0]
        negative = [c for c in candidates if scores[c[1]][tails[c[1]]] < 0]
        preferred = (positive if running <= 0 else negative) or (negative if running <= 0 else positive)
        assert min(preferred)[1] == name, f"step {step}"
        before, running = running, running + scores[name][j].item()
        assert sel.running_sum[step] == pytest.approx(running)
        if positive and negative:  # a free choice never pushes s further from zero than one step
            assert abs(running) <= max(abs(before), abs(scores[name][j].item())) + 1e-15
        tails[name] -= 1


@pytest.mark.parametrize("ratio", [0.8, 0.6, 0.4], ids=lambda r: f"ratio={r}")
def test_uniform_reproduces_svd_llm_ranks(ratio):
    specs, scores, sigmas = _problem()
    sel = select(specs, scores, sigmas, ratio=ratio, strategy="uniform")
    for s in specs:
        m, n = s.out_features, s.in_features
        assert sel.ranks[s.name] == int(ratio * m * n / (m + n))
        assert not sel.dense[s.name]


def test_remap_and_hq_uniform_ranks():
    specs, scores, sigmas = _problem()
    remap = select(specs, scores, sigmas, ratio=0.6, storage="remap", strategy="uniform")
    hq = select(specs, scores, sigmas, ratio=0.4, storage="hq", strategy="uniform")
    for s in specs:
        m, n = s.out_features, s.in_features
        assert remap.ranks[s.name] == int(0.6 * min(m, n))
        assert hq.ranks[s.name] == min(s.rank, int(0.8 * m * n / (m + n)))


def test_dense_storage_keeps_matrices_above_rstar_dense():
    specs, scores, sigmas = _problem(3)
    sel = select(specs, scores, sigmas, ratio=0.9, strategy="zero-sum")
    for s in specs:
        k, m, n = sel.ranks[s.name], s.out_features, s.in_features
        assert sel.dense[s.name] == (k * (m + n) >= m * n)
    assert any(sel.dense.values())


def test_no_order_may_remove_inner_components():
    specs, scores, sigmas = _problem(4)
    sel = select(specs, scores, sigmas, ratio=0.5, strategy="abs-dl", ordered=False)
    assert any(not torch.equal(sel.keep[s.name], torch.arange(sel.ranks[s.name])) for s in specs)
    # With no order, abs-dl removes exactly the globally smallest |dL| among the removed matrices' comps.
    removed = [abs(scores[n][j].item()) for n, j in sel.removed]
    assert removed == sorted(removed)


def test_selection_is_deterministic():
    specs, scores, sigmas = _problem(5)
    a = select(specs, scores, sigmas, ratio=0.55)
    b = select(specs, scores, sigmas, ratio=0.55)
    assert a.removed == b.removed


@pytest.mark.parametrize("ratio, storage, message", [
    (0.0, "dense", "strictly between 0 and 1"),
    (1.0, "dense", "strictly between 0 and 1"),
    (1e-4, "dense", "below the smallest reachable"),
    (0.7, "hq", "use --storage remap"),
])
def test_impossible_ratios_raise(ratio, storage, message):
    specs, scores, sigmas = _problem()
    with pytest.raises(RatioError, match=message):
        select(specs, scores, sigmas, ratio=ratio, storage=storage)


def test_unknown_strategy_and_storage():
    specs, scores, sigmas = _problem()
    with pytest.raises(ValueError, match="strategy must be one of"):
        select(specs, scores, sigmas, ratio=0.5, strategy="greedy")
    with pytest.raises(ValueError, match="storage must be one of"):
        select(specs, scores, sigmas, ratio=0.5, storage="int2")


@pytest.mark.parametrize("strategy", ["zero-sum", "zero-sum-2nd", "uniform", "sigma"])
@pytest.mark.parametrize("storage", ["remap", "hq"])
def test_rank_multiple_keeps_factorised_ranks_in_blocks(storage, strategy):
    """With rank_multiple 16, a matrix of rank >= 128 that is factorised keeps a multiple of 16 components
    (its smallest ones leave first, in blocks); smaller matrices keep any rank; the budget still holds."""
    specs, scores, sigmas = _problem(2)
    ratio = 0.3 if storage == "hq" else 0.5
    curvature = {n: v.abs() * 0.5 for n, v in scores.items()}
    sel = select(specs, scores, sigmas, ratio=ratio, storage=storage, strategy=strategy, rank_multiple=16,
                 curvature=curvature)
    assert sel.achieved_ratio <= ratio + 1e-12 and ratio - sel.achieved_ratio < 0.05
    for s in specs:
        k = sel.ranks[s.name]
        assert sel.keep[s.name].tolist() == list(range(k))  # still the largest sigmas
        if s.rank >= 128 and not sel.dense[s.name]:
            assert k % 16 == 0, (s, k)


def test_rank_multiple_block_scores_are_the_sums_of_their_components():
    """A block leaves as one candidate scored by its summed dL: a block whose components cancel goes first."""
    specs = [MatrixSpec("a", 128, 128), MatrixSpec("b", 128, 128)]
    scores = {"a": torch.full((128,), 1e-3, dtype=torch.float64), "b": torch.zeros(128, dtype=torch.float64)}
    scores["b"][-16:] = torch.tensor([5e-3, -5e-3] * 8, dtype=torch.float64)  # large, but summing to zero
    sigmas = {n: torch.linspace(1, 0.1, 128, dtype=torch.float64) for n in scores}
    sel = select(specs, scores, sigmas, ratio=0.9, storage="remap", rank_multiple=16)
    assert sel.removed[:16] == [("b", j) for j in range(127, 111, -1)]
    with pytest.raises(ValueError, match="rank_multiple"):
        select(specs, scores, sigmas, ratio=0.9, storage="remap", rank_multiple=0)
