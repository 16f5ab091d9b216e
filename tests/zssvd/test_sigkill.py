"""``zssvd compress`` killed with SIGKILL at random moments, then rerun: the rerun ends with the same bytes as an
uninterrupted run, and between kills nothing half-written is ever visible (every write is atomic).

The uninterrupted run and the final rerun run in this process; each killed run is a fresh process, killed at a
random moment after its imports (which take half of its ~8 s on a 2-core CPU). The default is 3 kills, about 30 s
of CPU in all; ``ZSSVD_KILL_LOOPS=20`` runs a longer loop.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_models import english_text, save_tiny_model_dir
from zssvd.cli import main
from zssvd.io.checkpoint import MANIFEST, WEIGHTS, verify_checkpoint
from zssvd.runtime.cache import _check_entry

KILLS = int(os.environ.get("ZSSVD_KILL_LOOPS", "3"))
COMPARED = (WEIGHTS, MANIFEST, "config.json", "tokenizer.json")


def _arguments(root: Path, out: str, cache: str) -> list[str]:
    return ["compress", str(root / "model"), "--ratio", "0.6", "--out", str(root / out), "--calib-file",
            str(root / "calib.txt"), "--calib-samples", "8", "--seq-len", "64", "--cache-dir", str(root / cache),
            "--no-plots", "--quiet"]


def _run(arguments: list[str], capsys) -> float:
    """One uninterrupted run in this process (its imports are done); its seconds."""
    start = time.perf_counter()
    code = main(arguments)
    assert code == 0, capsys.readouterr().err[-2000:]
    return time.perf_counter() - start


# The child says "ready" once its imports are done, so that the kill lands in the work that follows.
CHILD = ("import sys, transformers, zssvd.cli, zssvd.pipeline; print('ready', flush=True); "
         "sys.exit(zssvd.cli.main(sys.argv[1:]))")


def _start(arguments: list[str]) -> subprocess.Popen:
    source = str(Path(__file__).resolve().parents[2] / "python")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", CHILD, *arguments], env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout.readline().strip() == "ready"
    return process


def _check_nothing_half_written(out: Path, cache: Path, reference: Path) -> None:
    """What a reader can see after a kill: a checkpoint that verifies and equals the reference, or none
    (zssvd.json absent); complete JSON files; cache entries that pass their checksums."""
    if (out / MANIFEST).exists():
        verify_checkpoint(out)
        assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in COMPARED)
    for path in out.glob("*.json") if out.is_dir() else ():
        json.loads(path.read_text())
    for entry in cache.iterdir() if cache.is_dir() else ():
        if ".tmp" not in entry.name and entry.is_dir():  # a finished entry: renamed into place whole
            _check_entry(entry, json.loads((entry / "meta.json").read_text()))


def test_compress_killed_at_random_moments_resumes_to_the_same_bytes(tmp_path, capsys):
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(3000, seed=1))
    duration = _run(_arguments(tmp_path, "reference", "reference-cache"), capsys)  # uninterrupted, own cache
    reference, out, cache = tmp_path / "reference", tmp_path / "out", tmp_path / "cache"

    rng = random.Random(16)
    killed = 0
    for _ in range(KILLS):
        process = _start(_arguments(tmp_path, "out", "cache"))
        time.sleep(rng.uniform(0.0, 1.2) * duration)  # anywhere in the work, sometimes after it
        process.send_signal(signal.SIGKILL)
        killed += process.wait() == -signal.SIGKILL
        process.stdout.close()
        _check_nothing_half_written(out, cache, reference)

    _run(_arguments(tmp_path, "out", "cache"), capsys)
    for name in COMPARED:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert killed >= 1  # at least one kill landed before the run finished
    leftovers = [p.name for p in [*out.iterdir(), *cache.iterdir()] if ".tmp" in p.name]
    assert leftovers == []  # the killed runs' partial files were cleaned up by the rerun


def test_two_compress_runs_at_once_share_a_cache_and_an_output(tmp_path, capsys):
    """Two ``zssvd compress`` processes with the same cache directory and the same --out, at the same time:
    both succeed, every cache entry passes its checksums, and the output is the uninterrupted run's bytes."""
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(3000, seed=1))
    _run(_arguments(tmp_path, "reference", "reference-cache"), capsys)
    reference, out, cache = tmp_path / "reference", tmp_path / "out", tmp_path / "cache"
    processes = [_start(_arguments(tmp_path, "out", "cache")) for _ in range(2)]
    assert [p.wait(timeout=600) for p in processes] == [0, 0]
    for process in processes:
        process.stdout.close()
    _check_nothing_half_written(out, cache, reference)
    verify_checkpoint(out)
    for name in COMPARED:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
