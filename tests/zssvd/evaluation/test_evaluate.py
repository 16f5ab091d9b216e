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


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=0), r"seq_len must be an integer >= 2, got 0"),
    (dict(seq_len=129), r"seq_len 129 is longer than the model's context \(128 tokens\)"),
    (dict(seq_len=16, max_windows=0), r"max_windows must be an integer >= 1, got 0"),
    (dict(seq_len=16, max_windows=-1), r"max_windows must be an integer >= 1, got -1"),
    (dict(seq_len=16, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
], ids=["zero-window", "beyond-context", "zero-windows", "negative-windows", "zero-batch"])
def test_options_are_checked_not_reinterpreted(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        perplexity(model, random_windows(1, 300).flatten(), **kwargs)


def test_default_window_checks_an_explicit_request():
    model = tiny_model("llama")  # context 128
    assert default_seq_len(model) == 128 and default_seq_len(model, 64) == 64
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 0"):
        default_seq_len(model, 0)


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    from tiny_models import english_text, tiny_tokenizer
    from zssvd.stages.calibration import bos_token_id, tokenize_stream

    model = tiny_model("llama")
    tokenizer = tiny_tokenizer(bos=True)
    bos = bos_token_id(tokenizer)
    assert bos == tokenizer.bos_token_id == 95
    ids = tokenize_stream(tokenizer, english_text(40, seed=2))
    assert bos not in ids.tolist()  # the stream itself carries no BOS; windows get it
    result = perplexity(model, ids, seq_len=32, max_windows=3, bos_id=bos)
    assert result["bos"] and result["windows"] == 3 and result["tokens"] == 3 * 31
    total = 0.0
    with torch.no_grad():
        for w in range(3):  # each window: BOS + the next 31 text tokens; BOS is never a target
            window = torch.cat([torch.tensor([bos]), ids[w * 31:(w + 1) * 31]])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= sum(logp[t, window[t + 1]].item() for t in range(31))
    assert result["perplexity"] == pytest.approx(math.exp(total / 93), rel=1e-5)
    without = perplexity(model, ids, seq_len=32, max_windows=3)
    assert not without["bos"] and without["perplexity"] != pytest.approx(result["perplexity"], rel=1e-6)
    assert bos_token_id(tiny_tokenizer()) is None
