"""int4 group sizes chosen by measurement (stages.precision) and the selection's costs with them."""
import pytest
import torch

import zssvd
from zssvd.stages.decompose import whitened_svd
from zssvd.stages.precision import CANDIDATE_GROUPS, Item, all_parts, allocate, measure
from zssvd.stages.selection import int4_cost, int4_matrix_cost, select

from test_selection import _problem


def _cost(item: Item, choice: dict) -> float:
    return item.costs[choice[item.name, item.part]]


def test_allocation_starts_cheapest_and_spends_the_budget_on_the_best_error_per_byte():
    costs = {32: 10.0, 64: 8.0, 128: 7.0}
    big = Item("a", "weight", costs, {32: 1.0, 64: 4.0, 128: 9.0})  # 5 per unit from 128 to 64
    small = Item("b", "weight", costs, {32: 0.1, 64: 0.2, 128: 0.3})  # 0.1 per unit
    assert allocate([big, small], budget=14.0) == {("a", "weight"): 128, ("b", "weight"): 128}
    choice = allocate([big, small], budget=17.0)
    assert choice == {("a", "weight"): 32, ("b", "weight"): 128}  # all 3 units left go to "a"
    assert sum(_cost(it, choice) for it in (big, small)) <= 17.0
    assert allocate([big, small], budget=100.0) == {("a", "weight"): 32, ("b", "weight"): 32}


def test_an_upgrade_that_no_longer_fits_gives_way_to_one_that_does():
    a = Item("a", "v", {32: 20.0, 128: 10.0}, {32: 0.0, 128: 100.0})  # 10 per unit, but 10 units
    b = Item("b", "u", {32: 12.0, 128: 10.0}, {32: 0.0, 128: 4.0})  # 2 per unit, 2 units
    assert allocate([a, b], budget=23.0) == {("a", "v"): 128, ("b", "u"): 32}


def test_a_budget_below_the_cheapest_choice_is_refused():
    item = Item("a", "weight", {32: 10.0, 128: 7.0}, {32: 1.0, 128: 2.0})
    with pytest.raises(ValueError, match="choose a larger ratio"):
        allocate([item], budget=6.0)


def test_the_outlier_heavy_matrix_gets_the_finer_groups():
    rng = torch.Generator().manual_seed(0)
    smooth = torch.randn(64, 256, generator=rng) * 0.05
    outliers = torch.randn(64, 256, generator=rng) * 0.05
    outliers[:, torch.randperm(256, generator=rng)[:8]] *= 40  # a few large inputs in every row
    S = torch.eye(256)
    items = [measure(name, True, w, None, S, CANDIDATE_GROUPS)[0] for name, w in (("smooth", smooth),
                                                                                 ("outliers", outliers))]
    budget = items[0].costs[256] + items[1].costs[32]  # one matrix at the finest groups, one at the coarsest
    choice = allocate(items, budget)
    assert choice == {("smooth", "weight"): 256, ("outliers", "weight"): 32}  # not the other way round
    assert sum(_cost(it, choice) for it in items) == budget


def test_errors_are_measured_at_the_output_under_the_calibration_activations():
    """An input the calibration never excites costs nothing, however badly it is quantised."""
    rng = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=rng)
    W[:, 32:] *= 50  # wide groups over the second half of the inputs
    silent = torch.diag(torch.cat([torch.ones(32), torch.full((32,), 1e-6)]))
    loud = torch.eye(64)
    quiet_item = measure("w", True, W, None, silent, (32, 64))[0]
    loud_item = measure("w", True, W, None, loud, (32, 64))[0]
    assert quiet_item.errors[32] < 1e-3 * loud_item.errors[32]


def test_factor_errors_are_each_factors_output_error():
    rng = torch.Generator().manual_seed(2)
    W, S = torch.randn(48, 96, generator=rng), torch.linalg.cholesky(torch.eye(96) + 0.1 * torch.ones(96, 96))
    f = whitened_svd(W, S)
    keep = torch.arange(20)
    factors = type(f)(f.U[:, keep], f.sigma[keep], f.Z[:, keep])
    v, u = measure("w", False, W, factors, S, (32,))
    from zskernels.formats.int4 import dequantize_int4, quantize_int4

    U, V = factors.balanced_factors()
    U_hat = dequantize_int4(quantize_int4(U, 32))
    expected_u = float((((U - U_hat) @ V.T) @ S).double().square().sum())
    assert (v.part, u.part) == ("v", "u") and u.errors[32] == pytest.approx(expected_u, rel=1e-4)
    assert u.costs[32] == int4_matrix_cost(48, 20, 32) and v.costs[32] == int4_matrix_cost(20, 96, 32)


def test_selection_with_a_group_size_per_part_counts_each_parts_bytes():
    specs, scores, sigmas = _problem()
    choices = [{"weight": 32, "v": 128, "u": 32}, {"weight": 128, "v": 256, "u": 64}]
    sizes = {s.name: choices[i % 2] for i, s in enumerate(specs)}
    sel = select(specs, scores, sigmas, ratio=0.2, storage="int4", group_size="auto", group_sizes=sizes)
    total = sum(s.params for s in specs)
    cost = sum(int4_cost(s.out_features, s.in_features, sel.ranks[s.name], sizes[s.name]) for s in specs)
    assert sel.achieved_ratio == pytest.approx(cost / total) and sel.achieved_ratio <= 0.2
    for s in specs:
        parts = sel.int4_group_sizes(s.name)
        assert set(parts) == ({"weight"} if sel.dense[s.name] else {"v", "u"})
        assert all(sizes[s.name][p] == g for p, g in parts.items())


def test_all_parts_prices_the_other_form_at_the_chosen_size():
    assert all_parts({"a": {"weight": 32}, "b": {"v": 128, "u": 64}}) == {
        "a": {"weight": 32, "v": 32, "u": 32}, "b": {"weight": 128, "v": 128, "u": 64}}


@pytest.mark.parametrize("group_size", ["fine", "Auto"])
def test_a_group_size_that_is_neither_a_size_nor_auto_is_refused_in_one_line(group_size):
    with pytest.raises(ValueError, match="multiple of 16 .* or 'auto'") as error:
        zssvd.CompressionConfig(ratio=0.2, storage="int4", group_size=group_size)
    assert "\n" not in str(error.value)


def test_compress_auto_saves_and_loads_mixed_group_sizes_with_identical_logits(tmp_path):
    """The Python API end to end: measured group sizes differ between factors, the budget holds in the
    packed bytes, and a float32 checkpoint reloads to exactly the in-memory logits."""
    import transformers as tf

    from tiny_models import VOCAB, random_windows
    from zssvd.stages.calibration import CalibrationSet

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = tf.AutoModelForCausalLM.from_config(config)
    calib = CalibrationSet(random_windows(4, 32, seed=3), "random")
    model, report = zssvd.compress(model, calib, zssvd.CompressionConfig(ratio=0.28, storage="int4",
                                                                         group_size="auto"))
    sizes = report["int4_group_sizes"]
    assert len({g for parts in sizes.values() for g in parts.values()}) > 1
    assert report["achieved_bytes_ratio"] == pytest.approx(report["achieved_ratio"], abs=1e-12)
    assert report["achieved_ratio"] <= 0.28
    zssvd.save_compressed(model, tmp_path / "ckpt", report=report, dtype=torch.float32)
    ids = random_windows(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, zssvd.load(tmp_path / "ckpt")(ids).logits)
