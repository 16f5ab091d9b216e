"""Data parallel calibration at several process counts: what scales and what is communication (issue 18).

Runs ``zssvd.analyze`` (stage 1 calibration pass: forward, backward, covariances; whitening; the
sharded whitened SVDs; scores; the curvature pass of zero-sum-2nd) on a LLaMA-shaped model with
random weights and random calibration tokens, with no stage cache, and reports per stage and per
rank: wall seconds, the CPU seconds of the process, the seconds spent inside collectives (the
reductions of the statistics to their owners, the factors and whitening factors sent to rank 0, the
scores shared with every rank, including the copies into and out of the flat buffers and any wait for
a slower rank), and the bytes each rank sent into them. Per rank also: the bytes of statistics
(covariances, gradients) it kept after the reduction and held during the pass, the bytes of factors
and whitening factors it holds at the end, and the process's peak resident memory.
Scaling efficiency = wall(1 process) / (N x wall(N processes)); with the CPUs shared it is also given
on CPU seconds (work(1) / sum of work(N)), which the other processes on the machine do not change.

    python bench/calibration_scale.py --procs 1 2 4              # CPU sweep, gloo, one thread per rank
    torchrun --nproc_per_node 8 bench/calibration_scale.py --device cuda --preset llama-7b --layers 4 \\
        --samples 64 --seq-len 2048                               # one measurement on 8 GPUs (NCCL)

Under torchrun it measures once, in torchrun's process group; otherwise it starts ``--procs`` gloo
processes of its own for each count. Rank 0 prints one JSON line per measurement; the sweep ends
with a markdown table.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=8000, max_position_embeddings=1024),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=2000, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=300, max_position_embeddings=256),
}
STAGES = ("calibration_pass", "whitening", "decomposition", "scores", "curvature")


class Meter:
    """Seconds, CPU seconds and bytes inside collectives, attributed to the stage running them."""

    def __init__(self):
        self.stage = "other"
        self.comm_s = defaultdict(float)
        self.comm_bytes = defaultdict(int)
        self.cpu_s = defaultdict(float)
        self.wall_s = defaultdict(float)

    @contextmanager
    def in_stage(self, name: str):
        outer, self.stage = self.stage, name
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall_s[name] += time.perf_counter() - wall
            self.cpu_s[name] += time.process_time() - cpu
            self.stage = outer

    def timed_collective(self, fn, nbytes):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.comm_s[self.stage] += time.perf_counter() - start
                self.comm_bytes[self.stage] += nbytes(*args, **kwargs)
        return run


def _communicating() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _tensor_bytes(tensors, *args, **kwargs) -> int:
    return sum(t.numel() * t.element_size() for t in tensors) if _communicating() else 0


def instrument(meter: Meter) -> None:
    """Time every collective the pipeline makes, and attribute the pipeline's work to its stages."""
    import torch.distributed as dist

    import zssvd.pipeline as pipeline
    import zssvd.stages.covariance as covariance
    import zssvd.stages.curvature as curvature
    import zssvd.stages.gradients as gradients

    # sum_across_ranks is imported by name into each stage module; time it where it is called
    for module in (gradients, covariance, curvature):
        module.sum_across_ranks = meter.timed_collective(module.sum_across_ranks, _tensor_bytes)
    gradients.sum_scalar_across_ranks = meter.timed_collective(gradients.sum_scalar_across_ranks,
                                                               lambda v: 8 if _communicating() else 0)
    # broadcasts (scores; factors for the curvature pass) and sends to rank 0 (factors, whitening factors):
    # only the sending rank's bytes count as sent
    dist.broadcast = meter.timed_collective(
        dist.broadcast, lambda t, src, *a, **k: t.numel() * t.element_size() if src == dist.get_rank() else 0)
    dist.send = meter.timed_collective(dist.send, lambda t, *a, **k: t.numel() * t.element_size())

    def staged(name, fn):
        def run(*args, **kwargs):
            with meter.in_stage(name):
                return fn(*args, **kwargs)
        return run

    pipeline._statistics = staged("calibration_pass", pipeline._statistics)
    pipeline.whitening_factor = staged("whitening", pipeline.whitening_factor)
    pipeline.decompose_sharded = staged("decomposition", pipeline.decompose_sharded)
    pipeline._whitening_on_rank0 = staged("decomposition", pipeline._whitening_on_rank0)
    pipeline.component_scores = staged("scores", pipeline.component_scores)
    pipeline._scores_everywhere = staged("scores", pipeline._scores_everywhere)
    pipeline.curvature_terms = staged("curvature", pipeline.curvature_terms)
    pipeline._bases_everywhere = staged("curvature", pipeline._bases_everywhere)


def build_model(args, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    return model.eval(), cfg


def measure(args) -> dict | None:
    """One measurement in the current process group (every rank calls it); rank 0 gets the row."""
    import torch.distributed as dist

    import zssvd
    from zssvd.config import AnalysisOptions
    from zssvd.runtime import distributed
    from zssvd.runtime.memory import tensor_bytes
    from zssvd.stages.calibration import CalibrationSet

    rank, world_size = distributed.world()
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    model, cfg = build_model(args, device)
    ids = torch.randint(0, cfg["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    meter = Meter()
    instrument(meter)
    options = AnalysisOptions(micro_batch=args.micro_batch, pass_order=args.pass_order, cache_dir=None)
    if dist.is_initialized():
        dist.barrier()  # start together: loading the model is not part of the measurement
    wall, cpu = time.perf_counter(), time.process_time()
    analysis = zssvd.analyze(model, CalibrationSet(ids, "random"), options, second_order=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    row = {"rank": rank, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "windows": analysis.windows_per_rank[rank] if analysis.windows_per_rank else args.samples,
           "stat_bytes_kept": analysis.stat_bytes["kept"][rank],
           "stat_bytes_during_pass": analysis.stat_bytes["during_pass"][rank],
           "grad_bytes_during_pass": analysis.stat_bytes["grads_during_pass"][rank],
           "factor_bytes_held": tensor_bytes(t for f in analysis.factors.values() for t in (f.U, f.sigma, f.Z)),
           "whitening_bytes_held": tensor_bytes(analysis.whitening.values()), "peak_rss_bytes": peak_rss_bytes(),
           "stages": {s: {"wall_s": meter.wall_s[s], "cpu_s": meter.cpu_s[s], "comm_s": meter.comm_s[s],
                          "comm_bytes": meter.comm_bytes[s]} for s in STAGES}}
    rows = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank != 0:
        return None
    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "backend": dist.get_backend() if dist.is_initialized() else "none", "world_size": world_size,
            "threads_per_rank": torch.get_num_threads(), "preset": args.preset, "layers": cfg["num_hidden_layers"],
            "dtype": args.dtype, "samples": args.samples, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "pass_order": analysis.options.pass_order, "load_average": os.getloadavg()[0], "ranks": rows}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _spawned(rank, world_size, init_file, args, out_file):
    import torch.distributed as dist

    faulthandler.dump_traceback_later(args.hang_s)  # a rank stuck this long prints where it is
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from zssvd.runtime.distributed import shutdown

    finished = False
    try:
        result = measure(args)
        if result is not None:
            with open(out_file, "w") as f:
                json.dump(result, f)
        finished = True
    finally:  # no rank tears gloo down while a peer still talks to it (a barrier when every rank finished)
        shutdown(clean=finished)


def sweep(args) -> list[dict]:
    import torch.multiprocessing as mp

    results = []
    for procs in args.procs:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            if procs == 1:  # no process group: exactly the one-process code path
                torch.set_num_threads(args.threads)
                result = measure(args)
            else:
                mp.spawn(_spawned, args=(procs, os.path.join(tmp, "init"), args, out), nprocs=procs, join=True)
                with open(out) as f:
                    result = json.load(f)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def summary(result: dict) -> dict:
    """The numbers of one measurement that the table shows: slowest rank per stage, totals."""
    ranks = result["ranks"]
    out = {"world_size": result["world_size"], "wall_s": max(r["wall_s"] for r in ranks),
           "cpu_s": sum(r["cpu_s"] for r in ranks), "load": result["load_average"]}
    for stage in STAGES:
        parts = [r["stages"][stage] for r in ranks]
        out[stage] = {"wall_s": max(p["wall_s"] for p in parts), "cpu_s": sum(p["cpu_s"] for p in parts),
                      "comm_s": max(p["comm_s"] for p in parts), "comm_mb": max(p["comm_bytes"] for p in parts) / 1e6}
    return out


def table(results: list[dict]) -> str:
    rows = [summary(r) for r in results]
    base = rows[0] if rows and rows[0]["world_size"] == 1 else None
    lines = ["| procs | load | stage | wall s (slowest rank) | CPU s (all ranks) | in collectives s "
             "| MB into collectives per rank | efficiency, wall | efficiency, CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for stage in (*STAGES, "total"):
            cell = row[stage] if stage != "total" else {"wall_s": row["wall_s"], "cpu_s": row["cpu_s"],
                                                        "comm_s": sum(row[s]["comm_s"] for s in STAGES),
                                                        "comm_mb": sum(row[s]["comm_mb"] for s in STAGES)}
            if base is not None:
                ref = base[stage] if stage != "total" else base
                eff_wall = f"{ref['wall_s'] / (row['world_size'] * cell['wall_s']):.2f}" if cell["wall_s"] else "-"
                eff_cpu = f"{ref['cpu_s'] / cell['cpu_s']:.2f}" if cell["cpu_s"] else "-"
            else:
                eff_wall = eff_cpu = "-"
            lines.append(f"| {row['world_size']} | {row['load']:.1f} | {stage} | {cell['wall_s']:.2f} | "
                         f"{cell['cpu_s']:.2f} | {cell['comm_s']:.3f} | {cell['comm_mb']:.2f} | {eff_wall} | "
                         f"{eff_cpu} |")
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    """Per rank: the statistics kept after the reduction and held during the pass (and of them the gradient
    sums), the factors and whitening factors held at the end, and the peak resident memory (MB)."""
    lines = ["| procs | rank | windows | statistics kept MB | statistics during pass MB | gradients during pass MB "
             "| factors held MB | whitening held MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for r in result["ranks"]:
            megabytes = [r[k] / 1e6 for k in ("stat_bytes_kept", "stat_bytes_during_pass", "grad_bytes_during_pass",
                                              "factor_bytes_held", "whitening_bytes_held")]
            lines.append(f"| {result['world_size']} | {r['rank']} | {r['windows']} | "
                         + " | ".join(f"{mb:.1f}" for mb in megabytes) + f" | {r['peak_rss_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts of the CPU sweep")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of decoder blocks")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--samples", type=int, default=16, help="calibration windows (shared out across the ranks)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--pass-order", default="batch", choices=("auto", "batch", "block"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU sweep)")
    p.add_argument("--hang-s", type=float, default=900, help="a spawned rank still running after this many seconds "
                   "prints its stack (faulthandler)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every measurement to this file")
    args = p.parse_args(argv)

    if "RANK" in os.environ:  # under torchrun: one measurement in its process group
        from zssvd.runtime.distributed import init_from_env, shutdown

        init_from_env(args.device)
        finished = False
        try:
            result = measure(args)
            if result is not None:
                print(json.dumps(result), flush=True)
                print(table([result]))
                print(memory_table([result]))
            finished = True
        finally:
            shutdown(clean=finished)
        return 0
    results = sweep(args)
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print(table(results))
    print(memory_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
