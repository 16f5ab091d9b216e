"""The default micro-batch: one window per step on the CPU, four on an accelerator, as asked otherwise."""
import pytest

from tiny_models import random_windows, tiny_model
from zssvd.config import AnalysisOptions
from zssvd.io.models import find_targets


def _resolved_micro_batch(**settings) -> int:
    model = tiny_model("llama")
    return AnalysisOptions(**settings).resolved(model, find_targets(model, None), (8, 16)).micro_batch


def test_the_cpu_default_is_one_window_per_step():
    assert AnalysisOptions().micro_batch is None  # decided where the device is known
    assert _resolved_micro_batch() == 1
    assert _resolved_micro_batch(pass_order="batch") == 1


def test_an_accelerator_keeps_four_and_an_explicit_value_stays():
    assert _resolved_micro_batch(device="meta") == 4  # any device that is not the CPU
    assert _resolved_micro_batch(micro_batch=4) == 4
    assert _resolved_micro_batch(micro_batch=2, device="meta") == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_a_bad_micro_batch_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="^micro_batch must be an integer >= 1"):
        AnalysisOptions(micro_batch=bad)
