"""The stage cache verifies every entry it reads: damaged entries are recomputed, never used."""
import json
import random

import pytest
import torch

from tiny_models import random_windows, tiny_model
from zssvd.pipeline import AnalysisOptions, analyze
from zssvd.runtime.cache import StageCache
from zssvd.stages.calibration import CalibrationSet

TENSORS = {"stats": {"a": torch.linspace(-3, 3, 257), "b": torch.arange(12.0).reshape(3, 4)}}


def _flip_bit(path, rng):
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _truncate(path, rng):
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(len(data))])


@pytest.mark.parametrize("damage", [_flip_bit, _truncate], ids=["bit-flip", "truncation"])
@pytest.mark.parametrize("target", ["stats.safetensors", "meta.json"])
@pytest.mark.parametrize("seed", range(4))
def test_a_damaged_entry_is_never_used_and_is_removed(tmp_path, caplog, damage, target, seed):
    cache = StageCache(tmp_path)
    cache.store("stats", "k", TENSORS, {"tokens": 128})
    files, meta = cache.load("stats", "k")
    assert meta["tokens"] == 128 and torch.equal(files["stats"]["a"], TENSORS["stats"]["a"])
    damage(tmp_path / "stats-k" / target, random.Random(seed))
    assert cache.load("stats", "k") is None
    assert "stats-k" in caplog.text and "recomputed" in caplog.text  # the warning names the entry
    assert not (tmp_path / "stats-k").exists()  # so the recomputed entry can take its place
    cache.store("stats", "k", TENSORS, {"tokens": 128})
    assert torch.equal(cache.load("stats", "k")[0]["stats"]["b"], TENSORS["stats"]["b"])


def test_an_edited_meta_and_an_entry_without_checksums_are_refused(tmp_path, caplog):
    cache = StageCache(tmp_path)
    cache.store("stats", "edited", TENSORS, {"tokens": 128})
    meta_path = tmp_path / "stats-edited" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokens": 64}))  # valid JSON, wrong content
    assert cache.load("stats", "edited") is None and "does not match its checksum" in caplog.text

    cache.store("stats", "old", TENSORS, {"tokens": 128})
    meta_path = tmp_path / "stats-old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if "sha256" not in k}))  # an older version's
    assert cache.load("stats", "old") is None and "no checksums" in caplog.text


def test_an_unusable_cache_directory_is_found_before_any_work(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = StageCache(blocker / "cache")
    assert not cache.usable() and not cache.enabled
    assert "cannot be used" in caplog.text and "--cache-dir" in caplog.text
    cache.store("stats", "k", TENSORS, {})  # a disabled cache stores nothing and raises nothing
    assert cache.load("stats", "k") is None


def test_analyze_recomputes_a_corrupted_stage_and_gets_the_fresh_result(tmp_path, caplog):
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(4, 16, seed=3), "random")
    options = AnalysisOptions(cache_dir=str(tmp_path), source="tiny")
    fresh = analyze(model, calib, options)
    (stats,) = [p for p in tmp_path.glob("stats-*")]
    tensor_file = sorted(stats.glob("*.safetensors"))[0]
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0x40  # an exponent bit near the end: in the payload, a huge value if it were used
    tensor_file.write_bytes(bytes(data))
    again = analyze(model, calib, options)
    assert stats.name in caplog.text
    assert "calibration_pass" in again.timings  # recomputed, not read
    for name in fresh.scores:
        torch.testing.assert_close(again.scores[name], fresh.scores[name])
    assert StageCache(tmp_path).load("stats", stats.name.split("-", 1)[1]) is not None  # rewritten whole


def test_analyze_runs_without_a_cache_when_its_directory_is_unusable(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = tiny_model("llama")
    calib = CalibrationSet(random_windows(2, 8, seed=1), "random")
    analysis = analyze(model, calib, AnalysisOptions(cache_dir=str(blocker / "cache"), source="tiny"))
    assert analysis.scores and "cannot be used" in caplog.text
