"""Statistics reduced to the ranks that need them, factors sent only where they are used (issue 18).

Three gloo ranks over five windows (shares 2, 2, 1): each rank keeps the covariances and gradients of the
matrices it owns and nothing of the others'; the ranks other than 0 receive no factor or whitening factor
unless the correction rounds or the curvature pass need them on every rank (each correction round's
factors come from the matrices' owners, which correct them; no S is sent); and the compression (ranks,
logits, scores, corrections) equals the one-process run, for two model families and both pass orders; in block
order the gradient sums held during the pass stay below every target's."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import zssvd.pipeline as pipeline
from tiny_models import random_windows, tiny_model
from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.pipeline import analyze, compress_
from zssvd.runtime.distributed import sum_across_ranks
from zssvd.stages.calibration import CalibrationSet

WORLD, WINDOWS = 3, 5
# (architecture, pass order, correction rounds, strategy)
CASES = [("llama", "batch", 0, "zero-sum"), ("opt", "batch", 0, "zero-sum"), ("llama", "block", 1, "zero-sum"),
         ("opt", "batch", 2, "zero-sum"), ("opt", "block", 0, "zero-sum-2nd")]


def _tag(case) -> str:
    return "-".join(map(str, case))


def _calib():
    return CalibrationSet(random_windows(WINDOWS, 12, seed=11), "random")


def _other_calib():
    return CalibrationSet(random_windows(4, 12, seed=12), "random")


def _options(order: str) -> AnalysisOptions:
    return AnalysisOptions(micro_batch=2, pass_order=order)


def _config(corrections: int, strategy: str) -> CompressionConfig:
    return CompressionConfig(ratio=0.6, corrections=corrections, strategy=strategy)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(random_windows(2, 12, seed=5)).logits


class Received:
    """Counts the float32 elements this rank receives from another rank by broadcast or recv: factors and
    whitening factors are float32, scores float64 and the statistics' reductions neither."""

    def __init__(self):
        self.float32 = 0
        self._broadcast, self._recv = dist.broadcast, dist.recv

    def __enter__(self):
        def broadcast(tensor, src, *args, **kwargs):
            self._count(tensor, src != dist.get_rank())
            return self._broadcast(tensor, src, *args, **kwargs)

        def recv(tensor, *args, **kwargs):
            self._count(tensor, True)
            return self._recv(tensor, *args, **kwargs)

        dist.broadcast, dist.recv = broadcast, recv
        return self

    def _count(self, tensor, received: bool) -> None:
        if received and tensor.dtype == torch.float32:
            self.float32 += tensor.numel()

    def __exit__(self, *exc):
        dist.broadcast, dist.recv = self._broadcast, self._recv


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_owner_reduction(rank, out_dir)
        held = {}
        real_statistics = pipeline._statistics

        def recording_statistics(*args, **kwargs):
            stats = real_statistics(*args, **kwargs)
            held["covariances"], held["grads"] = sorted(stats["covariances"]), sorted(stats["grads"])
            return stats

        pipeline._statistics = recording_statistics
        for arch, order, corrections, strategy in CASES:
            tag = _tag((arch, order, corrections, strategy))
            model = tiny_model(arch, seed=3)
            with Received() as during_analysis:
                analysis = analyze(model, _calib(), _options(order))
                rescored = pipeline.rescore(model, analysis, _other_calib())  # each owner scores, then shares
            with Received() as during_compression:
                model, report = compress_(model, _calib(), _config(corrections, strategy), analysis=analysis)
            # int4 --group-size auto measures on rank 0, which holds every factor, and shares the result
            from_rank0 = pipeline._on_rank0(analysis, lambda: {"measured on": dist.get_rank()})
            record = {**held, "owners": analysis.owners, "from_rank0": from_rank0, "factors": sorted(analysis.factors),
                      "whitening": sorted(analysis.whitening), "received_analysis": during_analysis.float32,
                      "received_compression": during_compression.float32, "report": report}
            with open(os.path.join(out_dir, f"{tag}-{rank}.json"), "w") as f:
                json.dump(record, f)
            scores = {f"scores::{n}": s.contiguous() for n, s in analysis.scores.items()}
            scores.update({f"rescored::{n}": s.contiguous() for n, s in rescored.items()})
            if rank == 0:
                scores["logits"] = _logits(model)
            save_file(scores, os.path.join(out_dir, f"{tag}-{rank}.st"))
    finally:
        dist.destroy_process_group()


def _check_owner_reduction(rank, out_dir):
    """``sum_across_ranks(owners=...)``: each sum reaches its owner only; the others keep their partial sums."""
    tensors = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64),
               torch.full((4,), float(rank + 1))]
    sum_across_ranks(tensors, owners=[0, 2, 1], bucket_bytes=8)
    with open(os.path.join(out_dir, f"owner-sums-{rank}.json"), "w") as f:
        json.dump([t.flatten().tolist() for t in tensors], f)


def _one_process(case):
    arch, order, corrections, strategy = case
    model = tiny_model(arch, seed=3)
    analysis = analyze(model, _calib(), _options(order))
    rescored = pipeline.rescore(model, analysis, _other_calib())
    model, report = compress_(model, _calib(), _config(corrections, strategy), analysis=analysis)
    return analysis, rescored, report, _logits(model)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reduce_to_owner_holds_a_share_and_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)

    total = sum(range(1, WORLD + 1))
    for rank in range(WORLD):
        sums = json.loads((tmp_path / f"owner-sums-{rank}.json").read_text())
        for owner, values, base in zip([0, 2, 1], sums, [1.0, 10.0, 1.0]):
            want = base * (total if owner == rank else rank + 1)
            assert values == [want] * len(values), (rank, owner)

    torch.set_num_threads(1)
    for case in CASES:
        tag, (arch, order, corrections, strategy) = _tag(case), case
        analysis, rescored, want, logits = _one_process(case)
        ranks = [json.loads((tmp_path / f"{tag}-{r}.json").read_text()) for r in range(WORLD)]
        owners = ranks[0]["owners"]
        targets = [s.name for s in analysis.specs]
        groups = {t.name: t.group for t in analysis.targets}
        assert sorted(owners) == sorted(targets) and set(owners.values()) == set(range(WORLD))
        assert all(owners[n] == owners[groups[n]] for n in targets)  # an input group has one owner
        for rank, got in enumerate(ranks):
            assert got["owners"] == owners and got["from_rank0"] == {"measured on": 0}
            own = sorted(n for n in targets if owners[n] == rank)
            own_groups = sorted({groups[n] for n in own})
            # After the reduction a rank holds its own statistics and no other rank's.
            assert got["grads"] == own and got["covariances"] == own_groups, (tag, rank)
            # Rank 0 packs: every factor and S; the others their own, and they received none.
            assert got["factors"] == (sorted(targets) if rank == 0 else own), (tag, rank)
            assert got["whitening"] == (sorted(analysis.whitening) if rank == 0 else own_groups), (tag, rank)
            if rank > 0:
                assert got["received_analysis"] == 0, (tag, rank)
                assert got["report"] is None
            # scores reach every rank, equal to one process up to summation order
            scores = load_file(tmp_path / f"{tag}-{rank}.st")
            for kind, want_scores in (("scores", analysis.scores), ("rescored", rescored)):
                for name, s in want_scores.items():
                    torch.testing.assert_close(scores[f"{kind}::{name}"], s, rtol=1e-4,
                                               atol=1e-3 * float(s.abs().max()), msg=f"{tag}/{rank}/{kind}/{name}")

        report = ranks[0]["report"]
        assert report["ranks"] == want["ranks"], tag
        assert report["kept_dense"] == want["kept_dense"]
        assert report["calibration"]["windows_per_rank"] == [2, 2, 1]
        torch.testing.assert_close(report["correction_losses"], want["correction_losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(load_file(tmp_path / f"{tag}-0.st")["logits"], logits, rtol=1e-4,
                                   atol=1e-4 * float(logits.abs().max()), msg=tag)

        # Statistic bytes: one process keeps them all; the ranks together keep each once, each a share.
        (everything,) = want["calibration"]["stat_bytes_per_rank"]
        kept = report["calibration"]["stat_bytes_per_rank"]
        assert sum(kept) == everything and max(kept) < everything, (tag, kept)
        during = report["calibration"]["stat_bytes_during_pass_per_rank"]
        if order == "batch":  # every partial sum is held until the pass ends
            assert during == [everything] * WORLD
        else:  # the block order sends each block's covariances to their owners when the block is done
            assert all(k < d < everything for k, d in zip(kept, during)), (tag, kept, during)
        # Gradient sums held during the pass: all of them in batch order (and in one process); in block order
        # a rank's own plus the block being finished (tests/zssvd/runtime/test_gradients_per_block.py).
        every_gradient = sum(4 * s.out_features * s.in_features for s in analysis.specs)
        assert want["calibration"]["grad_bytes_during_pass_per_rank"] == [every_gradient]
        grads_during = report["calibration"]["grad_bytes_during_pass_per_rank"]
        if order == "batch":
            assert grads_during == [every_gradient] * WORLD
        else:
            assert all(g < every_gradient for g in grads_during), (tag, grads_during)

        # What ranks 1 and 2 received while compressing: nothing, unless every rank needs it.
        specs = {s.name: s for s in analysis.specs}
        factorised = [n for n in targets if n not in want["kept_dense"]]
        expected = 0
        if strategy == "zero-sum-2nd":  # the curvature pass projects every layer's gradients on U
            expected += sum(specs[n].out_features * specs[n].rank for n in targets)
        kept = {n: (specs[n].out_features + 1 + specs[n].in_features) * want["ranks"][n] for n in factorised}
        if corrections:  # every rank's forward needs every kept factor: rank 0 sends them all
            expected += sum(kept.values())
        for rank in range(1, WORLD):
            # each round, the owners correct their own matrices (with the S they hold) and send the factors on
            others = corrections * sum(k for n, k in kept.items() if owners[n] != rank)
            assert ranks[rank]["received_compression"] == expected + others, (tag, rank)
