"""bench/cpu_kernels.py in its smallest mode: every method timed on every shape and row count, one table."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cpu_kernels  # noqa: E402

from zskernels import _cpu_kernel as cpu_kernel  # noqa: E402


def test_one_table_with_every_method(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu_kernels, "SHAPES", [(37, 101), (16, 64)])
    monkeypatch.setattr(cpu_kernels, "last_level_cache_bytes", lambda: 2**16)  # a few copies, not 96 MB
    out = tmp_path / "cpu.json"
    assert cpu_kernels.main(["--repeats", "1", "--rows", "1,3", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 37 x 101") or line.startswith("| 16 x 64")]
    assert len(rows) == 4
    methods = ["bf16 F.linear", "int8pack", "int4pack", "int4 chunked"] + (
        ["bf16_linear", "int8_matmul", "int4_matmul"] if cpu_kernel.available() else [])
    saved = __import__("json").loads(out.read_text())
    assert all(row[m] > 0 for row in saved["results"] for m in methods)
    assert saved["cpu"] == cpu_kernels.cpu_kernel.cpu_model() != "" and f"{saved['cpu']}, 1 threads" in text


def test_the_cache_size_reads_as_bytes():
    assert cpu_kernels.last_level_cache_bytes() >= 2**20
