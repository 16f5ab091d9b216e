"""Block order under torchrun: each block's gradients go to their owners as soon as the block's backward is
done (issue 18). Three gloo ranks over five windows (shares 2, 2, 1), LLaMA and OPT: each rank ends with
exactly its own gradients, equal to the one-process ones up to summation order (float64 models), and at every
block boundary it holds its own gradients of the blocks finished so far plus the block being finished,
never every target's partial sum; the curvature pass (``owners={}``) holds one block's at a time; the host-memory
plan of the block order counts what a rank keeps, not every statistic."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tiny_models import random_windows, tiny_model
from zssvd.io.models import assign_input_groups, find_targets
from zssvd.runtime.blockwise import host_peak_bytes, statistics_bytes_by_block
from zssvd.runtime.distributed import owners_by_input_group
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.gradients import calibration_pass

WORLD, WINDOWS = 3, 5
ARCHS = ("llama", "opt")


def _setup(arch):
    model = tiny_model(arch, seed=3, dtype=torch.float64)
    ids = random_windows(WINDOWS, 12, seed=11)
    targets = assign_input_groups(model, find_targets(model), ids[:1, :8])
    groups: dict[str, list] = {}
    for t in targets:
        groups.setdefault(t.group, []).append((t.name, tuple(t.shape)))
    return model, ids, targets, owners_by_input_group(groups, WORLD)


def _pass(model, ids, targets, owners):
    collector = CovarianceCollector(targets, product_dtype=torch.float64)
    result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, order="block", segment=1,
                              owners=owners)
    return result, collector.covariances()


def _planned(model, ids, targets, owners):
    """The statistics the host-memory plan of a pass with ``segment=None`` counts, whole and kept per block."""
    import zssvd.runtime.blockwise as blockwise

    seen = {}

    def recording(boundary, budget, covs, grads, kept=None):
        seen.update(whole=[covs, grads], kept=kept)
        return 1

    choose, blockwise.choose_segment = blockwise.choose_segment, recording
    try:
        calibration_pass(model, targets, ids, micro_batch=2, order="block", owners=owners,
                         covariances=CovarianceCollector(targets, product_dtype=torch.float64, device="cpu"))
    finally:
        blockwise.choose_segment = choose
    return seen


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for arch in ARCHS:
            model, ids, targets, owners = _setup(arch)
            result, covariances = _pass(model, ids, targets, owners)
            tensors = {f"grad::{k}": v.contiguous() for k, v in result.grads.items()}
            tensors.update({f"cov::{k}": v.contiguous() for k, v in covariances.items()})
            save_file(tensors, os.path.join(out_dir, f"{arch}-{rank}.st"))
            curvature_like = calibration_pass(model, targets, ids, micro_batch=2, order="block", segment=1, owners={})
            with open(os.path.join(out_dir, f"{arch}-{rank}.json"), "w") as f:
                json.dump({"held": result.held_bytes, "loss": result.loss, "stat_peak": result.stat_peak_bytes,
                           "curvature_held": curvature_like.held_bytes,
                           "curvature_grads": sorted(curvature_like.grads),
                           "planned": _planned(model, ids, targets, owners)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_block_order_reduces_each_blocks_gradients_to_their_owners(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    for arch in ARCHS:
        model, ids, targets, owners = _setup(arch)
        want, want_cov = _pass(model, ids, targets, None)
        size = {t.name: 4 * t.shape[0] * t.shape[1] for t in targets}
        blocks = sorted({t.block for t in targets}, reverse=True)  # the backward's order
        in_block = {b: [t.name for t in targets if t.block == b] for b in blocks}
        # one process: every gradient is kept, so the bytes only grow, to all of them
        assert want.held_bytes == [sum(size[n] for b in blocks[:i + 1] for n in in_block[b])
                                   for i in range(len(blocks))]
        assert want.peak_bytes == sum(size.values())
        for rank in range(WORLD):
            got = load_file(tmp_path / f"{arch}-{rank}.st")
            record = json.loads((tmp_path / f"{arch}-{rank}.json").read_text())
            own = sorted(n for n in owners if owners[n] == rank)
            assert sorted(k.split("::", 1)[1] for k in got if k.startswith("grad::")) == own, (arch, rank)
            for name in own:
                g = want.grads[name]  # float32 sums whatever the model's dtype: only the summation order differs
                torch.testing.assert_close(got[f"grad::{name}"], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()),
                                           msg=f"{arch}/{rank}/{name}")
            for group, cov in want_cov.items():
                if f"cov::{group}" in got:
                    torch.testing.assert_close(got[f"cov::{group}"], cov, rtol=1e-9,
                                               atol=1e-12 * float(cov.abs().max()))
            assert record["loss"] == pytest.approx(want.loss, rel=1e-12)
            # At each block boundary: this rank's own gradients of the blocks finished before, and the whole block
            # just finished (before it goes to its owners); at most one block's plus the owned share.
            owned = lambda names: sum(size[n] for n in names if owners[n] == rank)  # noqa: E731
            expected = [owned(n for b in blocks[:i] for n in in_block[b]) + sum(size[n] for n in in_block[blocks[i]])
                        for i in range(len(blocks))]
            assert record["held"] == expected, (arch, rank)
            bound = owned(size) + max(sum(size[n] for n in in_block[b]) for b in blocks)
            assert max(record["held"]) <= bound < sum(size.values()), (arch, rank)
            # covariances and gradients together: the final covariances (a share) beside the gradients' peak,
            # or the forward's own peak, never everything at once
            assert record["stat_peak"] < sum(size.values()) + sum(8 * c.numel() for c in want_cov.values())
            # owners={} (the curvature pass): every gradient is needed nowhere, dropped as its block finishes
            assert record["curvature_grads"] == []
            assert record["curvature_held"] == [sum(size[n] for n in in_block[b]) for b in blocks], (arch, rank)
            # the host-memory plan counts every block's statistics while it finishes and this rank's own after,
            # and its walk of the schedule (segment 1, no hidden states) meets the gradient bytes measured above
            whole = statistics_bytes_by_block(targets)
            kept = statistics_bytes_by_block(targets, set(own))
            assert record["planned"] == {"whole": list(whole), "kept": list(kept)}, (arch, rank)
            no_covs = [0] * len(blocks)
            assert host_peak_bytes(1, 0, no_covs, whole[1], (no_covs, kept[1])) == max(record["held"])
