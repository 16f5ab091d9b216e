"""FSDP2-sharded calibration equals resident: with every decoder block's weights sharded across two
gloo ranks (``shard_blocks``), the calibration pass's statistics (gradients, covariances, loss,
curvature terms) equal those of the same data parallel pass on the resident model (float64), with
uneven shares of the windows (the rank with fewer runs a padding micro-batch)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from test_data_parallel import statistics_of
from tiny_models import tiny_model
from zssvd.runtime.distributed import shard_blocks

WORLD = 2
ARCHS = ("llama", "opt")
ORDERS = ("batch", "block")


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for arch in ARCHS:
            resident = tiny_model(arch, seed=3, dtype=torch.float64)
            sharded = tiny_model(arch, seed=3, dtype=torch.float64)
            total = sum(p.numel() for p in sharded.parameters())
            shard_blocks(sharded)
            local = sum(p.to_local().numel() for p in sharded.parameters())
            for order in ORDERS:
                for name, model in (("resident", resident), ("sharded", sharded)):
                    # Uneven shares (3 and 2 windows, 2 per micro-batch): FSDP gathers a block's weights in
                    # every forward and backward, so rank 1 runs a padding micro-batch that counts for nothing.
                    got = statistics_of(model, order, windows=5)
                    got["local_fraction"] = torch.tensor([local / total if name == "sharded" else 1.0])
                    save_file(got, os.path.join(out_dir, f"{arch}-{order}-{name}-{rank}.st"))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sharded_calibration_equals_resident(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    for arch in ARCHS:
        for order in ORDERS:
            for rank in range(WORLD):
                resident = load_file(tmp_path / f"{arch}-{order}-resident-{rank}.st")
                sharded = load_file(tmp_path / f"{arch}-{order}-sharded-{rank}.st")
                # each rank held about half of the weights (odd sizes round up)
                assert 0.45 < sharded.pop("local_fraction").item() < 0.55
                resident.pop("local_fraction")
                assert sharded.keys() == resident.keys()
                for key, want in resident.items():
                    torch.testing.assert_close(sharded[key], want, rtol=1e-12, atol=1e-12 * float(want.abs().max()),
                                               msg=f"{arch}/{order}/rank {rank}/{key}")
                assert any(v.abs().max() > 0 for k, v in resident.items() if k.startswith("cov::"))
