"""``AnalysisOptions.shard_model`` (``zssvd compress --shard-model``): the whole pipeline on an FSDP2-sharded
model across gloo ranks gives the one-process compression: the same ranks, the same corrections and the
same compressed model, with uneven shares of the windows (padding micro-batches) in both pass orders."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import zssvd
from tiny_models import english_text, random_windows, save_tiny_model_dir, tiny_model
from zssvd.cli import main
from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.pipeline import compress_
from zssvd.runtime.distributed import is_sharded
from zssvd.stages.calibration import CalibrationSet

# zero-sum-2nd and a correction round: the curvature pass and the corrections run on the sharded model too
CONFIG = CompressionConfig(ratio=0.6, strategy="zero-sum-2nd", corrections=1)


def _compress(arch: str, order: str, windows: int, shard: bool, checkpointing: bool = False):
    calib = CalibrationSet(random_windows(windows, 12, seed=11), "random")
    options = AnalysisOptions(micro_batch=2, pass_order=order, shard_model=shard, checkpointing=checkpointing)
    return compress_(tiny_model(arch, seed=3), calib, CONFIG, options=options)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(random_windows(2, 12, seed=5)).logits


def _worker(rank, world_size, init_file, out_dir, windows, cases, checkpointing):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for arch, order in cases:
            model, report = _compress(arch, order, windows, shard=True, checkpointing=checkpointing)
            if rank == 0:  # the whole compressed model and the report
                save_file({"logits": _logits(model)}, os.path.join(out_dir, f"{arch}-{order}.st"))
                with open(os.path.join(out_dir, f"{arch}-{order}.json"), "w") as f:
                    json.dump(report, f)
            else:  # a sharded model, never made whole here, and no report
                with open(os.path.join(out_dir, f"{arch}-{order}-{rank}.json"), "w") as f:
                    json.dump({"report": report, "sharded": is_sharded(model)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("world_size, windows, cases, checkpointing", [
    # shares of 2, 2, 1 at 2 windows per step: rank 2's only step has a padding window
    (3, 5, [("llama", "batch"), ("llama", "block"), ("opt", "batch"), ("opt", "block")], False),
    # shares of 1 and 0: rank 1 runs padding only; activation checkpointing recomputes sharded blocks
    (2, 1, [("llama", "block"), ("opt", "batch")], True),
], ids=["3-ranks-5-windows", "2-ranks-1-window-checkpointing"])
def test_sharded_compress_equals_one_process(tmp_path, world_size, windows, cases, checkpointing):
    mp.spawn(_worker, args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path), windows, cases, checkpointing),
             nprocs=world_size, join=True)
    torch.set_num_threads(1)
    for arch, order in cases:
        model, want = _compress(arch, order, windows, shard=False)
        got = json.loads((tmp_path / f"{arch}-{order}.json").read_text())
        assert got["shard_model"] is True and want["shard_model"] is False
        assert got["calibration"]["world_size"] == world_size
        assert got["ranks"] == want["ranks"], (arch, order)
        assert got["kept_dense"] == want["kept_dense"]
        torch.testing.assert_close(got["correction_losses"], want["correction_losses"], rtol=1e-5, atol=0)
        expected = _logits(model)
        torch.testing.assert_close(load_file(tmp_path / f"{arch}-{order}.st")["logits"], expected, rtol=1e-4,
                                   atol=1e-4 * float(expected.abs().max()), msg=f"{arch}/{order}")
        for rank in range(1, world_size):
            other = json.loads((tmp_path / f"{arch}-{order}-{rank}.json").read_text())
            assert other == {"report": None, "sharded": True}


def test_shard_model_in_one_process_shards_nothing_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="zssvd.pipeline"):
        model, report = _compress("llama", "batch", 4, shard=True)
    assert "a single process holds the whole model, nothing to shard" in caplog.text
    assert report["shard_model"] is False and not is_sharded(model)
    assert report["ranks"] == _compress("llama", "batch", 4, shard=False)[1]["ranks"]


def test_shard_model_does_not_combine_with_offload():
    with pytest.raises(ValueError, match="shard_model and offload do not combine"):
        AnalysisOptions(shard_model=True, offload="cpu")


def test_torchrun_compress_shard_model_writes_the_one_process_checkpoint(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(english_text(3000, seed=1))
    args = ["compress", str(tmp_path / "model"), "--ratio", "0.6", "--calib-file", str(tmp_path / "calib.txt"),
            "--calib-samples", "5", "--seq-len", "32", "--cache-dir", "none", "--device", "cpu", "--quiet",
            "--no-plots", "--shard-model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSSVD_CACHE": str(tmp_path / "zcache")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
         "-m", "zssvd.cli", *args, "--out", str(tmp_path / "sharded")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert main([*args, "--out", str(tmp_path / "resident")]) == 0  # one process: --shard-model is a no-op
    sharded = json.loads((tmp_path / "sharded" / "report.json").read_text())
    resident = json.loads((tmp_path / "resident" / "report.json").read_text())
    assert sharded["shard_model"] is True and resident["shard_model"] is False
    assert sharded["calibration"]["windows_per_rank"] == [3, 2]
    assert sharded["ranks"] == resident["ranks"]
    ids = random_windows(2, 12, seed=5)
    with torch.no_grad():
        got = zssvd.load(tmp_path / "sharded")(ids).logits
        want = zssvd.load(tmp_path / "resident")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
