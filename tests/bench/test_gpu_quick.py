"""bench/gpu_quick.py in its smallest mode: interpreter, tiny shapes, every part, one markdown file.

The one GPU command of a lent-machine session must not fail for a reason a CPU can find: this runs
each of its parts (checks against float64, kernel timings, scores, compress, serve) at tiny sizes
and checks that the file it leaves in $OUT has every section, finished, with rows.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("Correctness against float64", "Kernels at LLaMA-7B shapes", "Scoring against the torch two-matmul",
            "Compression of LLaMA-7B-shaped blocks", "Decode and prefill")


def test_tiny_run_writes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", ZSSVD_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # generous budgets: the CPU is shared; the point is that every part finishes and reports
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_quick.py"), "--tiny", "--budget", "3"],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tables = list(tmp_path.glob("quick-cpu-*.md"))
    assert len(tables) == 1 and list(tmp_path.glob("quick-cpu-*.log"))
    text = tables[0].read_text()
    assert text.startswith("## cpu (Triton interpreter), ")
    for title in SECTIONS:
        section = text.split(f"### {title}")[1].split("### ")[0]
        assert "Status: done" in section, (title, section[:800])
        assert "| " in section and "(no rows)" not in section, (title, section[:800])
    assert "FAIL" not in text.split("### Kernels")[0]  # every correctness check passed
    assert text.count("| pass |") == 4
    assert "| remap rho 0.6 | 48x40 |" in text and "| HQ fp8 factors, storage 0.4 | 48x40 |" in text
    assert "| calibration_pass |" in text and "| dense | 1 |" in text and "| hq | 1 |" in text
