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

from ..io.checkpoint import load
from ..validate import require_int, require_text


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, do_sample: bool = False,
                  seed: int = 0, chat: bool = False) -> str:
    """Continue ``prompt`` (greedy by default, so the output is deterministic)."""
    require_text("prompt", prompt)
    require_int("max_new_tokens", max_new_tokens, 1)
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


def dense_original(directory: str | Path, source: str = "auto", device="cpu", dtype: torch.dtype | None = None):
    """The uncompressed model a checkpoint came from: its source path, or random weights of the same shapes;
    in ``dtype`` (default: the checkpoint's stored dtype, what ``load`` computes in by default)."""
    from transformers import AutoModelForCausalLM

    from ..io.checkpoint import base_config, read_manifest
    from ..io.models import load_model

    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = dtype or getattr(torch, manifest["dtype"])
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
    config = base_config(directory, manifest)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), "random weights, same shapes"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timings:
    """Timed calls of one model at one batch size: prefill, a 1-token and an N-token generate."""

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int, static: bool):
        self.model, self.batch, self.prompt_len, self.new_tokens = model, batch, prompt_len, new_tokens
        self.device = next(model.parameters()).device
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(batch)
        self.ids = torch.randint(1, vocab, (batch, prompt_len), generator=gen).to(self.device)
        self.kwargs = dict(do_sample=False, attention_mask=torch.ones_like(self.ids), pad_token_id=0)
        if static and self.device.type == "cuda":
            self.kwargs["cache_implementation"] = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        self.calls = {"prefill": lambda: model(self.ids, use_cache=False),
                      "one": lambda: model.generate(self.ids, max_new_tokens=1, **self.kwargs),
                      "full": lambda: model.generate(self.ids, max_new_tokens=new_tokens,
                                                     min_new_tokens=new_tokens, **self.kwargs)}
        self.times: dict[str, list[float]] = {name: [] for name in self.calls}

    def warm_up(self) -> None:  # compilation, cache allocation, graph capture, the CPU paths' caches
        for call in self.calls.values():
            call()

    def run_once(self) -> None:
        for name, call in self.calls.items():
            _sync(self.device)
            start = time.perf_counter()
            call()
            _sync(self.device)
            self.times[name].append(time.perf_counter() - start)

    def row(self) -> dict:
        prefill, one, full = (statistics.median(self.times[name]) for name in ("prefill", "one", "full"))
        row = {"batch": self.batch, "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
               "prefill_tokens_per_s": self.batch * self.prompt_len / prefill,
               "decode_tokens_per_s": _decode_rate(self.batch, self.new_tokens, full, one)}
        if self.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row


def check_timing(batches, prompt_len: int, new_tokens: int, repeats: int) -> None:
    """The numbers of a throughput measurement; ``new_tokens`` >= 2, since the decode rate is the time of
    N tokens less that of one."""
    for batch in batches:
        require_int("batch", batch, 1)
    require_int("prompt_len", prompt_len, 1)
    require_int("new_tokens", new_tokens, 2)
    require_int("repeats", repeats, 1)


@torch.no_grad()
def measure_interleaved(models: list, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3,
                        static: bool = False) -> list[dict]:
    """Prefill and decode throughput of several models at one batch size, their repeats interleaved
    (A B A B ...), so that a change of machine load hits every model alike; medians of ``repeats``."""
    check_timing([batch], prompt_len, new_tokens, repeats)
    timings = [_Timings(model, batch, prompt_len, new_tokens, static) for model in models]
    for t in timings:
        t.warm_up()
    for _ in range(repeats):
        for t in timings:
            if t.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(t.device)
            t.run_once()
    return [t.row() for t in timings]


def measure(model, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3, static: bool = False) -> dict:
    """Prefill and decode throughput of one model at one batch size."""
    return measure_interleaved([model], batch, prompt_len, new_tokens, repeats=repeats, static=static)[0]


def _decode_rate(batch: int, new_tokens: int, full: float, one: float) -> float:
    """Tokens/s of the decode steps: (N - 1) steps take the time of an N-token generate minus a 1-token one.
    NaN, with a warning, when timing noise makes that difference non-positive."""
    if full <= one:
        warnings.warn(f"decode time not resolved (generate {new_tokens} tokens: {full:.4f} s, 1 token: {one:.4f} s); "
                      "raise --new-tokens or --repeats", RuntimeWarning, stacklevel=2)
        return float("nan")
    return batch * (new_tokens - 1) / (full - one)


def load_and_measure_memory(directory: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None):
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
    model = load(directory, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        taken = torch.cuda.memory_allocated(device) - before
    else:
        taken = model_nbytes(model)
    memory = {"loaded_gib": taken / 2**30, "report_gib": promised / 2**30 if promised else None,
              "memory_vs_report": taken / promised - 1 if promised else None}
    return model, memory


def _cpu_path_memory(model) -> dict:
    """On the CPU: what the fast paths keep beside the stored tensors once they ran (zskernels/_cpu.py:
    int8 re-encodings, padded copies), in GiB; it adds to ``loaded_gib``."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return {}
    from zskernels import _cpu

    return {"cpu_path_gib": _cpu.derived_nbytes(model.buffers()) / 2**30}


def bench_serve(directory: str | Path | list, *, batches=(1, 8), prompt_len: int = 64, new_tokens: int = 32,
                device: str = "cpu", dense: str = "auto", repeats: int = 5, static: bool = False,
                dtype: torch.dtype | None = None) -> list[dict]:
    """Rows for compressed checkpoints (one directory or a list, of one source model) and their dense
    original, side by side, every model's repeats interleaved.

    ``dtype``: the compute dtype of all models (default: the first checkpoint's stored dtype). The
    compressed rows also say how much device memory the loaded checkpoint took against the
    report's ``model_bytes`` (``memory_vs_report``: relative difference).
    """
    check_timing(batches, prompt_len, new_tokens, repeats)  # before loading anything
    directories = [Path(directory)] if isinstance(directory, (str, Path)) else [Path(d) for d in directory]
    if dtype is None:  # one dtype for all: the first checkpoint's
        from ..io.checkpoint import read_manifest

        dtype = getattr(torch, read_manifest(directories[0])["dtype"])
    loaded = [load_and_measure_memory(d, device, dtype=dtype) for d in directories]
    original, label = dense_original(directories[0], dense, device, dtype=dtype)
    rows = []
    for batch in batches:
        timed = measure_interleaved([model for model, _ in loaded] + [original], batch, prompt_len, new_tokens,
                                    repeats=repeats, static=static)
        compute = {"dtype": str(next(original.parameters()).dtype).removeprefix("torch.")}
        for d, (model, memory), row in zip(directories, loaded, timed):
            rows.append({"model": "compressed", "checkpoint": _describe(d), **row, **compute, **memory,
                         **_cpu_path_memory(model)})
        rows.append({"model": f"dense ({label})", **timed[-1], **compute})
    for row in rows:
        dense_row = next(r for r in rows if r["batch"] == row["batch"] and r["model"] != "compressed")
        row["decode_vs_dense"] = row["decode_tokens_per_s"] / dense_row["decode_tokens_per_s"]
        row["prefill_vs_dense"] = row["prefill_tokens_per_s"] / dense_row["prefill_tokens_per_s"]
    return rows


def _describe(directory: Path) -> str:
    """'<storage> <ratio> (<directory name>)' from the checkpoint's report, else the directory name."""
    report = directory / "report.json"
    if not report.is_file():
        return directory.name
    values = json.loads(report.read_text())
    config = values.get("config", {})
    return f"{config.get('storage', '?')} {config.get('ratio', '?')} ({directory.name})"


def rows_to_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "model"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.{2 if 'vs' in k or 'gib' in k else 1}f}" if isinstance(r.get(k), float)
                 else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
