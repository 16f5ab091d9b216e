"""Weight-gradient sinks and block streaming (accelerate offload) in the calibration pass."""
import pytest
import torch
from tiny_models import ARCHS, random_windows, tiny_model

from zssvd.config import CompressionConfig
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.gradients import calibration_pass, next_token_loss_sum
from zssvd.io.models import assign_input_groups, find_blocks, find_targets
from zssvd.runtime.offload import streamed_blocks


def _targets(model, ids):
    return assign_input_groups(model, find_targets(model), ids[:1, :8])


def _autograd_weight_grads(model, targets, ids):
    """dL/dW of the mean loss by plain autograd on the parameters (float64 model)."""
    model.zero_grad()
    loss = next_token_loss_sum(model(ids, use_cache=False).logits, ids) / (ids.shape[0] * (ids.shape[1] - 1))
    loss.backward()
    grads = {t.name: t.module.weight.grad.clone() for t in targets}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_sinks_equal_autograd_weight_gradients(arch):
    model = tiny_model(arch, dtype=torch.float64).eval()
    ids = random_windows(4, 12, seed=3)
    targets = _targets(model, ids)
    expected = _autograd_weight_grads(model, targets, ids)
    result = calibration_pass(model, targets, ids, micro_batch=3)
    for name, g in expected.items():  # float32 sums: errors of a few ulps of the largest entry
        torch.testing.assert_close(result.grads[name].double(), g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert all(p.grad is None for p in model.parameters())  # nothing allocated on the parameters


def _pass_with_statistics(model, ids, **kwargs):
    targets = _targets(model, ids)
    collector = CovarianceCollector(targets, device="cpu")
    result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, **kwargs)
    return result, collector.covariances()


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_streamed_pass_equals_the_resident_one(offload, checkpointing, tmp_path):
    model = tiny_model("llama")
    ids = random_windows(4, 16, seed=5)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    expected, expected_cov = _pass_with_statistics(model, ids)
    folder = str(tmp_path / "offload") if offload == "disk" else "cpu"
    result, cov = _pass_with_statistics(model, ids, offload=folder, device="cpu", checkpointing=checkpointing)
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    for name, g in expected.grads.items():
        torch.testing.assert_close(result.grads[name], g, rtol=1e-4, atol=1e-7)
    for group, c in expected_cov.items():
        torch.testing.assert_close(cov[group], c)
    # every weight is back, unchanged, on the CPU, with no hooks left and no offload files left behind
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].device.type == "cpu"
        assert torch.equal(after[name], value), name
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    if offload == "disk":
        assert list((tmp_path / "offload").iterdir()) == []


def test_only_one_block_is_resident_at_a_time():
    model = tiny_model("llama")
    ids = random_windows(2, 8, seed=1)
    _, blocks = find_blocks(model)
    resident_counts = []

    def resident_blocks():
        return sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks)

    def inside_block(module, args, output):  # runs while the block's own weights are loaded
        resident_counts.append(resident_blocks())

    targets = _targets(model, ids)
    handles = [b.mlp.down_proj.register_forward_hook(inside_block) for b in blocks]
    with streamed_blocks(model, None, "cpu", "cpu"):
        assert resident_blocks() == 0
        calibration_pass(model, targets, ids, micro_batch=1, offload=None, device="cpu", checkpointing=True)
    for h in handles:
        h.remove()
    # two micro-batches x (forward + recomputation) per block, each time exactly one block loaded
    assert resident_counts == [1] * (4 * len(blocks))


def test_offload_refuses_a_model_that_is_not_in_cpu_memory():
    model = tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="CPU memory"):
        with streamed_blocks(model, None, "cpu", "cpu"):
            pass


@pytest.mark.parametrize("variant", ["offload", "block order"])
def test_compress_with_offload_or_in_block_order_equals_the_plain_run(variant, tmp_path):
    import zssvd
    from zssvd.stages.calibration import CalibrationSet
    from zssvd.pipeline import AnalysisOptions

    ids = random_windows(6, 16, seed=2)
    changed = dict(offload=str(tmp_path), device="cpu") if variant == "offload" else dict(pass_order="block")
    outputs = []
    for settings in ({}, changed):  # zero-sum-2nd and a correction round: every gradient pass is exercised
        calib = CalibrationSet(ids, "random")
        model, report = zssvd.compress(tiny_model("qwen2"), calib,
                                       CompressionConfig(ratio=0.6, strategy="zero-sum-2nd", corrections=1),
                                       options=AnalysisOptions(**settings))
        with torch.no_grad():
            outputs.append((report["ranks"], report["correction_losses"], model(ids[:2]).logits))
    (ranks_a, losses_a, logits_a), (ranks_b, losses_b, logits_b) = outputs
    assert ranks_a == ranks_b
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [["--offload", "cpu"], ["--pass-order", "block"]])
def test_scale_benchmark_smoke_run(mode, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    import compress_scale

    assert compress_scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--samples", "2",
                                "--seq-len", "32", *mode]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["offload"] == ("cpu" if "--offload" in mode else None)
    assert row["pass_order"] == ("block" if "--pass-order" in mode else "batch")
    assert row["achieved_ratio"] <= 0.8 and {"calibration_pass", "decomposition"} <= set(row["timings"])
    cfg = compress_scale.PRESETS["tiny"]
    h, f, n_layers, vocab = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    linear = n_layers * (4 * h * h + 3 * h * f) + vocab * h  # multi-head attention: k/v are h x h too
    floor = compress_scale.flop_floor(cfg, samples=2, seq_len=32)
    assert floor["forward"] == 2 * 64 * linear + n_layers * 2 * 64 * 32 * h
    assert floor["backward"] == 2 * floor["forward"]


def test_statistics_can_accumulate_off_the_execution_device():
    from zssvd.stages.calibration import CalibrationSet
    from zssvd.pipeline import AnalysisOptions, analyze

    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=8), "random")
    plain = analyze(model, calib, AnalysisOptions())
    moved = analyze(model, calib, AnalysisOptions(statistics_device="cpu", device="cpu"))
    for name, scores in plain.scores.items():
        torch.testing.assert_close(moved.scores[name], scores)


def test_batch_order_statistics_never_stay_on_the_execution_device():
    """With a statistics device, nothing accumulates where the model runs ("meta" stands in for the host)."""
    model = tiny_model("llama")
    ids = random_windows(4, 16, seed=8)
    targets = _targets(model, ids)
    collector = CovarianceCollector(targets, device="meta")
    result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, grad_device="meta")
    assert collector.sums and all(s.device.type == "meta" for s in collector.sums.values())
    assert all(g.device.type == "meta" for g in result.grads.values())
