"""Benchmark of zskernels.sigma_scores against the plain-torch two-matmul path.

    python bench/bench_sigma_scores.py               # check, then time on the GPU (markdown table)
    python bench/bench_sigma_scores.py --check-only  # correctness only; without CUDA it runs
                                                     # tiny shapes in the Triton interpreter
    pytest bench/bench_sigma_scores.py --benchmark-only   # the same timings via pytest-benchmark

Scores s_i = u_i^T H v_i for LLaMA-7B shapes (4096x4096 and 11008x4096) at full rank
(k = min(m, n)) and half rank, fp32 inputs. The baseline is ``(U * (H @ V)).sum(0)`` in fp32,
timed with TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``: true fp32, as accurate
as the scores need) and on (faster, but about 4e-4 relative error). Every variant is first
checked against float64 on the same inputs; then each is timed with CUDA graphs over copies of
the inputs that together exceed L2 (bench/_timing.py), and its extra memory is measured as the
peak allocated during one call minus what was allocated before it. The work is compute-bound
(2mnk flops), so the table reports TFLOP/s rather than bandwidth.
Target: >= 1.5x faster than the TF32-off torch path, with O(k) extra memory.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch

if not torch.cuda.is_available():  # before triton is first imported (lazily, by zskernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _timing import copies_to_exceed_l2, gpu_name, graph_median_us  # noqa: E402
from zskernels import sigma_scores, sigma_scores_batched  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]  # (m, n): H is m x n
RANK_FRACTIONS = [1.0, 0.5]
CHECK_SHAPES = [(37, 29, 13), (64, 48, 48), (5, 70, 5)]  # tiny (m, n, k) for --check-only
BASELINE = "torch fp32, TF32 off"


def torch_two_matmul(U, H, V):
    return (U * (H @ V)).sum(0)


# name -> (function, TF32 flag while it runs, allowed relative error against float64)
VARIANTS = {
    BASELINE: (torch_two_matmul, False, 1e-5),
    "torch fp32, TF32 on": (torch_two_matmul, True, 3e-3),
    "ours, bf16x3 (default)": (functools.partial(sigma_scores, backend="triton", precision="bf16x3"), False, 2e-4),
    "ours, tf32x3": (functools.partial(sigma_scores, backend="triton", precision="tf32x3"), False, 1e-5),
    "ours, tf32": (functools.partial(sigma_scores, backend="triton", precision="tf32"), False, 3e-3),
    "ours, ieee": (functools.partial(sigma_scores, backend="triton", precision="ieee"), False, 1e-5),
}


@contextlib.contextmanager
def tf32(enabled: bool):
    """Set torch's TF32 switch for fp32 matmuls, restoring it afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def random_inputs(m: int, n: int, k: int, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(r, c, generator=gen, device=device) for r, c in ((m, k), (m, n), (n, k)))


def exact_scores(U, H, V):
    return (U.double() * (H.double() @ V.double())).sum(0)


def rel_err(s, ref) -> float:
    return ((s.double() - ref).norm() / ref.norm()).item()


def check_variants(U, H, V) -> dict[str, float]:
    """Relative error of every variant against float64; raise if one is out of tolerance."""
    ref = exact_scores(U, H, V)
    errors = {}
    for name, (fn, flag, tol) in VARIANTS.items():
        with tf32(flag):
            errors[name] = err = rel_err(fn(U, H, V), ref)
        if not err < tol:
            raise AssertionError(f"{name}: relative error {err:.2e} against float64 exceeds {tol:.0e}")
    return errors


def check_batched(device: str) -> None:
    items = [random_inputs(*shape, device=device, seed=i) for i, shape in enumerate(CHECK_SHAPES)]
    for item, s in zip(items, sigma_scores_batched(items, backend="triton")):
        err = rel_err(s, exact_scores(*item))
        if not err < 2e-4:
            raise AssertionError(f"batched: relative error {err:.2e} against float64")


def extra_memory_mib(fn, args, flag: bool) -> float:
    """Peak memory allocated during one call beyond what was allocated before it."""
    with tf32(flag):
        fn(*args)  # compile / pick algorithms first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_us(fn, copies, flag: bool, replays: int = 50) -> float:
    """CUDA-graph median per call, rotating over input copies that exceed L2."""
    with tf32(flag):  # cuBLAS picks its kernels when the graph is captured
        return graph_median_us([functools.partial(fn, *c) for c in copies], replays=replays)


def input_copies(m: int, n: int, k: int):
    per_copy = 4 * (m * k + m * n + n * k)
    return [random_inputs(m, n, k, "cuda", seed=i) for i in range(copies_to_exceed_l2(per_copy))]


def bench_case(m: int, n: int, k: int) -> list[dict]:
    copies = input_copies(m, n, k)
    errors = check_variants(*copies[0])
    rows = []
    for name, (fn, flag, _) in VARIANTS.items():
        us = time_us(fn, copies, flag)
        rows.append(dict(shape=f"{m}x{n}", k=k, variant=name, us=us, tflops=2 * m * n * k / us / 1e6,
                         mib=extra_memory_mib(fn, copies[0], flag), err=errors[name]))
    base = {r["variant"]: r["us"] for r in rows}
    for r in rows:
        r["vs_off"] = base[BASELINE] / r["us"]
        r["vs_on"] = base["torch fp32, TF32 on"] / r["us"]
    del copies
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], tf32_found: bool) -> None:
    print(f"\nGPU: {gpu_name()}, torch {torch.__version__}; TF32 switch as found: "
          f"allow_tf32={tf32_found} (set per variant as named, then restored)\n")
    print("| H (m x n) | k | variant | µs | TFLOP/s | speed-up vs TF32 off | vs TF32 on | extra MiB | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['k']} | {r['variant']} | {r['us']:.0f} | {r['tflops']:.1f} | "
              f"{r['vs_off']:.2f}x | {r['vs_on']:.2f}x | {r['mib']:.1f} | {r['err']:.1e} |")


def bench_cases():
    return [(m, n, int(f * min(m, n))) for m, n in SHAPES for f in RANK_FRACTIONS]


def run_checks(device: str) -> None:
    shapes = CHECK_SHAPES if device == "cpu" else bench_cases()
    for shape in shapes:
        errors = check_variants(*random_inputs(*shape, device=device))
        print(f"check {shape} on {device}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    check_batched(device)
    print(f"check batched on {device}: ok")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        run_checks("cpu")
        print("no CUDA device: timing skipped")
        return 0
    if args.check_only:
        run_checks("cuda")
        return 0
    tf32_found = torch.backends.cuda.matmul.allow_tf32
    print_table([row for case in bench_cases() for row in bench_case(*case)], tf32_found)
    return 0


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry (pytest bench/ --benchmark-only)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", bench_cases(), ids=lambda c: "x".join(map(str, c)))
def test_bench_sigma_scores(benchmark, case, variant):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fn, flag, tol = VARIANTS[variant]
    copies = input_copies(*case)
    with tf32(flag):
        assert rel_err(fn(*copies[0]), exact_scores(*copies[0])) < tol
    # The timed quantity is the CUDA-graph median (in extra_info); the wall time pytest-benchmark
    # records around it includes capture and is only a rough guide.
    us = benchmark.pedantic(time_us, args=(fn, copies, flag, 20), rounds=1, iterations=1)
    benchmark.extra_info.update(graph_median_us=us, tflops=2 * case[0] * case[1] * case[2] / us / 1e6,
                                extra_mib=extra_memory_mib(fn, copies[0], flag))


if __name__ == "__main__":
    sys.exit(main())
