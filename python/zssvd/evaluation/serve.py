"""Serving a compressed checkpoint: text generation and a prefill/decode throughput benchmark.

``bench_serve`` measures the compressed model and its dense original in the same run, on the
same random prompts (never zeros): prefill tokens/s (one forward over the prompts), decode
tokens/s (greedy generation with a KV cache, the prefill subtracted) and, on a GPU, peak memory.
On CUDA, ``static=True`` uses a static KV cache with ``torch.compile(mode="reduce-overhead")``,
which captures the decode step in CUDA graphs.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from ..io.checkpoint import MANIFEST, load


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, do_sample: bool = False,
                  seed: int = 0, chat: bool = False) -> str:
    """Continue ``prompt`` (greedy by default, so the output is deterministic)."""
    device = next(model.parameters()).device
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, do_sample=do_sample,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def dense_original(directory: str | Path, source: str = "auto", device="cpu"):
    """The uncompressed model a checkpoint came from: its source path, or random weights of the same shapes."""
    from transformers import AutoModelForCausalLM

    from ..io.hf_config import ZSSVDConfig
    from ..io.models import load_model

    directory = Path(directory)
    dtype = getattr(torch, json.loads((directory / MANIFEST).read_text())["dtype"])
    if source == "auto":
        report = directory / "report.json"
        source = json.loads(report.read_text()).get("model", "random") if report.is_file() else "random"
    if source != "random":
        try:
            model, _, _ = load_model(source, dtype=dtype, device=device)
            return model, source
        except (OSError, ValueError) as err:
            print(f"could not load the original {source!r} ({err}); timing random weights of the same shapes")
    torch.manual_seed(0)
    config = ZSSVDConfig.from_pretrained(directory).to_base()
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), "random weights, same shapes"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compilation, cache allocation, graph capture
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3, static: bool = False) -> dict:
    """Prefill and decode throughput of one model at one batch size."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if static and device.type == "cuda":
        kwargs["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    prefill = _median_seconds(lambda: model(ids, use_cache=False), repeats, device)
    one = _median_seconds(lambda: model.generate(ids, max_new_tokens=1, **kwargs), repeats, device)
    full = _median_seconds(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  **kwargs), repeats, device)
    row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "prefill_tokens_per_s": batch * prompt_len / prefill,
           "decode_tokens_per_s": _decode_rate(batch, new_tokens, full, one)}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _decode_rate(batch: int, new_tokens: int, full: float, one: float) -> float:
    """Tokens/s of the decode steps: (N - 1) steps take the time of an N-token generate minus a 1-token one.
    NaN, with a warning, when timing noise makes that difference non-positive."""
    if full <= one:
        warnings.warn(f"decode time not resolved (generate {new_tokens} tokens: {full:.4f} s, 1 token: {one:.4f} s); "
                      "raise --new-tokens or --repeats", RuntimeWarning, stacklevel=2)
        return float("nan")
    return batch * (new_tokens - 1) / (full - one)


def load_and_measure_memory(directory: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint; with it, the device memory it took against the byte count its report promises.

    On CUDA the memory is the allocator's count of live bytes before and after loading; elsewhere,
    where there is no allocator to ask, the bytes of the loaded parameters and buffers.
    """
    from ..report import model_nbytes

    device = torch.device(device)
    report_path = Path(directory) / "report.json"
    promised = json.loads(report_path.read_text()).get("model_bytes") if report_path.is_file() else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    model = load(directory, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        taken = torch.cuda.memory_allocated(device) - before
    else:
        taken = model_nbytes(model)
    memory = {"loaded_gib": taken / 2**30, "report_gib": promised / 2**30 if promised else None,
              "memory_vs_report": taken / promised - 1 if promised else None}
    return model, memory


def bench_serve(directory: str | Path, *, batches=(1, 8, 32), prompt_len: int = 128, new_tokens: int = 32,
                device: str = "cpu", dense: str = "auto", repeats: int = 3, static: bool = False) -> list[dict]:
    """Rows for the compressed checkpoint and its dense original, side by side.

    The compressed rows also say how much device memory the loaded checkpoint took against the
    report's ``model_bytes`` (``memory_vs_report``: relative difference).
    """
    rows = []
    compressed, memory = load_and_measure_memory(directory, device)
    for batch in batches:
        rows.append({"model": "compressed", **measure(compressed, batch, prompt_len, new_tokens,
                                                      repeats=repeats, static=static), **memory})
    del compressed
    original, label = dense_original(directory, dense, device)
    for batch in batches:
        rows.append({"model": f"dense ({label})", **measure(original, batch, prompt_len, new_tokens,
                                                            repeats=repeats, static=static)})
    return rows


def rows_to_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "model"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
