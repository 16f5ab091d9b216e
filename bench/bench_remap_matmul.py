"""Benchmark remap_matmul against dense fp16 and torch low-rank baselines (LLaMA-7B shapes).

    python bench/bench_remap_matmul.py               # GPU: check every variant, then time
    python bench/bench_remap_matmul.py --check-only  # check only (CPU: Triton interpreter, tiny shapes)
    pytest bench/bench_remap_matmul.py --benchmark-only

Variants, side by side for each (shape, M), all fp16 activations:
  dense     cuBLAS x @ W^T, W (out x in) fp16;
  two-GEMM  torch (x @ V) @ U^T with fp16 factors at the same rank k;
  dequant   torch: dequantise the remap-packed factors to fp16, then the two GEMMs;
  ours      remap_matmul (Triton) on the packed factors.
Rank: k = ratio * min(out, in) rounded to a multiple of 16 (ALIGN), so rows of the 8-bit
factors stay 16-byte aligned and cuBLAS keeps its tensor-core fast path: ratio 0.6 gives
k = 2464 for every LLaMA-7B shape; the prefill target row uses ratio 0.8 (k = 3280).

Timing: CUDA-graph medians (bench/_timing.py) over enough weight copies to exceed the L2 cache.
GB/s counts the bytes a variant must move at least: its weights (packed: payload + scales) plus
x and y (not the M x k intermediate). "floor" is those bytes over the device-to-device copy
bandwidth measured once at start-up; "of floor" = floor / measured time (1.0 = at the floor).
Targets (reported, not asserted): decode M <= 16 at least 1.45x faster than dense; prefill
M = 2048 at ratio 0.8 no slower than dense.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _timing when run as a script
from _timing import copies_to_exceed_l2, gpu_name, graph_median_us  # noqa: E402

from zskernels import pack_remap, remap_matmul, remap_nbytes, unpack_remap  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in): q/k/v/o, gate/up, down
TOKENS = (1, 4, 16, 64, 256, 2048)
RATIO, PREFILL_RATIO, ALIGN = 0.6, 0.8, 16
CHECK_SHAPES = ((48, 40), (40, 48), (33, 33))  # --check-only on CPU
CHECK_TOKENS = (1, 3, 17)
VARIANTS = ("dense", "two-GEMM", "dequant", "ours")
F16 = torch.float16


def aligned_rank(ratio: float, out: int, in_: int) -> int:
    return max(ALIGN, round(ratio * min(out, in_) / ALIGN) * ALIGN)


# ----------------------------------------------------------------------------------------------
# Variants: weights(case) builds one copy of a variant's weights, call(x, w) runs it
# ----------------------------------------------------------------------------------------------
def make_case(out: int, in_: int, k: int, device: str, seed: int = 0) -> dict:
    """Random weights for every variant, of LLaMA-like size: dense entries ~ in^-0.5 (0.016 at
    4096), balanced factor entries 0.02, so U V^T has entries ~ 0.02 at k = 2464 as well."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    u, v = randn(out, k) * 0.02, randn(in_, k) * 0.02
    return {"W": (randn(out, in_) * in_**-0.5).to(F16), "U": u.to(F16), "Vt": v.t().contiguous().to(F16),
            "packed": pack_remap(u, v)}


def dense(x, w):
    return torch.nn.functional.linear(x, w["W"])


def two_gemm(x, w):
    return torch.nn.functional.linear(torch.nn.functional.linear(x, w["Vt"]), w["U"])


def dequant_two_gemm(x, w):
    p = w["packed"]
    vt = torch.cat([p["v_q"].to(F16) * p["v_scale"].to(F16)[:, None], p["v_tail"].to(F16)], dim=1)
    u = torch.cat([p["u_q"].to(F16) * p["u_scale"].to(F16)[None, :], p["u_tail"].to(F16)], dim=0)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, vt), u)


def ours(x, w):
    return remap_matmul(x, w["packed"], backend="triton")


CALLS = {"dense": dense, "two-GEMM": two_gemm, "dequant": dequant_two_gemm, "ours": ours}
WEIGHT_KEYS = {"dense": ("W",), "two-GEMM": ("U", "Vt"), "dequant": ("packed",), "ours": ("packed",)}


def weight_bytes(variant: str, out: int, in_: int, k: int) -> int:
    if variant == "dense":
        return 2 * out * in_
    if variant == "two-GEMM":
        return 2 * k * (out + in_)
    return remap_nbytes(out, in_, k)["total"]


def reference(variant: str, x: torch.Tensor, w: dict) -> torch.Tensor:
    """float64 result of what the variant computes (its own weights, dequantised if packed)."""
    xd = x.double()
    if variant == "dense":
        return xd @ w["W"].double().t()
    if variant == "two-GEMM":
        return (xd @ w["Vt"].double().t()) @ w["U"].double().t()
    u_hat, v_hat = unpack_remap(w["packed"])
    return (xd @ v_hat.double()) @ u_hat.double().t()


def check(case: dict, x: torch.Tensor, rtol: float = 5e-3) -> None:
    for variant in VARIANTS:
        want = reference(variant, x, case)
        got = CALLS[variant](x, case)
        err = float(torch.linalg.norm((got.double() - want).flatten()) / torch.linalg.norm(want.flatten()))
        if not err < rtol:
            raise AssertionError(f"{variant}: relative error {err:.2e} >= {rtol:g} at x {tuple(x.shape)}")


def check_only() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for out, in_ in CHECK_SHAPES:
        case = make_case(out, in_, aligned_rank(RATIO, out, in_), device)
        for m in CHECK_TOKENS:
            check(case, torch.randn(m, in_, device=device).to(F16))
    print(f"check-only: every variant matches float64 on {len(CHECK_SHAPES)} shapes x M in {CHECK_TOKENS} ({device})")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth (read + write), GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = graph_median_us([lambda: dst.copy_(src)], replays=20)
    return 2 * nbytes / us / 1e3


def weight_copies(variant: str, case: dict, count: int) -> list[dict]:
    def clone(value):
        return {k: t.clone() for k, t in value.items()} if isinstance(value, dict) else value.clone()

    return [{key: clone(case[key]) for key in WEIGHT_KEYS[variant]} for _ in range(count)]


def time_variant(variant: str, case: dict, x: torch.Tensor, nbytes: int) -> float:
    copies = weight_copies(variant, case, copies_to_exceed_l2(nbytes))
    fn = CALLS[variant]
    return graph_median_us([lambda w=w: fn(x, w) for w in copies])


def bench_row(out: int, in_: int, m: int, ratio: float, copy_gbs: float) -> dict:
    k = aligned_rank(ratio, out, in_)
    case = make_case(out, in_, k, "cuda")
    x = torch.randn(m, in_, device="cuda").to(F16)
    check(case, x)
    row = {"shape": f"{out}x{in_}", "M": m, "k": k, "ratio": ratio}
    for variant in VARIANTS:
        moved = weight_bytes(variant, out, in_, k) + 2 * m * (in_ + out)
        us = time_variant(variant, case, x, weight_bytes(variant, out, in_, k))
        row[variant] = {"us": us, "gbs": moved / us / 1e3, "floor": moved / copy_gbs / 1e3 / us}
    del case
    torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict]) -> None:
    print("| shape | M | k | dense µs | two-GEMM µs (x) | dequant µs (x) | ours µs (x) | ours GB/s | ours of floor "
          "| dense of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["dense"]["us"]
        cell = lambda v: f"{r[v]['us']:.1f} ({d / r[v]['us']:.2f}x)"  # noqa: E731
        print(f"| {r['shape']} | {r['M']} | {r['k']} | {d:.1f} | {cell('two-GEMM')} | {cell('dequant')} | "
              f"{cell('ours')} | {r['ours']['gbs']:.0f} | {r['ours']['floor']:.2f} | {r['dense']['floor']:.2f} |")


def report_targets(rows: list[dict], prefill_rows: list[dict]) -> None:
    decode = [r["dense"]["us"] / r["ours"]["us"] for r in rows if r["M"] <= 16]
    prefill = [r["dense"]["us"] / r["ours"]["us"] for r in prefill_rows]
    print(f"\ntarget decode (M <= 16, ratio {RATIO}): ours >= 1.45x dense -- worst {min(decode):.2f}x: "
          f"{'MET' if min(decode) >= 1.45 else 'NOT MET'}")
    print(f"target prefill (M = 2048, ratio {PREFILL_RATIO}): ours >= 1.0x dense -- worst {min(prefill):.2f}x: "
          f"{'MET' if min(prefill) >= 1.0 else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    args = parser.parse_args()
    if args.check_only or not torch.cuda.is_available():
        if not args.check_only:
            print("no CUDA device: running the checks only")
        check_only()
        return
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu_name()}; D2D copy bandwidth {copy_gbs:.0f} GB/s; k = ratio * min(out, in) rounded to a "
          f"multiple of {ALIGN}; fp16 activations\n")
    rows = [bench_row(out, in_, m, RATIO, copy_gbs) for out, in_ in SHAPES for m in TOKENS]
    print(f"ratio {RATIO}:\n")
    print_table(rows)
    prefill_rows = [bench_row(out, in_, 2048, PREFILL_RATIO, copy_gbs) for out, in_ in SHAPES]
    print(f"\nratio {PREFILL_RATIO}, prefill:\n")
    print_table(prefill_rows)
    report_targets(rows, prefill_rows)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry points (collected by `pytest bench/... --benchmark-only`; GPU only)
# ----------------------------------------------------------------------------------------------
def test_remap_matmul_check():
    check_only()


try:
    import pytest
except ImportError:  # running as a plain script without pytest installed
    pytest = None

if pytest is not None:
    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("m", TOKENS)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
    def test_remap_matmul_bench(benchmark, shape, m, variant):
        out, in_ = shape
        k = aligned_rank(RATIO, out, in_)
        case = make_case(out, in_, k, "cuda")
        x = torch.randn(m, in_, device="cuda").to(F16)
        check(case, x)
        copies = weight_copies(variant, case, copies_to_exceed_l2(weight_bytes(variant, out, in_, k)))
        fn = CALLS[variant]
        calls = [lambda w=w: fn(x, w) for w in copies]
        benchmark.extra_info.update(k=k, graph_median_us=graph_median_us(calls))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()

        def replay():
            graph.replay()
            torch.cuda.synchronize()

        benchmark.pedantic(replay, rounds=20, warmup_rounds=2)


if __name__ == "__main__":
    main()
