"""bench/quality.py end to end on a tiny model: rows, resume, sign flips, markdown."""
import json
import sys
from pathlib import Path

import torch

from tiny_models import english_text, save_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402


def test_quality_suite_records_resumes_and_tabulates(tmp_path, capsys):
    save_tiny_model_dir(tmp_path / "model")
    for name, seed in (("calib.txt", 1), ("other.txt", 2), ("eval.txt", 3)):
        (tmp_path / name).write_text(english_text(1500, seed=seed))
    results = tmp_path / "q.jsonl"
    argv = ["--model", str(tmp_path / "model"), "--calib-file", str(tmp_path / "calib.txt"),
            "--eval", f"held={tmp_path / 'eval.txt'}", "--suite", "issue2", "--ratios", "0.6",
            "--corrections", "1", "--calib-samples", "4", "--seq-len", "32", "--windows", "3",
            "--sign-flip", str(tmp_path / "other.txt"), "--cache-dir", str(tmp_path / "cache"),
            "--results", str(results)]
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    configs = [r for r in rows if "strategy" in r]
    assert {(r["strategy"], r["corrections"]) for r in configs} == {
        ("uniform", 0), ("zero-sum", 0), ("zero-sum-2nd", 0), ("zero-sum", 1)}
    assert all(r["achieved_ratio"] <= 0.6 and r["ppl"]["held"] > 1 for r in configs)
    flips = next(r["signflip"] for r in rows if "signflip" in r)
    assert 0 <= flips["all"]["flip_rate"] <= 1 and "removed at 0.6" in flips
    table = capsys.readouterr().out
    assert "| 0.6 | dense | zero-sum | yes | 1 |" in table and "sign flips" in table

    assert quality.main(argv) == 0  # everything is done: nothing is recomputed or appended
    assert len(results.read_text().splitlines()) == len(rows)

    only = tmp_path / "only.jsonl"
    argv[argv.index(str(results))] = str(only)
    assert quality.main(argv + ["--strategies", "uniform"]) == 0
    assert {json.loads(line).get("strategy") for line in only.read_text().splitlines()} == {None, "uniform"}


def test_int4_rows_stay_within_int4_rtn_bytes_and_dequantised_evaluation_equals_the_packed_one(tmp_path):
    assert {c["storage"] for c in quality.suite_configs("main", [0.28], 0) if "storage" in c} == {"remap", "hq", "int4"}
    assert "int4" not in {c.get("storage") for c in quality.suite_configs("main", [0.4], 0)}
    import transformers as tf
    from tiny_models import tiny_config, tiny_tokenizer

    # wide enough for int4 with groups of 64 to reach 0.28 of the 16-bit bytes (the tiny default is 32 wide)
    config = tiny_config("llama").to_dict() | dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**config)).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    for name, seed in (("calib.txt", 1), ("eval.txt", 3)):
        (tmp_path / name).write_text(english_text(1500, seed=seed))
    ppl = {}
    for flag in ([], ["--dequantised"]):
        results = tmp_path / f"q{len(flag)}.jsonl"
        argv = ["--model", str(tmp_path / "model"), "--calib-file", str(tmp_path / "calib.txt"),
                "--eval", f"held={tmp_path / 'eval.txt'}", "--suite", "main", "--ratios", "0.28",
                "--storages", "int4", "--strategies", "zero-sum", "--calib-samples", "4", "--seq-len", "32",
                "--windows", "2", "--cache-dir", str(tmp_path / "cache"), "--results", str(results), *flag]
        assert quality.main(argv) == 0
        (row,) = [json.loads(line) for line in results.read_text().splitlines() if "storage" in line]
        assert row["storage"] == "int4" and row["achieved_bytes_ratio"] <= 0.28
        assert row.get("evaluated") == ("dequantised" if flag else None)
        ppl[bool(flag)] = row["ppl"]["held"]
    assert abs(ppl[True] - ppl[False]) <= 1e-3 * ppl[False]  # the same stored values either way


def test_contiguous_calibration_takes_the_first_tokens(tmp_path):
    import argparse

    import pytest

    from tiny_models import tiny_tokenizer
    from zssvd.stages import calibration
    path = tmp_path / "calib.txt"
    path.write_text(english_text(400, seed=4))
    tokenizer = tiny_tokenizer()
    args = argparse.Namespace(calib_file=[str(path)], calib_samples=3, seq_len=20, calib_contiguous=True, no_bos=False)
    calib = quality._calibration(tokenizer, args, seed=0)
    ids = calibration.tokenize_stream(tokenizer, path.read_text())
    assert calib.input_ids.tolist() == ids[:60].view(3, 20).tolist()
    args.calib_samples = 10**6
    with pytest.raises(ValueError, match="but 1000000 were asked for"):
        quality._calibration(tokenizer, args, seed=0)


def test_contiguous_calibration_starts_each_window_with_bos_unless_told_not_to(tmp_path):
    import argparse

    from tiny_models import tiny_tokenizer
    from zssvd.stages import calibration
    path = tmp_path / "calib.txt"
    path.write_text(english_text(400, seed=4))
    tokenizer = tiny_tokenizer(bos=True)
    args = argparse.Namespace(calib_file=[str(path)], calib_samples=3, seq_len=20, calib_contiguous=True, no_bos=False)
    calib = quality._calibration(tokenizer, args, seed=0)
    ids = calibration.tokenize_stream(tokenizer, path.read_text())
    assert calib.bos and calib.input_ids[:, 0].tolist() == [95] * 3
    assert calib.input_ids[:, 1:].tolist() == ids[:57].view(3, 19).tolist()
    args.no_bos = True
    plain = quality._calibration(tokenizer, args, seed=0)
    assert not plain.bos and plain.input_ids.tolist() == ids[:60].view(3, 20).tolist()


def test_int4_rows_once_per_group_size_keep_the_default_rows_keys_and_tabulate_apart(tmp_path):
    configs = [c for c in quality.suite_configs("main", [0.22], 0, [64, "auto"]) if c.get("storage") == "int4"]
    assert [c.get("group_size") for c in configs] == [None] * 3 + ["auto"] * 3  # 64 rows keep their old keys
    rows = [{"ratio": 0.22, "storage": "int4", "strategy": "zero-sum", "ordered": True, "corrections": 0,
             "achieved_ratio": 0.22, "bytes_ratio": 0.22, "ppl": {"t": p}, **extra}
            for p, extra in ((10.0, {}), (9.0, {"group_size": "auto"}))]
    results = tmp_path / "rows.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = quality.markdown(results)
    assert "| 0.22 | int4 | zero-sum |" in table and "| 0.22 | int4 g=auto | zero-sum |" in table
    report = {"int4_group_sizes": {"a": {"v": 32, "u": 64}, "b": {"weight": 64}, "c": {"v": 32, "u": 32}}}
    assert quality.group_size_counts(report) == {"u g=32": 1, "u g=64": 1, "v g=32": 2, "weight g=64": 1}
