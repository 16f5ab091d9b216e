"""Tune the block configs on the GPU this runs on and store them in zskernels/configs/<op>.json.

    python bench/tune_configs.py                     # time candidates for every op and bucket, write
    python bench/tune_configs.py --ops remap_matmul  # one op
    python bench/tune_configs.py --dump timings.jsonl --dry-run   # time only, keep the raw timings
    python bench/tune_configs.py --from-dump timings.jsonl        # write from an earlier run's timings

For each op and each bucket of its "default" entry, candidate configs (the bucket itself and
variants of num_warps / num_stages / tile width) are forced with ``_configs.use_config`` and timed
through CUDA graphs at a LLaMA-7B-like shape whose size key lies in the bucket. Each candidate is
checked against the torch reference first; the fastest correct one per bucket becomes that
bucket's entry under the GPU's name (``torch.cuda.get_device_name()``), so the loader picks it from
then on. Timings are one JSON object per line, {"op", "gpu", "max_m", "size", "config", "us"},
like a cache dump: ``write_tuned`` needs only these records, which is how the tests check it on
the CPU with made-up timings.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _timing when run as a script

from zskernels import _configs  # noqa: E402

OPS = ("sigma_scores", "remap_matmul", "fp8_matmul")
SHAPE = (4096, 4096)  # (out, in) of the timed matrix
MAX_SIZE = 2048  # the last (open-ended) bucket is timed at this size


# ----------------------------------------------------------------------------------------------
# Records -> configs (no GPU needed)
# ----------------------------------------------------------------------------------------------
def best_buckets(records: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(op, gpu): buckets}: per (op, gpu, max_m) the config with the smallest time."""
    best: dict[tuple[str, str, int], dict] = {}
    for rec in records:
        key = (rec["op"], rec["gpu"], rec["max_m"])
        if key not in best or rec["us"] < best[key]["us"]:
            best[key] = rec
    out: dict[tuple[str, str], list[dict]] = {}
    for (op, gpu, max_m), rec in sorted(best.items()):
        out.setdefault((op, gpu), []).append({"max_m": max_m, **rec["config"]})
    return out


def write_tuned(records: Iterable[dict], config_dir: Optional[Path] = None) -> list[Path]:
    """Write the fastest config per bucket into each op's config file, under the GPU's name."""
    return [_configs.write_buckets(op, gpu, buckets, config_dir)
            for (op, gpu), buckets in best_buckets(records).items()]


# ----------------------------------------------------------------------------------------------
# Timing (GPU)
# ----------------------------------------------------------------------------------------------
def candidates(bucket: dict) -> list[dict]:
    """The bucket and its neighbours: num_warps 4 / 8, num_stages -1 / +1, half / double BLOCK_N (or BN)."""
    base = {k: v for k, v in bucket.items() if k != "max_m"}
    width = "BLOCK_N" if "BLOCK_N" in base else "BN" if "BN" in base else None
    out = []
    for warps, dstage, scale in itertools.product((4, 8), (-1, 0, 1), (0.5, 1, 2)):
        cfg = json.loads(json.dumps(base))
        cfg["num_warps"] = warps
        for part in [cfg] + [v for v in cfg.values() if isinstance(v, dict)]:
            if "num_stages" in part:
                part["num_stages"] = max(1, part["num_stages"] + dstage)
            if width and width in part:
                part[width] = max(16, int(part[width] * scale))
        if cfg not in out:
            out.append(cfg)
    return out


def _problem(op: str, size: int, device: str):
    """(call, reference) for one op at size key ``size`` (tokens; components for sigma_scores)."""
    import zskernels as zk

    out_f, in_f = SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=gen, device=device) * 0.05  # noqa: E731
    if op == "sigma_scores":
        U, H, V = randn(out_f, size), randn(out_f, in_f), randn(in_f, size)
        return (lambda: zk.sigma_scores(U, H, V, backend="triton")), zk.sigma_scores_reference(U, H, V)
    x = randn(size, in_f).half()
    k = 2464
    if op == "remap_matmul":
        packed = zk.pack_remap(randn(out_f, k), randn(in_f, k))
        return (lambda: zk.remap_matmul(x, packed, backend="triton")), zk.remap_matmul_reference(x, packed)
    packed = zk.pack_fp8_lowrank(randn(out_f, k), randn(in_f, k))
    return (lambda: zk.fp8_lowrank_matmul(x, packed, backend="triton")), zk.fp8_lowrank_matmul_reference(x, packed)


def time_op(op: str, gpu: str) -> list[dict]:
    from _timing import graph_median_us

    records = []
    buckets = _configs.table(op)["default"]
    for i, bucket in enumerate(buckets):
        low = buckets[i - 1]["max_m"] + 1 if i else 1
        size = min(bucket["max_m"], max(low, MAX_SIZE if i == len(buckets) - 1 else bucket["max_m"]))
        call, ref = _problem(op, size, "cuda")
        for cfg in candidates(bucket):
            try:
                with _configs.use_config(op, cfg):
                    got = call()
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 2e-2:
                        raise ValueError(f"relative error {err:.2e}")
                    us = graph_median_us([call])
            except Exception as exc:  # noqa: BLE001 -- a candidate that fails to compile or fit is skipped
                print(f"{op} max_m={bucket['max_m']} skipped {cfg}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            records.append({"op": op, "gpu": gpu, "max_m": bucket["max_m"], "size": size, "config": cfg, "us": us})
            print(f"{op} max_m={bucket['max_m']} size={size} {us:9.1f} us  {cfg}", flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dump", type=Path, help="also write the raw timings here (JSON lines)")
    parser.add_argument("--from-dump", type=Path, help="skip timing: write configs from these timings")
    parser.add_argument("--dry-run", action="store_true", help="time, but leave the config files alone")
    parser.add_argument("--config-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.from_dump:
        records = [json.loads(line) for line in args.from_dump.read_text().splitlines() if line.strip()]
    else:
        if not torch.cuda.is_available():
            parser.error("timing needs a CUDA GPU (use --from-dump to write configs from recorded timings)")
        gpu = torch.cuda.get_device_name()
        records = [rec for op in args.ops.split(",") for rec in time_op(op, gpu)]
        if args.dump:
            args.dump.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    if not args.dry_run:
        for path in write_tuned(records, args.config_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
