"""The block-order calibration pass: same statistics as the batch order, one block's on the device at a time."""
import pytest
import torch
from tiny_models import ARCHS, random_windows, tiny_model

from zssvd.runtime.blockwise import block_order_pass, choose_segment
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.gradients import _checked_loss_sum, calibration_pass, weight_gradient_sinks
from zssvd.io.models import assign_input_groups, find_blocks, find_targets


def _targets(model, ids):
    return assign_input_groups(model, find_targets(model), ids[:1, :8])


def _statistics(model, ids, targets=None, **kwargs):
    targets = targets or _targets(model, ids)
    collector = CovarianceCollector(targets, product_dtype=torch.float64)
    result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, **kwargs)
    return result, collector.covariances()


@pytest.mark.parametrize("segment", [None, 1, 2], ids=["whole-model", "segment-1", "segment-2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_block_order_equals_batch_order(arch, segment):
    model = tiny_model(arch, dtype=torch.float64)
    ids = random_windows(5, 12, seed=4)  # 3 micro-batches, the last one short
    expected, expected_cov = _statistics(model, ids)
    result, cov = _statistics(model, ids, order="block", segment=segment)
    assert result.loss == pytest.approx(expected.loss, rel=1e-12)
    assert result.tokens == expected.tokens
    for name, g in expected.grads.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(result.grads[name], g, rtol=1e-6, atol=1e-9)
    assert set(cov) == set(expected_cov)
    for group, c in expected_cov.items():
        torch.testing.assert_close(cov[group], c, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in block.__dict__ for block in find_blocks(model)[1])  # forwards restored


def test_16_bit_models_accumulate_in_float32_and_float64_in_both_orders():
    """bf16 products reach the float32 gradient and float64 covariance sums by upcasting adds."""
    reference = tiny_model("llama")
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = random_windows(4, 12, seed=7)
    targets = _targets(model, ids)
    exact, exact_cov = _statistics(reference, ids, _targets(reference, ids))
    results = {}
    for order in ("batch", "block"):
        collector = CovarianceCollector(targets)  # float32 products of the bf16 activations
        result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, order=order,
                                  grad_device="cpu")
        results[order] = (result.grads, collector.covariances())
    for order, (grads, cov) in results.items():
        assert all(g.dtype == torch.float32 for g in grads.values())
        assert all(c.dtype == torch.float64 for c in cov.values())
        for name, g in grads.items():  # bf16 arithmetic, float32 sums: close to the float32 model
            assert (g - exact.grads[name]).norm() <= 0.05 * exact.grads[name].norm(), (order, name)
        for group, c in cov.items():
            assert (c - exact_cov[group]).norm() <= 0.02 * exact_cov[group].norm(), (order, group)
    for name, g in results["batch"][0].items():
        assert torch.equal(results["block"][0][name], g)
    for group, c in results["batch"][1].items():
        assert torch.equal(results["block"][1][group], c)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_block_order_with_offloaded_blocks(offload, tmp_path):
    model = tiny_model("llama")
    ids = random_windows(4, 16, seed=5)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    expected, expected_cov = _statistics(model, ids)
    folder = str(tmp_path / "offload") if offload == "disk" else "cpu"
    _, blocks = find_blocks(model)
    resident = []

    def inside_block(module, args, output):  # runs while the block's own weights are loaded
        resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    targets = _targets(model, ids)
    handles = [b.mlp.down_proj.register_forward_hook(inside_block) for b in blocks]
    result, cov = _statistics(model, ids, targets, order="block", offload=folder, device="cpu")
    for h in handles:
        h.remove()
    # the first block once to learn its output type, per block 2 micro-batches forward + 2 backward,
    # and every block once more for the model's own forward that checks the block loop
    assert resident == [1] * (1 + 5 * len(blocks))
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    for name, g in expected.grads.items():
        torch.testing.assert_close(result.grads[name], g, rtol=1e-4, atol=1e-7)
    for group, c in expected_cov.items():
        torch.testing.assert_close(cov[group], c)
    for name, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[name]), name
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


@pytest.mark.parametrize("windows", [4, 8])
def test_offloaded_blocks_load_once_per_phase_not_per_micro_batch(windows, monkeypatch):
    from accelerate.hooks import AlignDevicesHook

    model = tiny_model("llama")
    ids = random_windows(windows, 16, seed=5)
    targets = _targets(model, ids)
    _, blocks = find_blocks(model)
    loads = []
    original = AlignDevicesHook.pre_forward

    def counting_pre_forward(self, module, *args, **kwargs):
        loads.extend(i for i, b in enumerate(blocks) if b is module)  # other modules have hooks too
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(AlignDevicesHook, "pre_forward", counting_pre_forward)
    expected, _ = _statistics(model, ids, targets)
    result, _ = _statistics(model, ids, targets, order="block", offload="cpu", device="cpu", segment=1)
    # block 0: the output-type probe, its forward, the loop check and its backward; the others: three loads
    assert loads.count(0) == 4 and all(loads.count(i) == 3 for i in range(1, len(blocks)))
    for name, g in expected.grads.items():
        torch.testing.assert_close(result.grads[name], g, rtol=1e-4, atol=1e-7)


def test_one_block_of_statistics_at_a_time():
    """Finished blocks' covariances and gradients leave the execution device ("meta" stands in for the host)."""
    model = tiny_model("qwen2")
    ids = random_windows(4, 10, seed=6)
    targets = _targets(model, ids)
    collector = CovarianceCollector(targets, device="meta")
    sinks: dict[str, torch.Tensor] = {}
    grads = {t.name: torch.zeros(t.shape, device="meta") for t in targets}
    seen = []

    def record(target):
        def hook(module, args, output):
            live_blocks = {t.block for t in targets if t.name in sinks}
            on_device = {t.block for t in targets if t.group in collector.sums
                         and collector.sums[t.group].device.type == "cpu"}
            seen.append((target.block, torch.is_grad_enabled(), live_blocks, on_device))
        return hook

    handles = [t.module.register_forward_hook(record(t)) for t in targets]
    with weight_gradient_sinks(model, targets, sinks):
        block_order_pass(model, targets, ids, micro_batch=2, device=torch.device("cpu"), grad_device="meta",
                         sinks=sinks, grads=grads, covariances=collector, loss_of=_checked_loss_sum, segment=1)
    for h in handles:
        h.remove()
    backward_calls = [s for s in seen if s[1]]
    assert backward_calls and all(live == {block} for block, _, live, _ in backward_calls)
    assert all(on_device <= {block} for block, _, _, on_device in seen)
    assert all(s.device.type == "meta" for s in collector.sums.values())
    assert not sinks


@pytest.mark.parametrize("segment", [1, 2, 3, 5])
def test_the_host_memory_schedule_matches_the_pass(segment, monkeypatch):
    """host_peak_bytes walks the same schedule as the pass: count the hidden-state sets alive at once."""
    import zssvd.runtime.blockwise as blockwise

    alive, peak = [0], [0]

    class CountedStore(blockwise.HostStore):
        def __init__(self, *args):
            super().__init__(*args)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def __del__(self):
            alive[0] -= 1

    monkeypatch.setattr(blockwise, "HostStore", CountedStore)
    model = tiny_model("llama")
    model.model.layers.extend(tiny_model("llama", seed=1).model.layers)  # 4 blocks
    model.model.layers.extend(tiny_model("llama", seed=2).model.layers[:1])  # 5 blocks
    model.config.num_hidden_layers = 5
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    ids = random_windows(4, 8)
    calibration_pass(model, _targets(model, ids), ids, micro_batch=2, order="block", segment=segment)
    zeros = [0] * 5
    assert peak[0] == blockwise.host_peak_bytes(segment, 1, zeros, zeros)
    assert alive[0] == 0


def test_segment_length_follows_the_host_memory_budget():
    from zssvd.runtime.blockwise import host_peak_bytes

    blocks, boundary = 32, 4  # LLaMA-7B, 256 x 2048 tokens: GiB
    covs, grads = [1.37] * blocks, [0.81] * blocks  # per block, GB (float64 covariances, float32 gradients)
    assert host_peak_bytes(1, boundary, [0] * blocks, [0] * blocks) == (blocks + 2) * boundary
    peaks = {s: host_peak_bytes(s, boundary, covs, grads) for s in range(1, blocks + 1)}
    # s = 1: the top block's backward, with every boundary, all covariances and its own gradients
    assert peaks[1] == pytest.approx(blocks * 1.37 + 0.81 + (blocks + 2) * boundary)
    assert min(peaks.values()) == pytest.approx(peaks[5]) and peaks[5] < 95  # fits a 128 GiB host
    assert choose_segment(boundary, 100, covs, grads) == 4  # the shortest that fits
    assert choose_segment(boundary, 95, covs, grads) == 5
    assert choose_segment(boundary, 1000, covs, grads) == 1  # no recomputation when memory allows
    with pytest.raises(MemoryError, match="fewer or shorter calibration windows"):
        choose_segment(boundary, 60, covs, grads)


def test_unknown_pass_order_is_refused():
    model = tiny_model("llama")
    ids = random_windows(2, 8)
    with pytest.raises(ValueError, match="order must be"):
        calibration_pass(model, _targets(model, ids), ids, order="layer")


def test_statistics_are_counted_per_block():
    from zssvd.runtime.blockwise import statistics_bytes_by_block

    model = tiny_model("llama")  # hidden 32, MLP 64; per block groups qkv (32), o (32), gate/up (32), down (64)
    targets = _targets(model, random_windows(1, 8))
    weights = sum(t.shape[0] * t.shape[1] for t in targets if t.block == 0)
    covariances = 8 * (3 * 32 * 32 + 64 * 64)
    assert statistics_bytes_by_block(targets) == ([covariances] * 2, [4 * weights] * 2)


def test_auto_pass_order_switches_to_blocks_when_the_statistics_would_not_fit(monkeypatch):
    import zssvd.config as config
    from zssvd.config import AnalysisOptions

    model = tiny_model("llama")
    targets = _targets(model, random_windows(1, 8))
    windows = (8, 16)
    need = sum(map(sum, config.statistics_bytes_by_block(targets)))

    def order(**settings):
        return AnalysisOptions(**settings).resolved(model, targets, windows).pass_order

    assert order() == "batch" and order(offload="cpu") == "batch"  # a CPU: no device memory to save
    monkeypatch.setattr(config, "free_device_memory", lambda device: need)  # as if it were a full GPU
    assert order() == "block"
    assert order(pass_order="batch") == "batch"  # as asked
    assert order(statistics_device="cpu") == "batch"
    monkeypatch.setattr(config, "free_device_memory", lambda device: 2 * need)
    assert order() == "batch"
    # offloaded: the block order whenever its hidden states fit in host memory
    boundary = 8 * 16 * 32 * 4
    least = config.least_host_peak_bytes(targets, boundary)
    monkeypatch.setattr(config, "available_host_bytes", lambda: 2 * least)
    assert order(offload="cpu") == "block"
    monkeypatch.setattr(config, "available_host_bytes", lambda: least)
    assert order(offload="cpu") == "batch"


def test_statistics_live_on_the_host_when_the_device_must_stay_free():
    from zssvd.config import AnalysisOptions

    assert AnalysisOptions(pass_order="batch").statistics_home() is None  # beside the weights
    assert AnalysisOptions(pass_order="block").statistics_home() == "cpu"
    assert AnalysisOptions(offload="cpu").statistics_home() == "cpu"
    assert AnalysisOptions(statistics_device="cpu").statistics_home() == "cpu"
    assert AnalysisOptions(pass_order="block", statistics_device="cuda:1").statistics_home() == "cuda:1"


def _infinite_norm_weight(model):
    find_blocks(model)[1][1].post_attention_layernorm.weight[3] = float("inf")


def _nan_in_the_head(model):
    model.lm_head.weight[5, 0] = float("nan")


@pytest.mark.parametrize("order", ["batch", "block"])
@pytest.mark.parametrize("poison, message", [
    (_infinite_norm_weight, r"non-finite activations enter model\.layers\.1\.mlp\.gate_proj"),
    (_nan_in_the_head, "non-finite calibration loss in samples 0..1"),
])
def test_non_finite_values_are_named(order, poison, message):
    model = tiny_model("llama")
    ids = random_windows(4, 8)
    targets = _targets(model, ids)
    with torch.no_grad():
        poison(model)
    with pytest.raises(FloatingPointError, match=message):
        _statistics(model, ids, targets, order=order)


def test_a_model_that_works_between_its_blocks_is_refused():
    import types

    from transformers.modeling_outputs import BaseModelOutputWithPast

    model = tiny_model("llama")
    ids = random_windows(4, 8)
    targets = _targets(model, ids)
    inner = model.model

    def meddling_forward(self, input_ids=None, **kwargs):  # a LLaMA whose loop rescales between blocks
        hidden = self.embed_tokens(input_ids)
        positions = torch.arange(hidden.shape[1])[None]
        rotary = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            hidden = 1.5 * layer(hidden, position_embeddings=rotary, position_ids=positions, attention_mask=None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))

    inner.forward = types.MethodType(meddling_forward, inner)
    calibration_pass(model, targets, ids, micro_batch=2)  # the batch order runs the model as it is
    with pytest.raises(RuntimeError, match="does more between its blocks"):
        calibration_pass(model, targets, ids, micro_batch=2, order="block")


def test_block_order_check_script(tmp_path, capsys):
    import sys
    from pathlib import Path

    from tiny_models import english_text, save_tiny_model_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    import block_order_check

    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(2000, seed=1))
    assert block_order_check.main(["--model", str(tmp_path / "model"), "--calib-file", str(tmp_path / "calib.txt"),
                                   "--samples", "4", "--seq-len", "24", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest relative score difference 0, loss difference 0\n" in out
    assert out.count("same ranks True") == 2


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_host_store_round_trip_in_order(device):
    from zssvd.runtime.blockwise import HostStore, Transfers

    transfers = Transfers(torch.device(device))
    made = [torch.randn(64, 257, device=device) + j for j in range(7)]
    store = HostStore(iter(made), transfers)
    assert all(host.device.type == "cpu" for host, _ in store.items)
    back = list(store.each())
    assert [b.device.type for b in back] == [device] * 7
    for b, m in zip(back, made):
        assert torch.equal(b, m)
    assert torch.equal(store.get(3), made[3])
    transfers.drain()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side-stream copies")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_block_order_with_side_stream_copies_equals_batch_order(dtype):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().eval()
    ids = torch.randint(0, 512, (12, 128), generator=torch.Generator().manual_seed(1))
    targets = assign_input_groups(model, find_targets(model), ids[:1, :8].cuda())
    results = {}
    for order, segment in (("batch", None), ("block", 1), ("block", 3)):
        collector = CovarianceCollector(targets)
        result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, order=order,
                                  segment=segment)
        results[order, segment] = (result, collector.covariances())
    expected, expected_cov = results["batch", None]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # attention backward kernels need not be deterministic

    def relative(a, b):
        return ((a.cpu().double() - b.cpu().double()).norm() / b.cpu().double().norm()).item()

    for key in (("block", 1), ("block", 3)):
        result, cov = results[key]
        assert result.loss == pytest.approx(expected.loss, rel=1e-4)
        assert max(relative(result.grads[n], g) for n, g in expected.grads.items()) < tolerance, key
        assert max(relative(cov[g], c) for g, c in expected_cov.items()) < 1e-6, key  # forward: deterministic


def test_the_host_memory_plan_counts_only_the_statistics_a_rank_keeps():
    """Under torchrun a finished block's statistics go to their owners: the plan holds each block's whole
    statistics only while it finishes, then what this rank keeps."""
    from zssvd.runtime.blockwise import host_peak_bytes

    covs, grads = [10] * 4, [2] * 4
    kept = ([5] * 4, [1] * 4)  # half of each block's covariances and gradients are this rank's
    assert host_peak_bytes(1, 0, covs, grads) == 4 * 10 + 4 * 2  # every covariance beside every gradient
    assert host_peak_bytes(1, 0, covs, grads, (covs, grads)) == 4 * 10 + 4 * 2
    # the last block's forward: three kept shares and one whole block; the backward never exceeds it
    # (4 * 5 kept covariances + 3 kept gradient shares + the last block's whole gradients = 25 as well)
    assert host_peak_bytes(1, 0, covs, grads, kept) == 3 * 5 + 10
    assert host_peak_bytes(1, 0, [0] * 4, grads, ([0] * 4, [1] * 4)) == 3 * 1 + 2
    # with hidden states (4 bytes per boundary) the peak is where most are alive: the same schedule, 20 bytes
    # fewer of statistics (the covariances not owned; the gradients then weigh less than the boundaries freed)
    assert host_peak_bytes(1, 4, covs, grads) == 66
    assert host_peak_bytes(1, 4, covs, grads, kept) == 46
    # a budget of 50 fits segment 1 only if the plan knows the rank keeps half; otherwise nothing fits
    assert choose_segment(4, 50, covs, grads, kept) == 1
    with pytest.raises(MemoryError, match="at least 0.0 GiB"):
        choose_segment(4, 50, covs, grads)
