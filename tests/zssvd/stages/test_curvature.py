"""The second-order term of zero-sum-2nd against a direct computation, and the strategy end to end."""
import copy

import pytest
import torch

import zssvd
from tiny_models import text_windows, trained_tiny_model
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.stages.curvature import curvature_terms
from zssvd.stages.gradients import next_token_loss_sum
from zssvd.pipeline import AnalysisOptions, add_curvature, analyze
from zssvd.stages.selection import select


@pytest.fixture(scope="module")
def setup():
    model = trained_tiny_model("llama", steps=80)
    calib = CalibrationSet(text_windows(6, 32, seed=4), "text")
    return model, calib, analyze(model, calib)


def test_curvature_matches_a_direct_full_batch_computation(setup):
    model, calib, analysis = setup
    terms = curvature_terms(model, analysis.targets, calib.input_ids, analysis.factors, micro_batch=4)
    # Direct: one forward over all windows, output gradients of the summed loss at every position.
    targets = analysis.targets.rebind(model)
    outputs = {}
    handles = [t.module.register_forward_hook(lambda m, a, out, n=t.name: outputs.__setitem__(n, out))
               for t in targets]
    try:
        ids = calib.input_ids
        loss_sum = next_token_loss_sum(model(ids).logits, ids)
        grads = torch.autograd.grad(loss_sum, [outputs[t.name] for t in targets])
    finally:
        for h in handles:
            h.remove()
    n = ids.shape[0] * (ids.shape[1] - 1)
    for t, g in zip(targets, grads):
        f = analysis.factors[t.name]
        gamma = g.reshape(-1, g.shape[-1]).double()  # = n dL/dy_s for the mean loss L
        A = gamma.T @ gamma / n
        U = f.U.double()
        expected = 0.5 * f.sigma.double() ** 2 * ((U.T @ A) * U.T).sum(dim=1)
        torch.testing.assert_close(terms[t.name], expected, rtol=1e-4, atol=1e-10)
        assert (terms[t.name] >= 0).all()


def test_zero_sum_2nd_is_zero_sum_on_second_order_scores(setup):
    model, calib, analysis = setup
    curvature = add_curvature(model, analysis)
    sigmas = {n: f.sigma for n, f in analysis.factors.items()}
    second = select(analysis.specs, analysis.scores, sigmas, ratio=0.6, strategy="zero-sum-2nd", curvature=curvature)
    summed = {n: analysis.scores[n] + curvature[n] for n in analysis.scores}
    plain = select(analysis.specs, summed, sigmas, ratio=0.6, strategy="zero-sum")
    assert second.removed == plain.removed
    zero = {n: torch.zeros_like(c) for n, c in curvature.items()}
    first = select(analysis.specs, analysis.scores, sigmas, ratio=0.6, strategy="zero-sum-2nd", curvature=zero)
    assert first.removed == select(analysis.specs, analysis.scores, sigmas, ratio=0.6).removed
    with pytest.raises(ValueError, match="needs the second-order terms"):
        select(analysis.specs, analysis.scores, sigmas, ratio=0.6, strategy="zero-sum-2nd")


def test_compress_with_zero_sum_2nd_caches_the_extra_pass(setup, tmp_path):
    model, calib, _ = setup
    options = AnalysisOptions(cache_dir=str(tmp_path), source="tiny")
    analysis = analyze(model, calib, options)
    _, report = zssvd.compress(copy.deepcopy(model), calib,
                               CompressionConfig(ratio=0.6, strategy="zero-sum-2nd"), analysis=analysis)
    assert report["strategy"] == "zero-sum-2nd" and "curvature" in report["timings"]
    assert list(tmp_path.glob("curvature-*"))
    again = analyze(model, calib, options)
    _, report2 = zssvd.compress(copy.deepcopy(model), calib,
                                CompressionConfig(ratio=0.6, strategy="zero-sum-2nd"), analysis=again)
    assert "curvature" not in report2["timings"] and report2["ranks"] == report["ranks"]
