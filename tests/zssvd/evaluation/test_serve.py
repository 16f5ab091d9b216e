"""Compress-then-serve: every storage round-trips, generation matches the unpacked reference,
torch.compile sees no graph breaks in packed layers, the throughput benchmark runs."""
import copy
import json
import math

import pytest
import torch

import zssvd
from tiny_models import save_tiny_model_dir, text_windows, tiny_tokenizer, trained_tiny_model
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet
from zssvd.cli import main
from zssvd.nn import PackedDenseLinear, PackedLowRankLinear, describe_packed
from zssvd.stages.packing import unpack_model
from zssvd.pipeline import analyze
from zssvd.evaluation.serve import generate_text

STORAGE_RATIOS = {"dense": 0.6, "remap": 0.6, "hq": 0.45}


@pytest.fixture(scope="module")
def trained():
    model = trained_tiny_model("llama", steps=80)
    calib = CalibrationSet(text_windows(8, 32, seed=3), "text")
    return model, calib, analyze(model, calib)


@pytest.fixture(scope="module")
def compressed(trained):
    model, calib, analysis = trained
    return {storage: zssvd.compress(copy.deepcopy(model), calib,
                                    CompressionConfig(ratio=ratio, storage=storage), analysis=analysis)
            for storage, ratio in STORAGE_RATIOS.items()}


@pytest.mark.parametrize("storage", STORAGE_RATIOS)
def test_every_storage_round_trips_with_identical_logits(compressed, storage, tmp_path):
    model, report = compressed[storage]
    kinds = {type(m) for m in model.modules()}
    assert PackedLowRankLinear in kinds
    assert (PackedDenseLinear in kinds) == (storage == "hq" and bool(report["kept_dense"]))
    ids = text_windows(2, 20, seed=11)
    # stored as computed (float32): bit-exact; the default 16-bit storage is tested in tests/zssvd/io
    zssvd.save_compressed(model, tmp_path, report=report, dtype=torch.float32)
    loaded = zssvd.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # The loaded model occupies what the report says (the GPU version of this check is in bench).
    from zssvd.report import model_nbytes

    assert model_nbytes(loaded) == report["model_bytes"]


@pytest.mark.parametrize("storage", ["remap", "hq"])
def test_packed_storage_really_is_8_bit(compressed, storage):
    model, report = compressed[storage]
    eight_bit = {torch.int8, torch.float8_e4m3fn}
    for module in model.modules():
        if isinstance(module, (PackedLowRankLinear, PackedDenseLinear)):
            assert any(t.dtype in eight_bit for t in module.packed().values())
    # Bytes are exactly the budget's payload plus one fp32 scale per component (and per row for dense fp8).
    expected = 0
    for name, k in report["ranks"].items():
        m, n = model.get_submodule(name).out_features, model.get_submodule(name).in_features
        if name in report["kept_dense"]:
            expected += 4 * m * n if storage == "remap" else m * n + 4 * m  # remap: the float32 original stays
        else:
            expected += (2 * k * max(m, n) if storage == "remap" else k * (m + n)) + 8 * k
    assert report["target_bytes_packed"] == expected


@pytest.mark.parametrize("storage", STORAGE_RATIOS)
def test_greedy_generation_is_deterministic_and_matches_the_unpacked_reference(compressed, storage):
    model, _ = compressed[storage]
    tokenizer = tiny_tokenizer()
    prompt = "the model of the river "
    first = generate_text(model, tokenizer, prompt, max_new_tokens=24)
    assert first == generate_text(model, tokenizer, prompt, max_new_tokens=24)
    reference = unpack_model(copy.deepcopy(model))
    assert not any(isinstance(m, (PackedLowRankLinear, PackedDenseLinear)) for m in reference.modules())
    assert generate_text(reference, tokenizer, prompt, max_new_tokens=24) == first


@pytest.mark.parametrize("storage", ["fp32", "fp16", "remap", "fp8"])
def test_packed_layers_compile_without_graph_breaks(storage):
    g = torch.Generator().manual_seed(0)
    layer = PackedLowRankLinear.from_factors(torch.randn(24, 5, generator=g), torch.randn(16, 5, generator=g),
                                             torch.randn(24, generator=g), storage=storage)
    x = torch.randn(3, 16, generator=g)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()  # explain() compiled it already; start below the recompile limit
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    # The CPU paths are opaque ops to the compiler: compiled code computes exactly what eager code does.
    assert torch.equal(compiled(x), layer(x))


def test_generate_and_bench_serve_commands(trained, tmp_path, capsys):
    model, calib, analysis = trained
    out, report = zssvd.compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.6), analysis=analysis)
    source = save_tiny_model_dir(tmp_path / "dense")
    report["model"] = str(source)
    zssvd.save_compressed(out, tmp_path / "ckpt", tokenizer=tiny_tokenizer(), report=report)

    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "the city", "--max-new-tokens", "8",
                 "--quiet"]) == 0
    expected = generate_text(zssvd.load(tmp_path / "ckpt"), tiny_tokenizer(), "the city", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"

    assert main(["bench-serve", str(tmp_path / "ckpt"), "--batch", "1,2", "--prompt-len", "8", "--new-tokens",
                 "24", "--repeats", "3", "--json", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["compressed", f"dense ({source})"] * 2  # per batch, timed interleaved
    assert [r["batch"] for r in rows] == [1, 1, 2, 2]
    assert all(r["decode_vs_dense"] > 0 and r["prefill_vs_dense"] > 0 for r in rows)
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(r["cpu_path_gib"] >= 0 for r in rows if r["model"] == "compressed")  # the CPU paths' own copies

    # Several checkpoints of one model, side by side with one dense original, all interleaved.
    out, report = zssvd.compress(copy.deepcopy(model), calib, CompressionConfig(ratio=0.4, storage="hq"),
                                 analysis=analysis)
    zssvd.save_compressed(out, tmp_path / "hq", tokenizer=tiny_tokenizer(), report=report)
    assert main(["bench-serve", str(tmp_path / "ckpt"), str(tmp_path / "hq"), "--batch", "1", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--dense", "random", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| compressed | dense 0.6 (ckpt) |" in table and "| compressed | hq 0.4 (hq) |" in table
    assert "| dense (random weights, same shapes) |" in table


def test_decode_rate_is_nan_with_a_warning_when_timing_noise_hides_it():
    from zssvd.evaluation.serve import _decode_rate

    assert _decode_rate(batch=2, new_tokens=5, full=1.0, one=0.2) == pytest.approx(2 * 4 / 0.8)
    with pytest.warns(RuntimeWarning, match="not resolved"):
        assert math.isnan(_decode_rate(batch=1, new_tokens=5, full=0.2, one=0.3))


def test_scale_serving_benchmark_smoke_run(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    import serve_scale

    assert serve_scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float16", "--batch", "1",
                             "--prompt-len", "16", "--new-tokens", "8", "--repeats", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    weights = {r["model"]: r["weights_plus_kv_gib"] for r in rows}
    assert list(weights) == ["dense", "remap", "hq"]
    assert weights["hq"] < weights["remap"] < weights["dense"]  # packed storage really is smaller


def test_loaded_memory_is_compared_with_the_report(compressed, tmp_path):
    from zssvd.evaluation.serve import load_and_measure_memory

    model, report = compressed["remap"]
    # stored as computed (float32), so the loaded model is the one report["model_bytes"] counted
    zssvd.save_compressed(model, tmp_path, tokenizer=tiny_tokenizer(), report=report, dtype=torch.float32)
    loaded, memory = load_and_measure_memory(tmp_path, "cpu")
    assert memory["memory_vs_report"] == 0.0  # on the CPU: the loaded tensors' bytes
    assert memory["report_gib"] == pytest.approx(report["model_bytes"] / 2**30)
    assert isinstance(loaded.get_submodule(next(iter(describe_packed(model)))), PackedLowRankLinear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the allocator's count")
@pytest.mark.parametrize("storage", ["remap", "hq"])
def test_gpu_loaded_checkpoint_takes_the_memory_its_report_promises(storage, tmp_path):
    import transformers as tf

    from zssvd.evaluation.serve import load_and_measure_memory

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    calib = CalibrationSet(torch.randint(0, 4096, (4, 64)), "random")
    model, report = zssvd.compress(model, calib,
                                   CompressionConfig(ratio=0.45 if storage == "hq" else 0.6, storage=storage))
    zssvd.save_compressed(model, tmp_path, tokenizer=tiny_tokenizer(), report=report)
    del model
    torch.cuda.empty_cache()
    _, memory = load_and_measure_memory(tmp_path, "cuda")
    assert abs(memory["memory_vs_report"]) < 0.02, memory  # issue 4: within 2%
