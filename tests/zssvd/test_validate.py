"""Numeric options are checked once, with the same rule in the API and on the command line."""
import argparse

import pytest

from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.validate import int_at_least, optional_int, require_int


@pytest.mark.parametrize("value", [0, -2, 1.5, "3", True, None])
def test_require_int_refuses_what_is_not_an_integer_in_range(value):
    with pytest.raises(ValueError, match=r"^micro_batch must be an integer >= 1, got "):
        require_int("micro_batch", value, 1)


def test_require_and_optional_int_accept_valid_values():
    assert require_int("n", 3, 1) == 3 and optional_int("n", None, 1) is None and optional_int("n", 1, 1) == 1


@pytest.mark.parametrize("text", ["0", "-2", "x", "1.5"])
def test_the_cli_type_uses_the_same_rule(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be an integer >= 1, got"):
        int_at_least(1)(text)
    assert int_at_least(1)("4") == 4


@pytest.mark.parametrize("make, message", [
    (lambda: AnalysisOptions(micro_batch=0), "micro_batch must be an integer >= 1, got 0"),
    (lambda: AnalysisOptions(micro_batch=-2), "micro_batch must be an integer >= 1, got -2"),
    (lambda: AnalysisOptions(base_jitter=-1.0), "base_jitter must be >= 0"),
    (lambda: CompressionConfig(corrections=-1), "corrections must be an integer >= 0, got -1"),
    (lambda: CompressionConfig(min_rank=0), "min_rank must be an integer >= 1, got 0"),
], ids=["micro-batch-0", "micro-batch-negative", "jitter", "corrections", "min-rank"])
def test_options_and_configs_check_their_numbers(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_text_file_with_a_stray_byte_or_its_own_replacement_characters_is_read(tmp_path):
    from zssvd.validate import read_text_file

    path = tmp_path / "mostly.txt"
    path.write_bytes(b"plain text " * 20 + b"\xff" + "\ufffd is a character too".encode() * 20)
    text = read_text_file(path)
    assert text.count("\ufffd") == 21 and text.startswith("plain text")  # 1 undecodable byte of ~700 chars


def test_the_python_api_refuses_what_is_not_text_as_the_cli_does(tmp_path):
    from tiny_models import tiny_tokenizer
    from zssvd.evaluation.evaluate import evaluation_ids
    from zssvd.stages.calibration import from_files

    (tmp_path / "binary").write_bytes(b"\x7fELF\x00\x00" * 100)
    with pytest.raises(ValueError, match="binary"):
        from_files(tiny_tokenizer(), [tmp_path / "binary"], 2, 8)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        evaluation_ids(tiny_tokenizer(), text_files=[tmp_path])


@pytest.mark.parametrize("samples, seq_len, message", [
    (0, 8, "num_samples must be an integer >= 1, got 0"),
    (2, 1, "seq_len must be an integer >= 2, got 1"),
])
def test_calibration_counts_are_checked_before_any_work(tmp_path, samples, seq_len, message):
    from tiny_models import english_text, tiny_model, tiny_tokenizer
    from zssvd.stages.calibration import from_files, from_model

    (tmp_path / "calib.txt").write_text(english_text(500))
    with pytest.raises(ValueError, match=message):
        from_files(tiny_tokenizer(), [tmp_path / "calib.txt"], samples, seq_len)
    with pytest.raises(ValueError, match=message):
        from_model(tiny_model(), tiny_tokenizer(), samples, seq_len)


def test_lists_and_prompts():
    from zssvd.validate import int_list_at_least, require_text

    assert int_list_at_least(1)("1, 8,") == [1, 8]
    for text in ("", "1,0", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list_at_least(1)(text)
    assert require_text("prompt", "hi") == "hi"
    with pytest.raises(ValueError, match="prompt is empty"):
        require_text("prompt", " \n")


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_len": 0}, "prompt_len must be an integer >= 1, got 0"),
    ({"new_tokens": 1}, "new_tokens must be an integer >= 2, got 1"),
    ({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
    ({"batches": (1, 0)}, "batch must be an integer >= 1, got 0"),
])
def test_bench_serve_checks_its_numbers_before_loading(tmp_path, kwargs, message):
    from zssvd.evaluation.serve import bench_serve

    with pytest.raises(ValueError, match=message):
        bench_serve(tmp_path / "not-even-a-checkpoint", **kwargs)
