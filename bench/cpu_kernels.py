"""zskernels' CPU kernels against torch's own routes, per GEMM, side by side in one run.

For each weight shape (SmolLM2-135M's layers and their ratio-0.8 factors) and each number of rows M:
bf16 ``F.linear`` against ``bf16_linear`` (a bf16 weight as stored), ``_weight_int8pack_mm`` against
``int8_matmul`` (an int8 weight with row scales, VNNI on two int8 planes of x), and
``_weight_int4pack_mm_for_cpu`` and de-quantise-then-GEMM (the int4 path's chunked route) against ``int4_matmul``
(int4 codes with a scale and min per group of 64, zskernels/formats/int4.py). Every timed call reads a different copy
of the weights (each method its own copies), enough to exceed 3x the last-level cache, as a decode step reads them
from memory; random values, medians of ``--repeats`` calls, the methods interleaved per repeat. The CPU's name is
printed with the table and saved with ``--json``.

    python bench/cpu_kernels.py [--threads 2] [--repeats 200] [--rows 1,8,32,64,128,512] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from zskernels import _cpu_kernel as cpu_kernel
from zskernels.formats.int4 import quantize_int4
from zskernels.ops.int4 import cpu as int4_cpu

# (N, K): SmolLM2-135M's MLP (1536 x 576, 576 x 1536), attention (576 x 576, 192 x 576), and the factors of
# an MLP projection at ratio 0.8 in 16 bits (rank 335).
SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (335, 576), (1536, 335)]
INT4_GROUP = 64
CACHE_BYTES = 32 * 2**20  # where the L3's size cannot be read; weights rotate through 3x the L3


def last_level_cache_bytes() -> int:
    try:  # Linux: "32768K"
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
    except (OSError, ValueError, IndexError):
        return CACHE_BYTES


def copies_beyond_cache(bytes_per_copy: int) -> int:
    return max(2, -(-3 * last_level_cache_bytes() // max(bytes_per_copy, 1)))


def int8_weights(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8), torch.rand(n, generator=gen) * 0.01


def int4_weights(n: int, k: int, copies: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [quantize_int4(torch.randn(n, k, generator=gen), group_size=INT4_GROUP) for _ in range(copies)]


def methods(n: int, k: int, gen: torch.Generator) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """Each method as one closure per weight copy. The int8 and int4 weights have K rounded up to 16 and to the
    group, as the CPU paths pad them (x is padded outside the timing)."""
    copies = copies_beyond_cache(n * k * 2)
    bf16 = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for _ in range(copies)]
    int8 = [int8_weights(n, padded(k, 16), gen) for _ in range(copies)]
    int4 = int4_weights(n, k, copies_beyond_cache(n * k // 2), gen)
    out = {"bf16 F.linear": [lambda x, w=w: F.linear(x, w) for w in bf16],
           "int8pack": [lambda x, w=w, s=s.to(torch.bfloat16): torch._weight_int8pack_mm(x, w, s) for w, s in int8],
           "int4pack": [lambda x, w=int4_cpu.int4pack_weight(q["codes"]),
                        sz=int4_cpu.scales_and_zeros(q["scales"], q["mins"], torch.bfloat16):
                        torch._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, sz) for q in int4],
           "int4 chunked": [lambda x, q=q: int4_cpu._chunked(x, q["codes"], q["scales"], q["mins"], x.shape[1])
                            for q in int4]}
    if cpu_kernel.available():  # copies of its own: interleaved calls must not find each other's in the cache
        out["bf16_linear"] = [lambda x, w=w.clone(): cpu_kernel.bf16_linear(x, w) for w in bf16]
        out["int8_matmul"] = [lambda x, p=cpu_kernel.pack(w), s=s: cpu_kernel.matmul(x, p, s) for w, s in int8]
        out["int4_matmul"] = [lambda x, p=cpu_kernel.int4_pack(q["codes"], q["scales"], q["mins"]):
                              cpu_kernel.int4_matmul(x, p, n) for q in int4]
    return out


def padded(k: int, multiple: int) -> int:
    return -(-k // multiple) * multiple


def median_us(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Per method, the median of ``repeats`` timed calls, methods interleaved per repeat, copies rotating."""
    times = [[] for _ in calls]
    for r in range(repeats + 3):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call(r)
            if r >= 3:  # warm-up calls are not counted
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e6 for t in times]


def run(rows: list[int], repeats: int, gen: torch.Generator) -> list[dict]:
    results = []
    for n, k in SHAPES:
        by_method = methods(n, k, gen)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            inputs = {"int8": F.pad(x, (0, padded(k, 16) - k)), "int4": F.pad(x, (0, padded(k, INT4_GROUP) - k))}
            names = [name for name in by_method if name != "int8pack" or m <= 64]  # int8pack: decode sizes
            calls = [lambda r, c=by_method[name], x=inputs.get(name[:4], x): c[r % len(c)](x) for name in names]
            results.append({"N": n, "K": k, "M": m, **dict(zip(names, median_us(calls, repeats)))})
    return results


def table(results: list[dict]) -> str:
    cols = ["bf16 F.linear", "bf16_linear", "int8pack", "int8_matmul", "int4pack", "int4_matmul", "int4 chunked"]
    lines = ["| (N, K) | M | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in results:
        cells = [f"{row[c]:.1f}" if c in row else "" for c in cols]
        lines.append(f"| {row['N']} x {row['K']} | {row['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rows", default="1,8,32,64,128,512", help="comma-separated numbers of rows of x")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernel.available():
        print(f"zskernels' CPU kernels are off here ({cpu_kernel.unavailable_reason() or 'the build failed'}): "
              "only torch's routes are timed")
    results = run([int(m) for m in args.rows.split(",")], args.repeats, torch.Generator().manual_seed(0))
    print(f"{cpu_kernel.cpu_model()}, {args.threads} threads, bf16 x, us per GEMM "
          f"(median of {args.repeats}):")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_kernel.cpu_model(), "threads": args.threads, "repeats": args.repeats, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
