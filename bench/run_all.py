"""Check and time every kernel variant in one call (for a lent GPU): the three kernel benchmarks,
each of which verifies its variants against float64 before timing them, one after another.

    python bench/run_all.py            # on a CUDA machine; writes logs to $OUT (or bench/results/)
    python bench/run_all.py --check-only   # anywhere: correctness only (interpreter on CPU)

Tables go to stdout and, with the GPU name and date, to <out>/kernels-<gpu>-<date>.md for
bench/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_sigma_scores.py", "bench_remap_matmul.py", "bench_fp8_matmul.py")


def main() -> int:
    import torch

    check_only = "--check-only" in sys.argv[1:]
    out_dir = Path(os.environ.get("OUT", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = datetime.date.today().isoformat()
    report = io.StringIO()
    print(f"# Kernel benchmarks: {gpu}, {stamp}, torch {torch.__version__}", file=report)
    failed = []
    for bench in BENCHES:
        cmd = [sys.executable, str(HERE / bench)] + (["--check-only"] if check_only else [])
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(f"\n## {bench} (exit {run.returncode})\n\n{run.stdout}", file=report)
        if run.returncode:
            failed.append(bench)
            print(run.stderr[-4000:], file=report)
    text = report.getvalue()
    print(text)
    name = f"kernels-{gpu.replace(' ', '_')}-{stamp}.md"
    with contextlib.suppress(OSError):
        (out_dir / name).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
