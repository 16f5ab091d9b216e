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
