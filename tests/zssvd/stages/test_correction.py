"""Correction rounds: ranks stay, calibration loss goes down."""
import copy

import pytest
import torch

from tiny_models import text_windows, trained_tiny_model
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.stages.gradients import calibration_loss
from zssvd.pipeline import AnalysisOptions, analyze, compress


@pytest.fixture(scope="module")
def setup():
    model = trained_tiny_model("llama", steps=80)
    calib = CalibrationSet(text_windows(8, 32, seed=2), "text")
    return model, calib, analyze(model, calib, AnalysisOptions(score_backend="torch"))


def test_a_correction_round_lowers_the_calibration_loss(setup):
    model, calib, analysis = setup
    plain, report0 = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5), analysis=analysis)
    corrected, report1 = compress(copy.deepcopy(model), calib,
                                  CompressionConfig(ratio=0.5, corrections=1), analysis=analysis)
    loss_plain = calibration_loss(plain, calib.input_ids)
    loss_corrected = calibration_loss(corrected, calib.input_ids)
    assert loss_corrected < loss_plain
    assert report1["ranks"] == report0["ranks"]  # ranks never change
    losses = report1["correction_losses"]
    assert losses[0] == pytest.approx(loss_plain, rel=1e-5)  # loss at truncation, then after the round
    assert losses[-1] == pytest.approx(loss_corrected, rel=1e-5)
    assert report1["correction_loss"] == losses[-1] and report1["correction_step_scales"] == [1.0]


def test_more_rounds_keep_lowering_the_loss(setup):
    model, calib, analysis = setup
    _, report = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5, corrections=3), analysis=analysis)
    losses = report["correction_losses"]
    assert len(losses) == 4
    assert losses[-1] < losses[0]


def test_negative_rounds_are_rejected(setup):
    model, calib, analysis = setup
    with pytest.raises(ValueError, match="corrections must be an integer >= 0"):
        compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5, corrections=-1), analysis=analysis)


def test_original_weights_are_restored_in_untouched_modules(setup):
    model, calib, analysis = setup
    dense_before = {n: p.clone() for n, p in model.named_parameters()}
    out, report = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.7, corrections=1), analysis=analysis)
    for name in report["kept_dense"]:
        torch.testing.assert_close(out.get_submodule(name).weight, dense_before[name + ".weight"], rtol=0, atol=0)


def test_a_round_that_raises_the_loss_is_undone_and_retried_with_half_the_step(setup, monkeypatch):
    """Make every step overshoot (x40): each round is worse than the truncation, so the step keeps
    halving, and the factors returned are still those with the lowest calibration loss."""
    import zssvd.stages.correction as correction

    model, calib, analysis = setup
    plain_step = correction._projected_step
    monkeypatch.setattr(correction, "_projected_step", lambda g, removed: 40.0 * plain_step(g, removed))
    out, report = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5, corrections=3), analysis=analysis)
    losses, scales = report["correction_losses"], report["correction_step_scales"]
    assert len(losses) == 4 and len(scales) == 3
    assert scales[0] == 1.0 and all(b in (a, a / 2) for a, b in zip(scales, scales[1:]))
    rejected = [i for i in range(1, 4) if losses[i] >= min(losses[:i])]
    assert rejected  # the 40x step does overshoot at least once
    assert scales[-1] == 0.5 ** len([i for i in rejected if i < 3])  # halved after every rejected round
    final = calibration_loss(out, calib.input_ids)
    assert final == pytest.approx(min(losses), rel=1e-5) == pytest.approx(report["correction_loss"], rel=1e-5)
    assert final <= losses[0] * (1 + 1e-6)  # (packed factors differ from the dense reconstruction by round-off)
