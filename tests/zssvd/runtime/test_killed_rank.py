"""A rank that dies fails the whole job at once with one line naming it and how to resume, and the
same command run again resumes from the stage cache and writes the checkpoint an uninterrupted run
writes. Also: a rank that stops answering fails the others after --dist-timeout."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tiny_models import english_text, save_tiny_model_dir
from zssvd.runtime import distributed

WORLD = 2
HERE = Path(__file__).resolve().parent
SOURCES = HERE.parents[2] / "python"


def _torchrun(tmp_path, entry: list[str], out: Path, cache: Path, **env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
               str(WORLD), *entry, "compress", str(tmp_path / "model"), "--ratio", "0.6", "--strategy",
               "zero-sum-2nd", "--out", str(out), "--calib-file", str(tmp_path / "calib.txt"), "--calib-samples", "8",
               "--seq-len", "64", "--micro-batch", "1", "--cache-dir", str(cache), "--device", "cpu", "--quiet",
               "--no-plots"]
    path = os.pathsep.join(p for p in (str(SOURCES), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "ZSSVD_CACHE": str(tmp_path / "zcache"), **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("*.safetensors"))
    assert files, f"no checkpoint in {out}"
    return {f"{f.name}::{k}": v for f in files for k, v in load_file(f).items()}


def test_a_killed_rank_fails_the_job_and_the_rerun_resumes_from_the_cache(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(3000, seed=1))
    cli = ["-m", "zssvd.cli"]

    reference = _torchrun(tmp_path, cli, tmp_path / "reference", tmp_path / "reference-cache")
    assert reference.returncode == 0, reference.stderr

    out, cache = tmp_path / "out", tmp_path / "cache"
    start = time.monotonic()
    killed = _torchrun(tmp_path, [str(HERE / "rank_killer.py")], out, cache, ZSSVD_TEST_KILL_RANK="1")
    assert time.monotonic() - start < 600  # no rank hangs (the gloo timeout is 30 minutes); slack for a loaded machine
    assert killed.returncode != 0
    pid = re.search(r"rank_killer: SIGKILL to rank 1 \(pid (\d+)\)", killed.stderr).group(1)
    # Rank 0's one line: the collective failed (or torchrun's SIGTERM came first), rank 1 and its pid, how to resume.
    lines = [line for line in killed.stderr.splitlines() if line.startswith("zssvd compress: ")]
    assert len(lines) == 1, killed.stderr
    assert re.fullmatch(r"zssvd compress: (error: rank 0 of 2: .* failed: |rank 0 of 2 stopped by SIGTERM \()"
                        rf"rank 1 \(pid {pid}\) on this node died.*; rerun the same command: the stages already in "
                        r"the cache \(--cache-dir\) are reused", lines[0]), lines[0]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", killed.stderr)  # torchrun's report agrees
    assert not list(out.glob("*.safetensors"))  # no checkpoint
    entries = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir() if not p.name.startswith("."))
    # done before the kill, each rank its own part; the curvature was not
    assert entries == [f"{stage}.rank{r}-of-{WORLD}" for stage in ("factors", "stats") for r in range(WORLD)]

    rerun = _torchrun(tmp_path, cli, out, cache)
    assert rerun.returncode == 0, rerun.stderr
    assert "stats.rank0-of-2: reused from the stage cache" in rerun.stderr  # (rank 0 logs for every rank)
    assert "factors.rank0-of-2: reused from the stage cache" in rerun.stderr
    timings = json.loads((out / "report.json").read_text())["timings"]
    assert "curvature" in timings and "calibration_pass" not in timings and "decomposition" not in timings
    want, got = _tensors(tmp_path / "reference"), _tensors(out)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, behaviour, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env("cpu", timeout_s=3)
    done = Path(out_dir) / "done"
    if rank == 1:
        if behaviour == "dies":
            os._exit(3)
        while not done.exists():  # alive, but never joins the collective
            time.sleep(0.05)
        return
    try:
        distributed.sum_across_ranks([torch.ones(4)])
        message = "no failure"
    except distributed.CollectiveFailed as err:
        message = str(err)
    (Path(out_dir) / "message").write_text(message)
    done.write_text("")


def _run_pair(tmp_path, behaviour) -> tuple[str, int]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, behaviour, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode is not None for p in procs)
    return (tmp_path / "message").read_text(), procs[1].pid


def test_a_rank_that_dies_is_named_at_once(tmp_path):
    message, pid = _run_pair(tmp_path, "dies")
    assert message.startswith(f"rank 0 of 2: summing the statistics across ranks failed: rank 1 (pid {pid}) on "
                              "this node died ("), message
    assert message.endswith("; rerun the same command: the stages already in the cache (--cache-dir) are reused")
    assert "\n" not in message


def test_a_rank_that_stops_answering_fails_the_others_after_the_timeout(tmp_path):
    start = time.monotonic()
    message, _ = _run_pair(tmp_path, "hangs")
    assert time.monotonic() - start < 50
    assert message.startswith("rank 0 of 2: summing the statistics across ranks failed: no rank died: one stopped "
                              "answering for the timeout (3 s, --dist-timeout)"), message


def test_dead_ranks_sees_finished_and_running_processes():
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    peers = [(host, os.getpid()), (host, finished.pid), ("another-node", finished.pid), (host, os.getppid())]
    assert distributed.dead_ranks(peers) == [1]  # this process, another node's and a live one are not dead
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and is not reaped until wait()
    try:
        deadline = time.monotonic() + 30
        while distributed.dead_ranks([(host, zombie.pid)]) != [0]:  # a zombie counts as dead
            assert time.monotonic() < deadline, "a finished, unreaped process was not seen as dead"
            time.sleep(0.05)
    finally:
        zombie.wait()
