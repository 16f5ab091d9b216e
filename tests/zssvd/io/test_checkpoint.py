"""Save -> load gives identical logits; damaged checkpoints are refused with clear errors."""
import json
import subprocess
import sys

import pytest
import torch

import zssvd
from tiny_models import ARCHS, random_windows, tiny_model
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.io.checkpoint import CheckpointError
from zssvd.nn import PackedLowRankLinear
from zssvd.pipeline import AnalysisOptions


def _compressed(arch="llama", ratio=0.6, storage="dense"):
    model = tiny_model(arch)
    calib = CalibrationSet(random_windows(4, 16, seed=3), "random")
    return zssvd.compress(model, calib,
                          CompressionConfig(ratio=ratio, storage=storage),
                          options=AnalysisOptions(score_backend="torch"))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_identical_logits(arch, tmp_path):
    model, report = _compressed(arch)
    ids = random_windows(2, 12, seed=9)
    expected = _logits(model, ids)
    zssvd.save_compressed(model, tmp_path, report=report)
    loaded = zssvd.load(tmp_path)
    assert torch.equal(_logits(loaded, ids), expected)
    assert any(isinstance(m, PackedLowRankLinear) for m in loaded.modules())
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("target_ratio", "achieved_ratio", "storage", "strategy", "ranks", "timings"):
        assert key in saved


def test_tied_embeddings_are_stored_once(tmp_path):
    model, report = _compressed("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    zssvd.save_compressed(model, tmp_path, report=report)
    manifest = json.loads((tmp_path / "zssvd.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = zssvd.load(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.fixture
def saved(tmp_path):
    model, report = _compressed()
    zssvd.save_compressed(model, tmp_path, report=report)
    return tmp_path


def test_truncated_weights_are_refused(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or was altered"):
        zssvd.load(saved)


def test_altered_weights_are_refused(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        zssvd.load(saved)


def test_manifest_that_disagrees_with_the_weights_is_refused(saved):
    manifest = json.loads((saved / "zssvd.json").read_text())
    name, desc = next(iter(manifest["modules"].items()))
    desc["tensors"]["weight_u"]["shape"][1] += 1
    (saved / "zssvd.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weight_u: stored"):
        zssvd.load(saved)


def test_missing_or_foreign_manifest(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="not a zssvd checkpoint"):
        zssvd.load(empty)
    manifest = json.loads((saved / "zssvd.json").read_text())
    manifest["format_version"] = 99
    (saved / "zssvd.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        zssvd.load(saved)
    (saved / "zssvd.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        zssvd.load(saved)


def test_transformers_from_pretrained_gives_the_same_logits(saved):
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = random_windows(1, 10, seed=4)
    expected = _logits(zssvd.load(saved), ids)
    zssvd.register_hf()  # explicit (zssvd.load above did it too): importing zssvd registers nothing
    registered = AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(_logits(registered, ids), expected)
    remote = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)  # the checkpoint's own code
    assert torch.equal(_logits(remote, ids), expected)
    assert AutoConfig.from_pretrained(saved).model_type == "zssvd"


def test_plain_transformers_cannot_mistake_it_for_the_base_model(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "zssvd" and config["base_config"]["model_type"] == "llama"
    # Without zssvd imported and without trust_remote_code, transformers refuses instead of building a
    # LLaMA with random layers where the packed ones should be.
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(saved)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "trust_remote_code" in run.stderr
