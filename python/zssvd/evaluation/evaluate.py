"""Perplexity over non-overlapping windows of a text, with float32 losses.

Every window counts: a window whose loss is not finite raises an error naming it, instead of
being skipped (skipping silently flatters a broken model).
"""
from __future__ import annotations

import math

import torch

from ..stages.calibration import load_dataset_text, read_texts, tokenize_stream, with_bos
from ..stages.gradients import next_token_loss_sum
from ..runtime.progress import progress
from ..validate import optional_int, require_int

DEFAULT_SEQ_LEN = 2048


class NonFiniteLossError(FloatingPointError):
    pass


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def default_seq_len(model, requested: int | None = None) -> int:
    """The requested window (checked against the model's context), else 2048 capped at that context."""
    limit = context_length(model)
    if requested is not None:
        return check_window(requested, limit)
    return min(DEFAULT_SEQ_LEN, int(limit or DEFAULT_SEQ_LEN))


def check_window(seq_len: int, limit: int | None) -> int:
    require_int("seq_len", seq_len, 2)
    if limit and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({limit} tokens); "
                         f"use a window of at most {limit}")
    return seq_len


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, *, max_windows: int | None = None,
               batch_size: int = 1, desc: str = "perplexity", bos_id: int | None = None) -> dict:
    """Perplexity of ``model`` on the token stream ``ids`` cut into windows of ``seq_len``.

    ``max_windows``: None for every window, else at least 1. ``bos_id`` (``bos_token_id(tokenizer)``):
    every window is that token followed by ``seq_len - 1`` text tokens, as the model saw in training;
    the BOS itself is never a prediction target, so each window still scores ``seq_len - 1`` tokens.
    """
    check_window(seq_len, context_length(model))
    optional_int("max_windows", max_windows, 1)
    require_int("batch_size", batch_size, 1)
    text_len = seq_len - (bos_id is not None)
    windows = ids.numel() // text_len
    if windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                         "use a longer text or a smaller --seq-len")
    if max_windows is not None:
        windows = min(windows, max_windows)
    device = next(model.parameters()).device
    stream = with_bos(ids[: windows * text_len].view(windows, text_len), bos_id)
    total_nll, total_tokens = 0.0, 0
    for start in progress(range(0, windows, batch_size), desc=desc, unit="window"):
        batch = stream[start:start + batch_size].to(device)
        nll = next_token_loss_sum(model(batch, use_cache=False).logits, batch).item()
        if not math.isfinite(nll):
            raise NonFiniteLossError(f"non-finite loss in window {start} (tokens {start * text_len}.."
                                     f"{(start + len(batch)) * text_len - 1}): the model produces NaN/Inf")
        total_nll += nll
        total_tokens += batch.shape[0] * (seq_len - 1)
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": windows,
            "seq_len": seq_len, "bos": bos_id is not None}


def evaluation_ids(tokenizer, *, text_files=None, dataset: str | None = None) -> torch.Tensor:
    """The token stream of local text files, or of a named dataset's evaluation split."""
    if text_files:
        return tokenize_stream(tokenizer, read_texts(text_files))
    if dataset:
        return tokenize_stream(tokenizer, load_dataset_text(dataset, "eval"))
    raise ValueError("give a text file (--text-file) or a dataset name (--dataset)")
