"""Windows per step of the calibration pass: peak memory against CPU and wall time (issue 17).

One window per step keeps one window's activations alive instead of four, but runs four times as
many forward/backward steps, each ending in OpenMP barriers. This measures what that costs: every
configuration runs the calibration pass alone (covariances and gradients, as ``zssvd.analyze`` does)
in a fresh interpreter, so the peak (VmHWM, the model included) belongs to that configuration, and
the configurations are interleaved over ``--repeats`` rounds so that a change in the machine's load
hits them alike.

    python bench/calibration_step.py --windows 8 --micro-batch 1 4 --threads 2 --wait-policy default passive

``--wait-policy passive`` runs the child with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at a barrier
instead of spinning; it must be set before the OpenMP runtime starts, hence the child process).
Prints one JSON line per run and a markdown table of medians.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def child(args: argparse.Namespace) -> None:
    """One calibration pass in this process; prints a JSON line."""
    import resource
    import time

    import torch

    torch.set_num_threads(args.threads)
    from zssvd.config import AnalysisOptions
    from zssvd.io.models import assign_input_groups, find_targets, load_model
    from zssvd.pipeline import _statistics
    from zssvd.runtime.memory import peak_resident_bytes
    from zssvd.stages.calibration import from_files

    model, tokenizer, _ = load_model(args.model, dtype="float32")
    calib = from_files(tokenizer, [args.calib_file], args.windows, args.seq_len, 0)
    targets = find_targets(model, None)
    assign_input_groups(model, targets, calib.input_ids[:1, :16])
    options = AnalysisOptions(micro_batch=args.micro_batch[0]).resolved(model, targets, tuple(calib.input_ids.shape))
    load_before = os.getloadavg()[0]
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    stats = _statistics(model, targets, calib, options)  # stage 1 exactly as zssvd.analyze runs it
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print("RESULT " + json.dumps(dict(
        micro_batch=args.micro_batch[0], threads=args.threads, wait_policy=os.environ.get("OMP_WAIT_POLICY", "default").lower(),
        windows=args.windows, seq_len=args.seq_len, peak_gb=round(peak_resident_bytes() / 1e9, 3),
        cpu_s=round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
        sys_s=round(r1.ru_stime - r0.ru_stime, 1), wall_s=round(t1 - t0, 1), loss=stats["loss"],
        minor_faults=r1.ru_minflt - r0.ru_minflt,
        load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--calib-file", default=DATA)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-policy", nargs="+", default=["default"], choices=["default", "passive", "active"])
    p.add_argument("--thp", nargs="+", default=["off"], choices=["off", "on"],
                   help="on: THP_MEM_ALLOC_ENABLE=1, torch's CPU allocator asks for transparent huge pages for "
                        "tensors of 2 MiB and more (one page fault per 2 MiB instead of per 4 KiB)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    variants = list(itertools.product(args.micro_batch, args.wait_policy, args.thp))
    for _, (micro, policy, thp) in itertools.product(range(args.repeats), variants):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        env["THP_MEM_ALLOC_ENABLE"] = "1" if thp == "on" else "0"
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy.upper()
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--calib-file", args.calib_file,
               "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--micro-batch", str(micro),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        row = {**json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]), "thp": thp}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| windows per step | OMP wait policy | huge pages | peak GB | CPU s | of which system | wall s | minor faults | runs |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for micro, policy, thp in variants:
        mine = [r for r in rows if (r["micro_batch"], r["wait_policy"], r["thp"]) == (micro, policy, thp)]
        med = {k: statistics.median(r[k] for r in mine) for k in ("peak_gb", "cpu_s", "sys_s", "wall_s", "minor_faults")}
        print(f"| {micro} | {policy} | {thp} | {med['peak_gb']:.2f} | {med['cpu_s']:.1f} | {med['sys_s']:.1f} | "
              f"{med['wall_s']:.1f} | {med['minor_faults']:.0f} | {len(mine)} |")


if __name__ == "__main__":
    main()
