"""The zssvd command end to end on a tiny model directory."""
import json

import pytest
import torch

import zssvd
from tiny_models import english_text, save_tiny_model_dir
from zssvd.config import CompressionConfig
from zssvd.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "model")
    (root / "calib.txt").write_text(english_text(3000, seed=1))
    (root / "eval.txt").write_text(english_text(2000, seed=2))
    return root


def _run(capsys, *argv):
    code = main([*map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_then_eval(workspace, capsys):
    out_dir = workspace / "out"
    code, out, err = _run(capsys, "compress", workspace / "model", "--ratio", "0.6", "--out", out_dir,
                          "--calib-file", workspace / "calib.txt", "--calib-samples", "8", "--seq-len", "64",
                          "--corrections", "1", "--cache-dir", workspace / "cache")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["achieved_ratio"] <= 0.6
    report = json.loads((out_dir / "report.json").read_text())
    assert report["strategy"] == "zero-sum" and report["corrections"] == 1
    assert {"load", "calibration_pass", "selection", "correction", "packing", "save"} <= set(report["timings"])
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "config.json").is_file()
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt"))  # no pickle

    code, out, err = _run(capsys, "eval", out_dir, "--text-file", workspace / "eval.txt", "--seq-len", "64",
                          "--max-windows", "4")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 4 * 63 and result["perplexity"] > 1


def test_second_run_reuses_the_cache(workspace, capsys):
    args = ["compress", workspace / "model", "--ratio", "0.7", "--out", workspace / "out2", "--calib-file",
            workspace / "calib.txt", "--calib-samples", "8", "--seq-len", "64", "--cache-dir", workspace / "cache2",
            "--strategy", "uniform"]
    assert _run(capsys, *args)[0] == 0
    first = json.loads((workspace / "out2" / "report.json").read_text())["timings"]
    assert _run(capsys, *args)[0] == 0
    second = json.loads((workspace / "out2" / "report.json").read_text())["timings"]
    assert "whitening" in first and "whitening" not in second  # factors came from the cache
    assert list((workspace / "cache2").glob("factors-*")) and not list((workspace / "cache2").glob("*.tmp*"))


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "strictly between 0 and 1"),
    (["--ratio", "0.7", "--storage", "hq"], "use --storage remap"),
    (["--ratio", "0.5", "--calib-samples", "500"], "were asked for"),
])
def test_bad_input_gives_a_clear_error_and_exit_code_2(workspace, capsys, extra, message):
    code, out, err = _run(capsys, "compress", workspace / "model", "--out", workspace / "bad", "--calib-file",
                          workspace / "calib.txt", "--seq-len", "64", "--cache-dir", "none", *extra)
    assert code == 2
    assert message in err


def test_missing_model_directory(workspace, capsys):
    code, _, err = _run(capsys, "eval", workspace / "nowhere.gguf", "--text-file", workspace / "eval.txt")
    assert code == 2 and "GGUF file not found" in err


def test_python_api_round_trip(workspace):
    model, tokenizer, _ = zssvd.load_model(workspace / "model")
    calib = zssvd.calibration.from_files(tokenizer, [workspace / "calib.txt"], 8, 64)
    model, report = zssvd.compress(model, calib, CompressionConfig(ratio=0.5, strategy="uniform"))
    assert report["achieved_ratio"] <= 0.5


def test_offloaded_and_block_order_compression_match_the_resident_one(workspace, capsys):
    ranks = []
    for i, extra in enumerate(([], ["--offload", workspace / "offload"], ["--pass-order", "block"])):
        out_dir = workspace / f"out-offload-{i}"
        code, out, err = _run(capsys, "compress", workspace / "model", "--ratio", "0.6", "--out", out_dir,
                              "--calib-file", workspace / "calib.txt", "--calib-samples", "6", "--seq-len", "32",
                              "--cache-dir", "none", "--no-plots", *extra)
        assert code == 0, err
        ranks.append(json.loads((out_dir / "report.json").read_text())["ranks"])
    assert ranks[0] == ranks[1] == ranks[2]
    assert list((workspace / "offload").iterdir()) == []  # the offloaded weights are cleaned up


@pytest.mark.parametrize("quiet", [False, True])
def test_zssvd_quiet_environment_silences_progress_bars(workspace, capsys, monkeypatch, quiet):
    import zssvd.runtime.progress

    monkeypatch.setenv("ZSSVD_QUIET", "1" if quiet else "0")
    monkeypatch.setattr(zssvd.runtime.progress, "_quiet", False)
    code = main(["eval", str(workspace / "model"), "--text-file", str(workspace / "eval.txt"), "--seq-len", "64",
                 "--max-windows", "2"])
    _, err = capsys.readouterr()
    assert code == 0
    assert ("perplexity:" in err) != quiet  # the bar's description


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line_with_the_fix(workspace, capsys):
    code, out, err = _run(capsys, "eval", workspace / "model", "--device", "cuda", "--text-file",
                          workspace / "eval.txt")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device cuda" in err and "use --device cpu" in err


def test_ctrl_c_exits_130_with_a_resume_hint(workspace, capsys, monkeypatch):
    import zssvd.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(zssvd.cli.main.__globals__, "cmd_eval", interrupted)
    code, out, err = _run(capsys, "eval", workspace / "model", "--text-file", workspace / "eval.txt")
    assert code == 130 and "interrupted; rerun the same command to resume" in err
    monkeypatch.setenv("ZSSVD_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        _run(capsys, "eval", workspace / "model", "--text-file", workspace / "eval.txt")


def test_compress_keeps_the_mmap_threshold_until_it_has_saved_and_eval_leaves_it_alone(workspace, capsys,
                                                                                     monkeypatch):
    import zssvd.runtime.memory as memory
    from zssvd.io import checkpoint

    calls = []
    libc = type("Libc", (), {"mallopt": lambda self, param, value: calls.append(value) or 1,
                             "malloc_trim": lambda self, pad: 1})()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    save = checkpoint.save_compressed
    monkeypatch.setattr(checkpoint, "save_compressed", lambda *a, **k: calls.append("save") or save(*a, **k))
    code, _, err = _run(capsys, "compress", workspace / "model", "--ratio", "0.7", "--out", workspace / "out-mmap",
                        "--calib-file", workspace / "calib.txt", "--calib-samples", "4", "--seq-len", "64",
                        "--cache-dir", "none", "--strategy", "uniform")
    assert code == 0, err
    assert calls == [memory.LARGE_BLOCK_BYTES, "save", memory.SETTLED_THRESHOLD_BYTES]
    calls.clear()
    code, _, err = _run(capsys, "eval", workspace / "out-mmap", "--text-file", workspace / "eval.txt",
                        "--seq-len", "64", "--max-windows", "2")
    assert code == 0 and calls == [], err
