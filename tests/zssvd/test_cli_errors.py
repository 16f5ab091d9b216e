"""The command line's error contract: every bad option or input is one line on stderr that names the problem and
the fix, with exit code 2, before any slow work; no traceback (ZSSVD_DEBUG=1 shows it)."""
import json

import pytest

import zssvd
from tiny_models import english_text, random_windows, save_tiny_model_dir, tiny_model, tiny_tokenizer
from zssvd.cli import EXIT_USAGE, main
from zssvd.config import CompressionConfig
from zssvd.stages.calibration import CalibrationSet


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    save_tiny_model_dir(root / "model")
    (root / "calib.txt").write_text(english_text(3000, seed=1))
    (root / "binary").write_bytes(bytes(range(256)) * 40)  # NUL bytes: what /bin/ls looks like
    (root / "latin1.txt").write_bytes("café, naïve, façade, déjà vu: où est-ce? ".encode("latin-1") * 100)
    model, report = zssvd.compress(tiny_model(), CalibrationSet(random_windows(4, 16, seed=3), "random"),
                                   CompressionConfig(ratio=0.6))
    zssvd.save_compressed(model, root / "ckpt", tokenizer=tiny_tokenizer(), report=report)
    return root


def _error(capsys, *argv) -> str:
    """stderr of a command that must fail with exit code 2 and one line (argparse exits, commands return)."""
    try:
        code = main([*map(str, argv), "--quiet"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _eval(workspace, *extra):
    return ["eval", workspace / "ckpt", "--text-file", workspace / "calib.txt", *extra]


def _compress(workspace, *extra):
    return ["compress", workspace / "model", "--ratio", "0.6", "--out", workspace / "out", "--cache-dir", "none",
            "--calib-file", workspace / "calib.txt", "--seq-len", "32", *extra]


@pytest.mark.parametrize("command, option, value, message", [
    ("eval", "--seq-len", "0", "must be an integer >= 2, got 0"),
    ("eval", "--max-windows", "0", "must be an integer >= 1, got 0"),
    ("eval", "--max-windows", "-1", "must be an integer >= 1, got -1"),
    ("eval", "--batch-size", "x", "must be an integer >= 1, got 'x'"),
    ("compress", "--calib-samples", "0", "must be an integer >= 1, got 0"),
    ("compress", "--micro-batch", "0", "must be an integer >= 1, got 0"),
    ("compress", "--micro-batch", "-2", "must be an integer >= 1, got -2"),
    ("compress", "--corrections", "-1", "must be an integer >= 0, got -1"),
    ("bench-serve", "--batch", "1,0", "must be an integer >= 1, got 0"),
    ("bench-serve", "--new-tokens", "1", "must be an integer >= 2, got 1"),
    ("bench-serve", "--repeats", "0", "must be an integer >= 1, got 0"),
    ("generate", "--max-new-tokens", "0", "must be an integer >= 1, got 0"),
    ("demo", "--eval-windows", "0", "must be an integer >= 1, got 0"),
    ("demo", "--threads", "-1", "must be an integer >= 0, got -1"),
    ("lm-eval", "--limit", "0", "must be an integer >= 1, got 0"),
])
def test_a_numeric_option_out_of_range_is_a_usage_error(workspace, capsys, command, option, value, message):
    base = {"eval": _eval(workspace), "compress": _compress(workspace),
            "bench-serve": ["bench-serve", workspace / "ckpt"],
            "generate": ["generate", workspace / "ckpt", "--prompt", "the"],
            "demo": ["demo"], "lm-eval": ["lm-eval", workspace / "ckpt", "--tasks", "x"]}[command]
    err = _error(capsys, *base, f"{option}={value}")
    assert f"zssvd {command}: error: argument {option}: {message}; see zssvd {command} --help" == err


@pytest.mark.parametrize("make_argv", [
    lambda w, bad: _eval(w)[:2] + ["--text-file", bad],
    lambda w, bad: _compress(w)[:-4] + ["--calib-file", bad],
], ids=["eval", "compress"])
@pytest.mark.parametrize("name, message", [
    ("binary", "is not a text file (it contains NUL bytes: a binary file?); pass a UTF-8 text file"),
    ("latin1.txt", "is not UTF-8 text (600 of 4100 characters undecodable); convert it to UTF-8"),
    (".", "is a directory, not a text file; pass the text files inside it"),
    ("missing.txt", "text file not found"),
])
def test_what_is_not_a_text_file_is_refused(workspace, capsys, make_argv, name, message):
    err = _error(capsys, *make_argv(workspace, workspace / name))
    assert str(workspace / name) in err and message in err


@pytest.mark.parametrize("argv", [
    lambda w: _eval(w, "--seq-len", "256"),
    lambda w: _compress(w)[:-2] + ["--seq-len", "256"],
], ids=["eval", "compress"])
def test_a_window_longer_than_the_context_is_refused_in_eval_and_compress_alike(workspace, capsys, argv):
    err = _error(capsys, *argv(workspace))
    assert "256 is longer than the model's context (128 tokens); use a window of at most 128" in err


def test_the_default_window_is_capped_at_the_context(workspace, capsys):
    assert main([*map(str, _eval(workspace)), "--max-windows", "1", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 128  # 2048 capped at the tiny model's context


@pytest.fixture(scope="module")
def no_config(workspace):
    """A checkpoint and a Hugging Face directory, each without its config.json."""
    import shutil

    for name in ("ckpt", "model"):
        shutil.copytree(workspace / name, workspace / f"{name}-no-config")
        (workspace / f"{name}-no-config" / "config.json").unlink()
    return workspace


@pytest.mark.parametrize("command", ["eval", "bench-serve", "generate"])
def test_a_checkpoint_without_config_json(no_config, capsys, command):
    extra = {"eval": ["--text-file", no_config / "calib.txt"], "bench-serve": [],
             "generate": ["--prompt", "the"]}[command]
    err = _error(capsys, command, no_config / "ckpt-no-config", *extra)
    assert "is not a zssvd checkpoint: config.json is missing; copy it from the original checkpoint" in err
    with pytest.raises(zssvd.CheckpointError, match="config.json is missing"):
        zssvd.load(no_config / "ckpt-no-config")


def test_a_model_directory_without_config_json(no_config, capsys):
    err = _error(capsys, *_eval(no_config)[:1], no_config / "model-no-config", *_eval(no_config)[2:])
    assert "(no config.json); pass the directory that holds config.json and the weights" in err


@pytest.mark.parametrize("path, message", [
    ("nowhere", "model directory not found"),
    ("calib.txt", "is a file, not a model"),
])
def test_a_model_path_that_is_not_a_model(workspace, capsys, path, message):
    err = _error(capsys, "eval", workspace / path, "--text-file", workspace / "calib.txt")
    assert message in err and str(workspace / path) in err


@pytest.mark.parametrize("prompt", ["", "  "])
def test_an_empty_prompt(workspace, capsys, prompt):
    err = _error(capsys, "generate", workspace / "ckpt", f"--prompt={prompt}")
    assert err == "zssvd generate: error: --prompt is empty; give some text to continue"
    from zssvd.evaluation.serve import generate_text

    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(zssvd.load(workspace / "ckpt"), tiny_tokenizer(), prompt)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertLMHeadModel

    path = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, is_decoder=False)
    BertLMHeadModel(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_an_encoder_is_refused(workspace, bert_dir, capsys, command):
    if command == "compress":
        argv = ["compress", bert_dir, "--blocks", "bert.encoder.layer", *_compress(workspace)[2:]]
    else:
        argv = ["eval", bert_dir, "--text-file", workspace / "calib.txt", "--seq-len", "32"]
    err = _error(capsys, *argv)
    assert "(bert, is_decoder=False) is an encoder" in err and "causal LMs only" in err
    assert not (workspace / "out" / "zssvd.json").exists()


def test_zssvd_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    monkeypatch.setenv("ZSSVD_DEBUG", "1")
    with pytest.raises(ValueError, match="not a text file"):
        main([*map(str, _eval(workspace)[:2]), "--text-file", str(workspace / "binary"), "--quiet"])


def test_an_unwritable_out_fails_before_any_work(workspace, capsys, monkeypatch):
    import zssvd.io.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(zssvd.io.models, "load_model", never)
    bad = workspace / "calib.txt" / "out"  # below a file: cannot be created, whoever runs the test (even root)
    argv = _compress(workspace)
    argv[argv.index("--out") + 1] = bad
    err = _error(capsys, *argv)
    assert f"--out {bad} cannot be written" in err and "choose another directory" in err


@pytest.mark.parametrize("ratio", ["0", "1", "nan", "-0.5"])
def test_a_ratio_outside_0_1_is_refused_before_loading(workspace, capsys, ratio):
    argv = _compress(workspace)
    argv[argv.index("--ratio") + 1] = ratio
    assert "ratio must lie strictly between 0 and 1" in _error(capsys, *argv)


def test_shard_model_with_offload_is_refused_before_loading(workspace, capsys, monkeypatch):
    import zssvd.io.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(zssvd.io.models, "load_model", never)
    err = _error(capsys, *_compress(workspace, "--shard-model", "--offload", "cpu"))
    assert "shard_model and offload do not combine" in err and "drop --offload" in err
