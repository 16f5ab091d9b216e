"""Scores dL_i = -sigma_i u_i^T G z_i against the real loss change of removing component i."""
import pytest
import torch

from tiny_models import random_windows, tiny_model
from zssvd.stages.calibration import CalibrationSet
from zssvd.stages.gradients import calibration_loss
from zssvd.pipeline import AnalysisOptions, analyze


@pytest.fixture(scope="module")
def analysed():
    model = tiny_model("llama", dtype=torch.float64)
    calib = CalibrationSet(random_windows(6, 24, seed=1), "random")
    analysis = analyze(model, calib, AnalysisOptions(score_backend="torch"))
    return model, calib, analysis


def _loss_with(model, target, delta, ids):
    weight = target.module.weight
    weight.data += delta
    try:
        return calibration_loss(model, ids)
    finally:
        weight.data -= delta


def test_score_is_the_directional_derivative_of_removing_the_component(analysed):
    """Central differences of L(W - eps sigma_i u_i z_i^T) match dL_i.

    HF norms compute in float32 even in a float64 model, so eps cannot be tiny; Richardson
    extrapolation of two central differences removes the O(eps^2) error instead.
    """
    model, calib, analysis = analysed

    def central(target, direction, eps):
        return (_loss_with(model, target, eps * direction, calib.input_ids)
                - _loss_with(model, target, -eps * direction, calib.input_ids)) / (2 * eps)

    for target in list(analysis.targets)[::3]:
        f = analysis.factors[target.name]
        for i in (0, f.rank // 2, f.rank - 1):
            direction = -(f.sigma[i] * torch.outer(f.U[:, i], f.Z[:, i])).double()
            fd = (4 * central(target, direction, 1e-2) - central(target, direction, 2e-2)) / 3
            score = analysis.scores[target.name][i].item()
            assert score == pytest.approx(fd, rel=2e-3, abs=3e-7), (target.name, i)


def test_scores_predict_sign_and_size_of_removing_small_components(analysed):
    """Fully removing one of the smaller components changes the loss by about dL_i (first order)."""
    model, calib, analysis = analysed
    base = calibration_loss(model, calib.input_ids)
    predicted, actual = [], []
    for target in analysis.targets:
        f = analysis.factors[target.name]
        for i in range(f.rank - 4, f.rank):
            direction = -(f.sigma[i] * torch.outer(f.U[:, i], f.Z[:, i])).double()
            actual.append(_loss_with(model, target, direction, calib.input_ids) - base)
            predicted.append(analysis.scores[target.name][i].item())
    predicted, actual = torch.tensor(predicted), torch.tensor(actual)
    big = actual.abs() > 0.1 * actual.abs().max()  # where the change is clearly above round-off
    agree = (predicted.sign() == actual.sign())[big].float().mean()
    assert agree >= 0.9
    corr = torch.corrcoef(torch.stack([predicted, actual]))[0, 1]
    assert corr > 0.95
    ratio = (predicted[big] / actual[big]).median()
    assert 0.5 < ratio < 2.0


def test_sign_flips_between_calibration_sets(analysed):
    from zssvd.pipeline import rescore
    from zssvd.stages.scores import sign_flips

    model, calib, analysis = analysed
    same = rescore(model, analysis, calib)
    for name in same:
        torch.testing.assert_close(same[name], analysis.scores[name], rtol=1e-5, atol=1e-9)
    assert sign_flips(analysis.scores, same)["flip_rate"] == 0.0
    other = rescore(model, analysis, CalibrationSet(random_windows(6, 24, seed=9), "random"))
    stats = sign_flips(analysis.scores, other)
    assert stats["components"] == sum(f.rank for f in analysis.factors.values())
    assert 0.0 < stats["flip_rate"] < 1.0 and 0.0 <= stats["weighted_flip_rate"] <= 1.0
    negated = {n: -s for n, s in analysis.scores.items()}
    assert sign_flips(analysis.scores, negated)["flip_rate"] == pytest.approx(
        float(torch.cat(list(analysis.scores.values())).ne(0).double().mean()))
    first_two = {n: torch.tensor([0, 1]) for n in analysis.scores}
    assert sign_flips(analysis.scores, other, among=first_two)["components"] == 2 * len(analysis.scores)
