"""Perplexity against a hand computation; non-finite losses are errors, never skipped."""
import math

import pytest
import torch

from tiny_models import random_windows, tiny_model
from zssvd.evaluation.evaluate import NonFiniteLossError, default_seq_len, perplexity


def test_perplexity_matches_a_hand_computation():
    model = tiny_model("llama")
    ids = random_windows(1, 100, seed=7).flatten()
    result = perplexity(model, ids, seq_len=32, max_windows=None)
    assert result["windows"] == 3 and result["tokens"] == 3 * 31
    total = 0.0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 32:(w + 1) * 32]
            logits = model(window[None]).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            total -= sum(logp[t, window[t + 1]].item() for t in range(31))
    assert result["perplexity"] == pytest.approx(math.exp(total / 93), rel=1e-5)


def test_max_windows_and_batching_do_not_change_the_answer():
    model = tiny_model("llama")
    ids = random_windows(1, 200, seed=8).flatten()
    one = perplexity(model, ids, seq_len=25, max_windows=5)
    batched = perplexity(model, ids, seq_len=25, max_windows=5, batch_size=3)
    assert one["windows"] == 5
    assert one["perplexity"] == pytest.approx(batched["perplexity"], rel=1e-5)


def test_a_non_finite_window_is_an_error_not_skipped():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="window 0"):
        perplexity(model, random_windows(1, 64).flatten(), seq_len=32)


def test_too_short_text_and_default_window():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seq_len=32)
    assert default_seq_len(model) == 128  # the tiny model's context is below 2048
    assert default_seq_len(model, 64) == 64
