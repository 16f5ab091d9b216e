"""The pipeline as a whole: reuse of an analysis, caching and resume, few calibration tokens."""
import copy

import torch

import zssvd
from tiny_models import random_windows, tiny_model
from zssvd.config import CompressionConfig
from zssvd.runtime.cache import StageCache
from zssvd.stages.calibration import CalibrationSet
from zssvd.pipeline import AnalysisOptions, analyze, compress


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_reusing_an_analysis_equals_a_fresh_run_and_leaves_the_original_alone():
    model = tiny_model("qwen2")
    calib = CalibrationSet(random_windows(4, 16, seed=1), "random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = analyze(model, calib)
    reused, report_a = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5), analysis=analysis)
    fresh, report_b = compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.5))
    assert report_a["ranks"] == report_b["ranks"]
    ids = random_windows(1, 12, seed=2)
    torch.testing.assert_close(_logits(reused, ids), _logits(fresh, ids))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_cache_resumes_and_ignores_leftovers_of_a_killed_run(tmp_path):
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=3), "random")
    options = AnalysisOptions(cache_dir=str(tmp_path), source="tiny")
    (tmp_path / "stats-deadbeef.tmp123").mkdir()  # what a killed run could leave behind
    first = analyze(model, calib, options)
    assert {"calibration_pass", "whitening", "decomposition"} <= set(first.timings)
    second = analyze(model, calib, options)
    assert "whitening" not in second.timings and "decomposition" not in second.timings
    for name in first.scores:
        torch.testing.assert_close(first.scores[name], second.scores[name])
    entries = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if ".tmp" not in p.name)
    assert entries == ["factors", "stats"]
    # Another calibration set gets its own entries; it does not reuse these.
    other = CalibrationSet(random_windows(4, 16, seed=4), "random")
    analyze(model, other, options)
    assert len([p for p in tmp_path.glob("stats-*") if ".tmp" not in p.name]) == 2


def test_partial_cache_entry_is_not_used(tmp_path):
    cache = StageCache(tmp_path)
    (tmp_path / "stats-abc").mkdir()  # no meta.json: incomplete
    assert cache.load("stats", "abc") is None


def test_a_cache_that_cannot_be_written_or_read_costs_only_the_cache(tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    import zssvd.runtime.cache

    tensors = {"x": {"a": torch.ones(1000)}}
    cache = StageCache(tmp_path)
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:  # a nearly full disk: skipped, with a warning that says how much is needed
        m.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12, 10**6))
        cache.store("stats", "full", tensors, {})
    assert "not caching the stats stage" in caplog.text and not list(tmp_path.iterdir())

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the disk fills up while writing: no entry and no leftovers
        m.setattr(zssvd.runtime.cache, "save_file", failing_save)
        cache.store("stats", "midway", tensors, {})
    assert "No space left on device" in caplog.text and not list(tmp_path.iterdir())

    cache.store("stats", "ok", tensors, {})
    assert torch.equal(cache.load("stats", "ok")[0]["x"]["a"], torch.ones(1000))
    (tmp_path / "stats-ok" / "x.safetensors").write_bytes(b"damaged")
    assert cache.load("stats", "ok") is None and "unreadable cache entry" in caplog.text


def test_replaced_linears_give_up_their_weights():
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=1), "random")
    analysis = analyze(model, calib)
    compressed, report = compress(model, calib, CompressionConfig(ratio=0.6), analysis=analysis)
    replaced = [t for t in analysis.targets if compressed.get_submodule(t.name) is not t.module]
    kept = [t for t in analysis.targets if compressed.get_submodule(t.name) is t.module]
    assert replaced and all(t.module.weight.numel() == 0 for t in replaced)  # no dense copy beside the packed one
    assert all(t.module.weight.shape == t.shape for t in kept)
    assert torch.isfinite(_logits(compressed, random_windows(1, 8))).all()


def test_fewer_calibration_tokens_than_features_still_compresses():
    model = tiny_model("llama")  # 32 and 64 input features
    calib = CalibrationSet(random_windows(1, 12, seed=5), "random")  # 12 tokens: rank-deficient covariances
    out, report = zssvd.compress(model, calib, CompressionConfig(ratio=0.6))
    assert report["achieved_ratio"] <= 0.6
    assert torch.isfinite(_logits(out, random_windows(1, 8))).all()


def test_checkpointing_gives_the_same_covariances_and_gradients():
    from zssvd.stages.covariance import CovarianceCollector
    from zssvd.stages.gradients import calibration_pass
    from zssvd.io.models import assign_input_groups, find_targets

    model = tiny_model("mistral")
    ids = random_windows(4, 16, seed=6)
    results, calls = [], []
    for checkpointing in (False, True):
        targets = assign_input_groups(model, find_targets(model), ids[:1, :8])
        collector = CovarianceCollector(targets)
        count = [0]
        handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda *_: count.__setitem__(0, count[0] + 1))
        grads = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector,
                                 checkpointing=checkpointing)
        handle.remove()
        calls.append(count[0])
        results.append((collector.covariances(), collector.tokens, grads))
    assert calls == [2, 4]  # two micro-batches; checkpointing really recomputed each block once
    (cov_a, tokens_a, grads_a), (cov_b, tokens_b, grads_b) = results
    assert tokens_a == tokens_b  # the recomputed forward is not counted twice
    for group in cov_a:
        torch.testing.assert_close(cov_a[group], cov_b[group])
    assert grads_a.loss == grads_b.loss
    for name in grads_a.grads:
        torch.testing.assert_close(grads_a.grads[name], grads_b.grads[name])
    assert type(model.model.layers[0]).forward is model.model.layers[0].forward.__func__  # unwrapped again
