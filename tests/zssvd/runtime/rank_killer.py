"""``zssvd`` with one rank killed mid-way through the curvature pass (a script for torchrun; used by
test_killed_rank.py).

The rank named by ZSSVD_TEST_KILL_RANK sends itself SIGKILL when its gradient pass for the curvature
terms (strategy zero-sum-2nd) reaches its second micro-batch: the statistics and the factors are in
the stage cache by then (rank 0 stores each entry before the next collective lets the others on),
and the other ranks are inside a gradient pass of their own. Without the variable this is plain
``zssvd``.
"""
import os
import signal
import sys

import zssvd.pipeline as pipeline
import zssvd.stages.gradients as gradients
from zssvd.cli import main

KILL_AT_MICRO_BATCH = 2
_state = {"curvature": False, "micro_batches": 0}
_curvature_terms, _checked_loss_sum = pipeline.curvature_terms, gradients._checked_loss_sum


def curvature_terms(*args, **kwargs):
    _state["curvature"] = True
    return _curvature_terms(*args, **kwargs)


def checked_loss_sum(*args, **kwargs):
    if _state["curvature"] and os.environ.get("RANK") == os.environ.get("ZSSVD_TEST_KILL_RANK"):
        _state["micro_batches"] += 1
        if _state["micro_batches"] == KILL_AT_MICRO_BATCH:
            print(f"rank_killer: SIGKILL to rank {os.environ['RANK']} (pid {os.getpid()})", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return _checked_loss_sum(*args, **kwargs)


pipeline.curvature_terms, gradients._checked_loss_sum = curvature_terms, checked_loss_sum

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
