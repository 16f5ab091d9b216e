"""What the calibration of ``zssvd demo`` costs in quality and in seconds (issue 14).

Each calibration choice (self-sampled windows of several sizes, or windows of the first half of the
standard library's docstrings) is analysed once (calibration pass, second-order pass, whitening,
SVDs, scores) and compressed to the demo's default configuration; the first one also to two other
storages, from its cached analysis. Every model is evaluated on WikiText-2 test and on the held-out
second half of the docstrings (never used for calibration), and with ``--licenses`` on the license
texts of /usr/share/common-licenses. Rows are appended to a JSON-lines file as they finish, so an
interrupted run resumes; the markdown table is rebuilt from that file.

    python bench/demo_calibration.py --results bench/results/demo_calibration.jsonl
    python bench/demo_calibration.py --tables-only --results bench/results/demo_calibration.jsonl

Seconds are wall time and this process's CPU time (user + system, all threads), with the load
average at the end of each step: on a shared machine, wall time is inflated by the other processes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import zssvd
from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.evaluation.demo import DEMO_DEFAULT, demo_calibration, docstring_split
from zssvd.evaluation.evaluate import perplexity
from zssvd.pipeline import analyze, compress_
from zssvd.stages import calibration

WIKITEXT = Path("/work/shared/data/wikitext-2/test.txt")
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0")

# (calibration source, windows, tokens per window), cheapest first, so a short run still answers.
CALIBRATIONS = [("pydoc", 16, 256), ("self", 16, 256), ("self", 8, 256), ("pydoc", 8, 256), ("pydoc", 32, 512),
                ("self", 32, 512)]
# What every calibration is compressed to; the demo's default first. The others run for the first
# calibration only (they reuse its analysis: selection, packing and evaluation only).
STORAGES = [dict(DEMO_DEFAULT), dict(ratio=0.8, storage="remap", strategy="zero-sum"),
            dict(ratio=0.4, storage="hq", strategy="zero-sum-2nd")]


class Clock:
    """Wall and process CPU seconds of a block, with the 1-minute load average at its end."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = {"wall": round(time.perf_counter() - self.wall, 1),
                        "cpu": round(time.process_time() - self.cpu, 1), "load1": round(os.getloadavg()[0], 2)}


def eval_streams(tokenizer, with_licenses: bool) -> dict[str, torch.Tensor]:
    streams = {"wikitext2": calibration.tokenize_stream(tokenizer, WIKITEXT.read_text()),
               "pydoc_heldout": docstring_split(tokenizer)[1]}
    root = Path("/usr/share/common-licenses")
    licenses = [(root / n).read_text() for n in LICENSES if (root / n).is_file()] if with_licenses else []
    if licenses:
        streams["licenses"] = calibration.tokenize_stream(tokenizer, "\n\n".join(licenses))
    return streams


def run(args) -> None:
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in results.read_text().splitlines()} if results.exists() else set()
    model, tokenizer, source = zssvd.load_model("default")
    streams = eval_streams(tokenizer, args.licenses)
    windows = {"wikitext2": args.windows, "pydoc_heldout": args.windows_other, "licenses": args.windows_other}

    def evaluate(m) -> dict:
        return {name: round(perplexity(m, ids, args.seq_len, max_windows=windows[name], desc=name)["perplexity"], 3)
                for name, ids in streams.items()}

    def record(entry: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    if "dense" not in done:
        record({"key": "dense", "ppl": evaluate(model), "windows": windows})
    # Every calibration with the demo's default first; then the other storages on the first calibration
    # (from its cached analysis: their analysis seconds are the cache's, not a computation's).
    plan = [(c, STORAGES[:1]) for c in CALIBRATIONS] + [(CALIBRATIONS[0], STORAGES[1:])]
    for (kind, samples, seq_len), configs in plan:
        keys = {json.dumps([kind, samples, seq_len, c], sort_keys=True): c for c in configs}
        todo = {k: c for k, c in keys.items() if k not in done}
        if not todo:
            continue
        with Clock() as calib_clock:
            calib = demo_calibration(model, tokenizer, kind, samples, seq_len)
        with Clock() as analysis_clock:
            analysis = analyze(model, calib, AnalysisOptions(source=source, cache_dir=args.cache_dir),
                               second_order=True)
        for key, config in todo.items():
            with Clock() as compress_clock:
                compressed, report = compress_(copy.deepcopy(model), calib, CompressionConfig(**config),
                                               analysis=analysis)
            with Clock() as eval_clock:
                ppl = evaluate(compressed)
            record({"key": key, "calibration": kind, "samples": samples, "seq_len": seq_len, **config,
                    "achieved_bytes_ratio": round(report["achieved_bytes_ratio"], 4), "ppl": ppl,
                    "seconds": {"calibration_data": calib_clock.seconds, "analysis": analysis_clock.seconds,
                                "compress": compress_clock.seconds, "evaluation": eval_clock.seconds},
                    "stage_seconds": {k: round(v, 1) for k, v in report["timings"].items()},
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()})
            del compressed


def markdown(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    dense = next(r for r in rows if r["key"] == "dense")
    texts = list(dense["ppl"])
    lines = ["| calibration | windows x tokens | storage | strategy | ratio | " + " | ".join(texts)
             + " | calib. data s (wall / cpu) | analysis s (wall / cpu) | load |",
             "|---|---|---|---|---|" + "---|" * len(texts) + "---|---|---|",
             "| (dense model) | | | | 1.0 | " + " | ".join(f"{dense['ppl'][t]:.2f}" for t in texts) + " | | | |"]
    for r in rows:
        if r["key"] == "dense":
            continue
        s = r["seconds"]
        lines.append(f"| {r['calibration']} | {r['samples']} x {r['seq_len']} | {r['storage']} | {r['strategy']} | "
                     f"{r['ratio']} | " + " | ".join(f"{r['ppl'][t]:.2f}" for t in texts)
                     + f" | {s['calibration_data']['wall']} / {s['calibration_data']['cpu']}"
                     f" | {s['analysis']['wall']} / {s['analysis']['cpu']} | {s['analysis']['load1']} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="bench/results/demo_calibration.jsonl")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window (default 512)")
    p.add_argument("--windows", type=int, default=12, help="WikiText-2 evaluation windows (default 12)")
    p.add_argument("--windows-other", type=int, default=12, help="held-out docstring windows (default 12)")
    p.add_argument("--licenses", action="store_true", help="also evaluate on /usr/share/common-licenses")
    p.add_argument("--cache-dir", default=str(zssvd.io.models.cache_root() / "stages"),
                   help="analysis cache (default ~/.cache/zssvd/stages; 'none' disables): a rerun's analysis "
                        "seconds are then the cache's")
    p.add_argument("--tables-only", action="store_true", help="print the table from --results and exit")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.cache_dir = None if args.cache_dir == "none" else args.cache_dir
    if args.tables_only:  # the table of an earlier (or another machine's) run
        return print(markdown(Path(args.results))) or 0
    run(args)  # appends to --results, resuming where an earlier run stopped
    print(markdown(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
