"""Block order against batch order on a real model: same scores, loss and ranks; calibration-pass time.

    python bench/block_order_check.py --calib-file ../shared/data/wikitext-2/valid.txt   # SmolLM2, CPU

Prints each order's stage timings and loss, the largest relative score difference and whether the
selections at 0.8 and 0.6 agree.
"""
from __future__ import annotations

import argparse
import sys

import zssvd
from zssvd.stages.calibration import from_files
from zssvd.pipeline import AnalysisOptions, analyze
from zssvd.stages.selection import select


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--calib-file", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    model, tokenizer, _ = zssvd.load_model(args.model, device=args.device or "cpu")
    calib = from_files(tokenizer, [args.calib_file], args.samples, args.seq_len, seed=0)
    analyses = {}
    for order in ("batch", "block"):
        analyses[order] = analyze(model, calib, AnalysisOptions(pass_order=order, micro_batch=args.micro_batch))
        timings = {k: round(v, 1) for k, v in analyses[order].timings.items()}
        print(f"{order}: timings {timings}, loss {analyses[order].loss:.6f}", flush=True)
    a, b = analyses["batch"], analyses["block"]
    worst = max(((a.scores[n] - b.scores[n]).abs().max() / a.scores[n].abs().max()).item() for n in a.scores)
    print(f"largest relative score difference {worst:.3g}, loss difference {a.loss - b.loss:.3g}")
    for ratio in (0.8, 0.6):
        ranks = [select(x.specs, x.scores, {n: f.sigma for n, f in x.factors.items()}, ratio=ratio).ranks
                 for x in (a, b)]
        print(f"ratio {ratio}: same ranks {ranks[0] == ranks[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
