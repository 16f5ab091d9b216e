"""Stage 1 (calibrate) -- calibration data: N windows of L tokens, reproducible from a seed.

Three sources:
* local text files (``--calib-file``, repeatable): tokenised as one stream, windows drawn
  without overlap at seeded random positions;
* a dataset name (``wikitext2``, ``ptb``, ``c4``) through the ``datasets`` library, when the hub
  is reachable;
* data-free (``--calib-self``): sequences sampled from the model itself.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..runtime.progress import progress
from ..validate import read_text_file, require_windows

# name -> (dataset path, config, split, text column) for the calibration *and* evaluation suites
DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", {"calib": "train", "eval": "test"}, "sentence"),
    "c4": ("allenai/c4", "en", {"calib": "train", "eval": "validation"}, "text"),
}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


@dataclass
class CalibrationSet:
    """Token windows (N x L, int64) plus a description of where they came from."""

    input_ids: torch.Tensor
    source: str
    bos: bool = False  # every window starts with the tokenizer's BOS token (``bos_token_id``)

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """Hash of the exact tokens, used to key caches."""
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def read_texts(paths: Sequence[str | Path]) -> str:
    """The files' texts, joined; a directory, a binary or a non-UTF-8 file is refused (``read_text_file``)."""
    return "\n\n".join(read_text_file(p) for p in paths)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a long text as one stream of ids (no special tokens inserted)."""
    if not text.strip():
        raise ValueError("the text is empty")
    # Long texts exceed the model's max length on purpose: silence the tokenizer's warning.
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` starts its sequences with one, else None.

    It does when encoding with special tokens puts BOS first (``add_bos_token``, or a post-processor
    such as LLaMA-3's), or when its chat template inserts ``bos_token`` at the start (Gemma, Mistral).
    A template that merely begins with the same text (SmolLM2's ``<|im_start|>``, which is also its
    bos_token) does not count: the template must name ``bos_token``.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    if encoded and encoded[0] == bos:
        return int(bos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "bos_token" in template:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
        except Exception:  # a template that needs other roles or variables: it gives no answer, not an error
            return None
        if isinstance(text, str) and text.startswith(tokenizer.bos_token):
            return int(bos)
    return None


def with_bos(chunks: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``chunks`` (N x L-1 text tokens) with ``bos`` in front of each, or unchanged when ``bos`` is None."""
    if bos is None:
        return chunks
    return torch.cat([torch.full((chunks.shape[0], 1), bos, dtype=chunks.dtype), chunks], dim=1)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int, what: str, *,
                   contiguous: bool = False, bos: int | None = None) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens at seeded random positions.

    ``contiguous=True`` takes the first windows instead (no seed). With a ``bos`` id every window is
    that token followed by ``seq_len - 1`` text tokens, so windows keep their length.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got {num_samples} x {seq_len}")
    text_len = seq_len - (bos is not None)
    slots = ids.numel() // text_len
    if slots < num_samples:
        raise ValueError(
            f"{what} has {ids.numel()} tokens, enough for {slots} windows of {seq_len}, but {num_samples} "
            "were asked for: give more text, or lower --calib-samples or --seq-len"
        )
    if contiguous:
        return with_bos(ids[:num_samples * text_len].reshape(num_samples, text_len).clone(), bos)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=generator)[:num_samples].sort().values
    return with_bos(torch.stack([ids[s * text_len:(s + 1) * text_len] for s in chosen.tolist()]), bos)


def from_files(tokenizer, paths: Sequence[str | Path], num_samples: int, seq_len: int, seed: int = 0, *,
               use_bos: bool = True) -> CalibrationSet:
    """Windows from local text files; several files are separate corpora of equal weight."""
    if not paths:
        raise ValueError("no calibration files given")
    texts = {Path(p).name: read_texts([p]) for p in paths}
    return from_texts(tokenizer, texts, num_samples, seq_len, seed, use_bos=use_bos)


def from_texts(tokenizer, texts: dict[str, str], num_samples: int, seq_len: int, seed: int = 0, *,
               use_bos: bool = True) -> CalibrationSet:
    """Windows from named texts, each an equally weighted corpus.

    With k texts, each contributes num_samples / k windows (the first ones one more when it does
    not divide), so a long corpus cannot drown a short one; the gradient, and hence every score,
    is then the average of the corpora's own. ``use_bos``: windows start with BOS when the
    tokenizer adds one (``bos_token_id``); False keeps plain text windows.
    """
    require_windows(num_samples, seq_len)  # 0 samples would leave no window to concatenate
    names = list(texts)
    bos = bos_token_id(tokenizer) if use_bos else None
    shares = [num_samples // len(names) + (i < num_samples % len(names)) for i in range(len(names))]
    parts = []
    for i, (name, share) in enumerate(zip(names, shares)):
        if share:
            ids = tokenize_stream(tokenizer, texts[name])
            what = f"the calibration text {name}"
            parts.append(sample_windows(ids, share, seq_len, seed + i, what=what, bos=bos))
    return CalibrationSet(torch.cat(parts), source=f"files:{', '.join(names)}", bos=bos is not None)


def load_dataset_text(name: str, purpose: str) -> str:
    """The raw text of a named corpus split, downloaded through ``datasets`` (needs the hub)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a local text file)")
    try:
        import datasets
    except ImportError as err:
        raise ImportError("named datasets need the datasets package: pip install datasets "
                          "(or pass a local text file)") from err
    path, config, splits, column = DATASETS[name]
    split = splits[purpose]
    try:
        if name == "c4":  # one shard is plenty; the full corpus is terabytes
            data = datasets.load_dataset(path, data_files={split: C4_FILES[split]}, split=split)
            data = data.select(range(min(len(data), 20000)))
        else:
            data = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # the hub is unreachable, a gated dataset, ...
        raise RuntimeError(
            f"could not load dataset {name!r} ({path}/{config}, split {split}): {err}\n"
            "On an offline machine pass a local text file instead (--calib-file / --text-file)."
        ) from err
    return "\n\n".join(row for row in data[column] if row)


def from_dataset(tokenizer, name: str, num_samples: int, seq_len: int, seed: int = 0, *,
                 use_bos: bool = True) -> CalibrationSet:
    ids = tokenize_stream(tokenizer, load_dataset_text(name, "calib"))
    bos = bos_token_id(tokenizer) if use_bos else None
    windows = sample_windows(ids, num_samples, seq_len, seed, what=f"dataset {name}", bos=bos)
    return CalibrationSet(windows, source=f"dataset:{name}", bos=bos is not None)


@torch.no_grad()
def from_model(model, tokenizer, num_samples: int, seq_len: int, seed: int = 0,
               batch_size: int = 32, temperature: float = 1.0, use_bos: bool = True) -> CalibrationSet:
    """Data-free calibration: sequences sampled from the model itself (seeded).

    Each sequence starts from a random ordinary (non-special) token, after BOS when the tokenizer
    adds one, and is continued by plain sampling at ``temperature``, ``batch_size`` sequences at a
    time (larger batches amortise the per-step cost: on a 2-core CPU, 32 sequences take about 1.8x
    the time of 8).
    """
    require_windows(num_samples, seq_len)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    bos = bos_token_id(tokenizer) if use_bos else None
    rows = []
    sampled = seq_len - 1 - (bos is not None)  # tokens drawn per sequence
    with progress(total=num_samples * sampled, desc="sampling calibration text", unit="tok") as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            first = torch.randint(0, vocab, (n, 1), generator=generator)
            for i in range(n):  # avoid special tokens as seeds
                while int(first[i, 0]) in special:
                    first[i, 0] = torch.randint(0, vocab, (1,), generator=generator)
            prompt = with_bos(first, bos).to(device)
            rows.append(_sample(model, prompt, seq_len, generator, temperature, bar).cpu())
    return CalibrationSet(torch.cat(rows), source=f"self-sampled(t={temperature})", bos=bos is not None)


def _sample(model, ids: torch.Tensor, seq_len: int, generator: torch.Generator, temperature: float,
            bar=None) -> torch.Tensor:
    """Ancestral sampling with a KV cache; the CPU generator keeps runs identical across devices."""
    out = model(ids, use_cache=True)
    past, tokens = out.past_key_values, [ids]
    logits = out.logits[:, -1]
    for _ in range(seq_len - ids.shape[1]):
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).to(ids.device)
        tokens.append(nxt)
        if bar is not None:
            bar.update(nxt.shape[0])
        out = model(nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(tokens, dim=1)
