"""Recomputing a gated MLP's act(gate) * up in the backward changes no statistic, only what is kept."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import zssvd.stages.gradients as gradients
from tiny_models import random_windows, tiny_model
from zssvd.io.models import assign_input_groups, find_targets
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.gradients import _GatedProduct, calibration_pass, recomputed_gated_products, weight_gradient_sinks


@pytest.mark.parametrize("act", [F.silu, lambda t: F.gelu(t, approximate="tanh")], ids=["silu", "gelu-tanh"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gated_product_gives_autograds_gradients_bit_for_bit(act, dtype):
    torch.manual_seed(0)
    gate0, up0, upstream = (torch.randn(3, 5, 8).to(dtype) for _ in range(3))
    grads = []
    for product in (lambda g, u: act(g) * u, lambda g, u: _GatedProduct.apply(g, u, act, {})):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        out = product(gate, up)
        out.backward(upstream)
        grads.append((out.detach(), gate.grad, up.grad))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def _statistics(model, ids, recompute: bool, monkeypatch, micro_batch=2):
    if not recompute:
        monkeypatch.setattr(gradients, "recomputed_gated_products", lambda m: contextlib.nullcontext())
    targets = find_targets(model, None)
    assign_input_groups(model, targets, ids[:1, :8])
    collector = CovarianceCollector(targets, product_dtype=torch.float64)
    result = calibration_pass(model, targets, ids, micro_batch=micro_batch, covariances=collector)
    monkeypatch.undo()
    return result, collector.covariances()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_pass_with_recomputed_products_gives_the_same_statistics(arch, dtype, monkeypatch):
    model = tiny_model(arch, dtype=dtype)
    ids = random_windows(5, 20, seed=3)
    saved, saved_covs = _statistics(model, ids, recompute=False, monkeypatch=monkeypatch)
    recomputed, covs = _statistics(model, ids, recompute=True, monkeypatch=monkeypatch)
    assert recomputed.loss == saved.loss
    for name, g in saved.grads.items():  # the same kernels on the same values: equal, not merely close
        assert torch.equal(recomputed.grads[name], g), name
    for group, c in saved_covs.items():
        assert torch.equal(covs[group], c), group


def _saved_intermediate_elements(model, ids) -> int:
    """Elements autograd keeps for the backward in tensors as wide as the MLP's inside."""
    width = model.config.intermediate_size
    targets = find_targets(model, None)
    sinks = {t.name: torch.zeros(t.shape, dtype=torch.float32) for t in targets}
    storages = {}

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == width:  # (windows, tokens, width): not a (transposed) weight
            storages[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with weight_gradient_sinks(model, targets, sinks), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, use_cache=False)
    return sum(storages.values())


def test_only_gate_and_up_are_kept_per_block():
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_windows(2, 12, seed=1)
    tensor = ids.numel() * model.config.intermediate_size * model.config.num_hidden_layers
    assert _saved_intermediate_elements(model, ids) == 4 * tensor  # gate, act(gate), up, and the product
    with recomputed_gated_products(model) as replaced:
        assert replaced == model.config.num_hidden_layers
        assert _saved_intermediate_elements(model, ids) == 2 * tensor


class _ScaledMLP(torch.nn.Module):
    """Has a gated MLP's parts but computes something else: must keep its own forward."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)


def test_an_mlp_that_computes_otherwise_keeps_its_forward_and_forwards_come_back():
    model = tiny_model("llama", dtype=torch.float64)
    layers = model.model.layers
    layers[0].mlp = _ScaledMLP(layers[0].mlp)
    instance_forward = layers[1].mlp.forward
    layers[1].mlp.forward = instance_forward  # an instance-level forward, as accelerate's hooks set
    with recomputed_gated_products(model) as replaced:
        assert replaced == 1
        assert "forward" not in layers[0].mlp.__dict__
        assert layers[1].mlp.forward is not instance_forward
    assert layers[1].mlp.__dict__["forward"] is instance_forward
    del layers[1].mlp.forward
    with recomputed_gated_products(model):
        pass
    assert "forward" not in layers[1].mlp.__dict__


def test_without_gradients_the_mlp_runs_its_own_forward():
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_windows(1, 10, seed=2)
    with torch.no_grad():
        plain = model(ids).logits
        with recomputed_gated_products(model):
            assert torch.equal(model(ids).logits, plain)


def test_the_backward_computes_act_of_gate_once_per_step(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, t):
            calls.append(t.shape)
            return self.act(t)

    for layer in model.model.layers:
        layer.mlp.act_fn = Counted(layer.mlp.act_fn)
    ids = random_windows(3, 10, seed=4)
    targets = find_targets(model, None)
    assign_input_groups(model, targets, ids[:1, :8])
    calls.clear()
    calibration_pass(model, targets, ids, micro_batch=1)
    layers, steps = model.config.num_hidden_layers, ids.shape[0]
    checks = 2  # recomputed_gated_products runs each MLP's own forward and the gated form once
    assert len(calls) == layers * (checks + steps * 2)  # one forward and one backward evaluation per step
