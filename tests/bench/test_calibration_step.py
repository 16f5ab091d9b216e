"""bench/calibration_step.py on a tiny model: one fresh interpreter per configuration, one row each, a table."""
import json
import subprocess
import sys
from pathlib import Path

from tiny_models import english_text, save_tiny_model_dir

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "calibration_step.py"


def test_each_configuration_reports_its_peak_cpu_and_loss(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(800, seed=1))
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--calib-file",
                          str(tmp_path / "calib.txt"), "--windows", "2", "--seq-len", "16", "--micro-batch", "1", "2",
                          "--threads", "1", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["micro_batch"] for r in rows] == [1, 2]
    assert all(r["peak_gb"] > 0 and r["cpu_s"] >= 0 and r["windows"] == 2 and r["thp"] == "off" for r in rows)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-5 * abs(rows[0]["loss"])  # summation order only
    assert "| 1 | default | off |" in out.stdout and "| 2 | default | off |" in out.stdout
