"""The calibration pass's memory savings change no result: chunked loss, in-place means."""
import pytest
import torch
import torch.nn.functional as F

import zssvd.stages.gradients as gradients
from tiny_models import random_windows, tiny_model
from zssvd.io.models import assign_input_groups, find_targets
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.gradients import calibration_pass, next_token_loss_sum


def _plain_loss(logits, ids):
    shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 23, 7 * 300])  # one chunk per window; several, with a ragged last one
def test_chunked_loss_gives_torchs_gradient_bit_for_bit(dtype, chunk, monkeypatch):
    monkeypatch.setattr(gradients, "LOSS_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    base = (torch.randn(3, 37, 300) * 3).to(dtype)
    ids = torch.randint(0, 300, (3, 37))
    grads, losses = [], []
    for loss_fn in (_plain_loss, next_token_loss_sum):
        logits = base.clone().requires_grad_(True)
        loss = loss_fn(logits, ids)
        (loss / 108).backward()
        grads.append(logits.grad)
        losses.append(loss.detach())
    assert torch.equal(grads[0], grads[1])
    assert grads[1][:, -1].abs().max() == 0  # the last position predicts nothing
    tolerance = torch.finfo(losses[0].dtype).eps * 64  # only the summation order differs
    assert torch.allclose(losses[0], losses[1], rtol=tolerance, atol=0)


def test_loss_without_gradients_is_the_plain_one():
    logits = torch.randn(2, 9, 50, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(next_token_loss_sum(logits, ids), _plain_loss(logits, ids))


def _statistics(model, ids, micro_batch, product_dtype=torch.float32):
    targets = find_targets(model, None)
    assign_input_groups(model, targets, ids[:1, :8])
    collector = CovarianceCollector(targets, product_dtype=product_dtype)
    result = calibration_pass(model, targets, ids, micro_batch=micro_batch, covariances=collector)
    return result, collector.covariances(), collector


def test_one_window_per_step_equals_whole_micro_batches_within_summation_order():
    """``--micro-batch 1``, the lean setting on the CPU, changes only the order of the sums."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_windows(6, 24, seed=5)
    single, single_covs, _ = _statistics(model, ids, micro_batch=1)
    whole, whole_covs, _ = _statistics(model, ids, micro_batch=4)
    assert single.tokens == whole.tokens and single.loss == pytest.approx(whole.loss, rel=1e-12)
    for name, g in whole.grads.items():
        # float32 sinks: each step's float64 product is rounded once, so the order shows at float32 precision
        torch.testing.assert_close(single.grads[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    for group, c in whole_covs.items():
        # each step's X^T X is formed in float32 (CovarianceCollector's product_dtype) before the float64 sum
        torch.testing.assert_close(single_covs[group], c, rtol=1e-5, atol=1e-6 * float(c.abs().max()))


def test_covariances_are_the_means_and_end_the_collection():
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_windows(2, 16, seed=6)
    _, covs, collector = _statistics(model, ids, micro_batch=2, product_dtype=torch.float64)
    targets = collector.targets
    first = targets.by_name()[next(iter(covs))]
    x = []
    handle = first.module.register_forward_pre_hook(lambda m, args: x.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    xs = torch.cat(x)
    torch.testing.assert_close(covs[first.name], xs.T @ xs / xs.shape[0], rtol=1e-12, atol=1e-15)
    assert collector.covariances()[first.name] is covs[first.name]  # asking again divides nothing twice
    with collector, pytest.raises(RuntimeError, match="new CovarianceCollector"):
        collector.new_batch()
        with torch.no_grad():
            model(ids)
