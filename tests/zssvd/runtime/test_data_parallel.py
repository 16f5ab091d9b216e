"""Data parallel calibration: each gloo rank takes a share of the windows, and the summed statistics
equal the one-process ones (float64 models, so only the summation order differs)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tiny_models import random_windows, tiny_model
from zssvd.io.models import assign_input_groups, find_targets
from zssvd.runtime.distributed import sum_across_ranks, window_share, windows_per_rank
from zssvd.stages.covariance import CovarianceCollector
from zssvd.stages.curvature import curvature_terms
from zssvd.stages.decompose import Factors
from zssvd.stages.gradients import calibration_pass

ARCHS = ("llama", "opt", "gpt_neox")
ORDERS = ("batch", "block")


def _bases(targets, seed=0):
    """Orthonormal directions for the curvature terms (any basis will do for a comparison)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in targets:
        out_features, in_features = t.shape
        r = min(out_features, in_features)
        q, _ = torch.linalg.qr(torch.randn(out_features, r, generator=gen, dtype=torch.float64))
        out[t.name] = Factors(q, torch.linspace(1, 2, r, dtype=torch.float64), torch.zeros(in_features, r))
    return out


def statistics(arch: str, order: str, windows: int) -> dict[str, torch.Tensor]:
    """Gradients, covariances, loss, token count and curvature terms of one tiny model, flattened."""
    return statistics_of(tiny_model(arch, seed=3, dtype=torch.float64), order, windows)


def statistics_of(model, order: str, windows: int) -> dict[str, torch.Tensor]:
    """``statistics`` of a given model (test_sharded_calibration.py passes an FSDP-sharded one)."""
    ids = random_windows(windows, 12, seed=11)
    targets = assign_input_groups(model, find_targets(model), ids[:1, :8])
    collector = CovarianceCollector(targets, product_dtype=torch.float64)
    result = calibration_pass(model, targets, ids, micro_batch=2, covariances=collector, order=order, segment=1)
    curvature = curvature_terms(model, targets, ids, _bases(targets), micro_batch=2, order=order)
    out = {f"grad::{k}": v for k, v in result.grads.items()}
    out.update({f"cov::{k}": v for k, v in collector.covariances().items()})
    out.update({f"curv::{k}": v for k, v in curvature.items()})
    out["loss"] = torch.tensor([result.loss], dtype=torch.float64)
    out["tokens"] = torch.tensor([result.tokens])
    out["windows_per_rank"] = torch.tensor(result.windows_per_rank)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _worker(rank, world_size, init_file, out_dir, windows):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for arch in ARCHS:
            for order in ORDERS:
                save_file(statistics(arch, order, windows), os.path.join(out_dir, f"{arch}-{order}-{rank}.st"))
        # the share arithmetic, as every rank sees it
        with open(os.path.join(out_dir, f"share-{rank}.json"), "w") as f:
            json.dump({"share": window_share(windows), "per_rank": windows_per_rank(windows)}, f)
    finally:
        dist.destroy_process_group()


# 3 ranks over 5 windows: shares of 2, 2, 1 (uneven); 4 ranks over 3 windows: one rank has none.
@pytest.mark.parametrize("world_size, windows", [(3, 5), (4, 3)], ids=["3-ranks-5-windows", "4-ranks-3-windows"])
def test_data_parallel_statistics_equal_one_process(tmp_path, world_size, windows):
    mp.spawn(_worker, args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path), windows), nprocs=world_size,
             join=True)
    shares = [json.loads((tmp_path / f"share-{r}.json").read_text()) for r in range(world_size)]
    per_rank = shares[0]["per_rank"]
    assert sum(per_rank) == windows and max(per_rank) - min(per_rank) <= 1
    assert [tuple(s["share"]) for s in shares] == [(sum(per_rank[:r]), sum(per_rank[:r + 1]))
                                                     for r in range(world_size)]  # contiguous, in rank order
    for arch in ARCHS:
        for order in ORDERS:
            reference = statistics(arch, order, windows)
            ranks = [load_file(tmp_path / f"{arch}-{order}-{r}.st") for r in range(world_size)]
            for rank, got in enumerate(ranks):
                assert got["windows_per_rank"].tolist() == per_rank
                assert got["tokens"].item() == reference["tokens"].item() == windows * 11
                for key, want in reference.items():
                    if key == "windows_per_rank":
                        continue
                    # gradients (and the curvature's projections of them) accumulate in float32
                    # whatever the model's dtype; covariances and the loss in float64
                    float32 = key.startswith(("grad::", "curv::"))
                    atol = (1e-6 if float32 else 1e-12) * float(want.abs().max())
                    torch.testing.assert_close(got[key], want, rtol=1e-5 if float32 else 1e-9, atol=atol,
                                               msg=f"{arch}/{order}/rank {rank}/{key}")
                    assert torch.equal(got[key], ranks[0][key])  # every rank holds the same totals
            assert any(v.abs().max() > 0 for k, v in reference.items() if k.startswith("grad::"))


def test_a_single_process_takes_every_window_and_sums_nothing():
    assert window_share(7) == (0, 7) and windows_per_rank(7) == [7]
    t = torch.arange(4.0)
    sum_across_ranks([t])  # no process group: unchanged
    assert torch.equal(t, torch.arange(4.0))
