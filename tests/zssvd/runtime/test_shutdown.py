"""Leaving the process group (``distributed.shutdown``): reductions still in flight are waited on, the ranks
meet at a barrier, and the group is destroyed; gloo ranks that end right after an async reduce exit cleanly,
run after run, whether or not an exception left works outstanding."""
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zssvd.runtime.distributed as distributed
from zssvd.runtime.distributed import shutdown, sum_across_ranks

WORLD, RUNS = 3, 4


class _Interrupted(Exception):
    pass


def _worker(rank, init_file, out_file, interrupt):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    # several buckets (one tensor each), reduced to different owners, the last one still in flight at the end
    tensors = [torch.full((1 << 14,), float(rank + 1)) for _ in range(5)]
    outstanding = 0
    if interrupt:  # an exception between issuing a reduction and waiting on it (an interrupt, say)
        real = distributed._unpack

        def unpack(*args):
            raise _Interrupted

        distributed._unpack = unpack
        try:
            sum_across_ranks(tensors, owners=[0, 1, 2, 0, 1], bucket_bytes=1)
        except _Interrupted:
            outstanding = len(distributed._outstanding)
        finally:
            distributed._unpack = real
    else:
        sum_across_ranks(tensors, owners=[0, 1, 2, 0, 1], bucket_bytes=1)
    if rank == WORLD - 1:
        time.sleep(0.3)  # a late rank: the others must not tear the group down under it
    shutdown(clean=True)
    with open(f"{out_file}-{rank}", "w") as f:
        json.dump({"outstanding": outstanding, "left": len(distributed._outstanding),
                   "initialized": dist.is_initialized()}, f)


def test_ranks_leave_cleanly_right_after_an_async_reduce(tmp_path):
    for run in range(RUNS):
        interrupt = run % 2 == 1
        out = tmp_path / f"run{run}"
        # join=True raises if any rank raised or died (an abort in the teardown is a signal exit)
        mp.spawn(_worker, args=(str(tmp_path / f"rendezvous{run}"), str(out), interrupt), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            got = json.loads((tmp_path / f"run{run}-{rank}").read_text())
            assert got["left"] == 0 and not got["initialized"], (run, rank)
            # interrupted: the first two buckets were issued, neither waited on, when the exception came
            assert got["outstanding"] == (2 if interrupt else 0), (run, rank)


def test_shutdown_without_a_group_does_nothing():
    assert not dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()
