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
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(texts)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a long text as one stream of ids (no special tokens inserted)."""
    if not text.strip():
        raise ValueError("the text is empty")
    # Long texts exceed the model's max length on purpose: silence the tokenizer's warning.
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int, what: str, *,
                   contiguous: bool = False) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens at seeded random positions.

    ``contiguous=True`` takes the first ``num_samples * seq_len`` tokens instead (no seed).
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need at least 1 sample of at least 2 tokens, got {num_samples} x {seq_len}")
    slots = ids.numel() // seq_len
    if slots < num_samples:
        raise ValueError(
            f"{what} has {ids.numel()} tokens, enough for {slots} windows of {seq_len}, but {num_samples} "
            "were asked for: give more text, or lower --calib-samples or --seq-len"
        )
    if contiguous:
        return ids[:num_samples * seq_len].reshape(num_samples, seq_len).clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=generator)[:num_samples].sort().values
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in chosen.tolist()])


def from_files(tokenizer, paths: Sequence[str | Path], num_samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """Windows from local text files; several files are separate corpora of equal weight."""
    if not paths:
        raise ValueError("no calibration files given")
    return from_texts(tokenizer, {Path(p).name: read_texts([p]) for p in paths}, num_samples, seq_len, seed)


def from_texts(tokenizer, texts: dict[str, str], num_samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """Windows from named texts, each an equally weighted corpus.

    With k texts, each contributes num_samples / k windows (the first ones one more when it does
    not divide), so a long corpus cannot drown a short one; the gradient, and hence every score,
    is then the average of the corpora's own.
    """
    names = list(texts)
    shares = [num_samples // len(names) + (i < num_samples % len(names)) for i in range(len(names))]
    parts = []
    for i, (name, share) in enumerate(zip(names, shares)):
        if share:
            ids = tokenize_stream(tokenizer, texts[name])
            parts.append(sample_windows(ids, share, seq_len, seed + i, what=f"the calibration text {name}"))
    return CalibrationSet(torch.cat(parts), source=f"files:{', '.join(names)}")


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


def from_dataset(tokenizer, name: str, num_samples: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    ids = tokenize_stream(tokenizer, load_dataset_text(name, "calib"))
    windows = sample_windows(ids, num_samples, seq_len, seed, what=f"dataset {name}")
    return CalibrationSet(windows, source=f"dataset:{name}")


@torch.no_grad()
def from_model(model, tokenizer, num_samples: int, seq_len: int, seed: int = 0,
               batch_size: int = 32, temperature: float = 1.0) -> CalibrationSet:
    """Data-free calibration: sequences sampled from the model itself (seeded).

    Each sequence starts from a random ordinary (non-special) token and is continued by plain
    sampling at ``temperature``, ``batch_size`` sequences at a time (larger batches amortise the
    per-step cost: on a 2-core CPU, 32 sequences take about 1.8x the time of 8).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows = []
    with progress(total=num_samples * (seq_len - 1), desc="sampling calibration text", unit="tok") as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            first = torch.randint(0, vocab, (n, 1), generator=generator)
            for i in range(n):  # avoid special tokens as seeds
                while int(first[i, 0]) in special:
                    first[i, 0] = torch.randint(0, vocab, (1,), generator=generator)
            rows.append(_sample(model, first.to(device), seq_len, generator, temperature, bar).cpu())
    return CalibrationSet(torch.cat(rows), source=f"self-sampled(t={temperature})")


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
