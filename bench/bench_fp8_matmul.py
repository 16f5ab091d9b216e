"""Benchmark of zskernels.fp8_linear / fp8_lowrank_matmul (HQ mode) on LLaMA-7B layer shapes.

HQ at storage 0.4 of fp16 dense: fp8 factors cost k (m + n) bytes against 2 m n for fp16 dense, so
k = 0.8 m n / (m + n), rounded DOWN to a multiple of 16 (aligned rows for 16-byte loads and tensor
cores, and the storage stays at or under 0.4): 4096x4096 -> k = 1632, 11008x4096 -> k = 2384.

Variants, side by side (y = x W^T, W out x in; M tokens):
  dense fp16        cuBLAS F.linear with fp16 W (the baseline of every speed-up);
  two-GEMM fp16     F.linear(F.linear(x, V^T), U) with fp16 factors at the same k;
  fp8 dequant+GEMM  torch: fp8 factors -> fp16 (times their scales), then the two GEMMs;
  ours lowrank      fp8_lowrank_matmul (form b, fp8 factors, fused dequantisation);
  ours dense fp8    fp8_linear (form a, the whole matrix in fp8 with per-row scales).

Every variant is first checked against a float64 product of the weights it holds. Times are CUDA-graph
medians with weight copies rotated beyond L2 (bench/_timing.py). GB/s counts the bytes a variant must
move at least: its stored weights (payload + scales), x and y. The bandwidth floor is those bytes at
the device-to-device copy bandwidth measured once at start-up; "of floor" = floor time / measured time.

    python bench/bench_fp8_matmul.py               # GPU: check, then time; prints a markdown table
    python bench/bench_fp8_matmul.py --check-only  # any machine: correctness only (CPU: interpreter)
    pytest bench/bench_fp8_matmul.py --benchmark-only
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import zskernels as zk  # noqa: E402
from _timing import copies_to_exceed_l2, gpu_name, graph_median_us  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
TOKENS = [1, 4, 16, 64, 256, 2048]
CHECK_SHAPES = [(96, 80), (80, 112)]  # --check-only on a CPU: tiny, ranks 32 and 32
STORAGE = 0.4
DECODE_TOKENS = (1, 4, 16)
TARGET_DECODE_SPEEDUP = 2.0
VARIANTS = ["dense fp16", "two-GEMM fp16", "fp8 dequant+GEMM", "ours lowrank", "ours dense fp8"]


def hq_rank(out_features: int, in_features: int, storage: float = STORAGE) -> int:
    """k with fp8 k (out + in) bytes <= storage * fp16 dense bytes, rounded down to a multiple of 16."""
    k = 2 * storage * out_features * in_features / (out_features + in_features)
    return max(16, int(k) // 16 * 16)


@dataclass
class Weights:
    """One copy of every variant's weights for one shape (fp16 and fp8 versions of W ~= U V^T)."""

    dense16: torch.Tensor
    u16: torch.Tensor
    vt16: torch.Tensor
    lowrank8: dict
    dense8: dict
    nbytes: dict = field(default_factory=dict)

    @classmethod
    def random(cls, out_f: int, in_f: int, k: int, device: str, gen: torch.Generator) -> "Weights":
        U = torch.randn(out_f, k, generator=gen) / k ** 0.5
        V = torch.randn(in_f, k, generator=gen) / in_f ** 0.5
        W = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
        lowrank8 = {n: t.to(device) for n, t in zk.pack_fp8_lowrank(U, V).items()}
        dense8 = {n: t.to(device) for n, t in zk.quantize_fp8_dense(W).items()}
        w = cls(W.half().to(device), U.half().to(device), V.T.contiguous().half().to(device), lowrank8, dense8)
        w.nbytes = {"dense fp16": 2 * out_f * in_f, "two-GEMM fp16": 2 * k * (out_f + in_f),
                    "fp8 dequant+GEMM": zk.fp8_nbytes(lowrank8)["total"],
                    "ours lowrank": zk.fp8_nbytes(lowrank8)["total"], "ours dense fp8": zk.fp8_nbytes(dense8)["total"]}
        return w

    def clone(self) -> "Weights":
        copy = lambda t: {n: v.clone() for n, v in t.items()} if isinstance(t, dict) else t.clone()  # noqa: E731
        return Weights(*(copy(getattr(self, f)) for f in ("dense16", "u16", "vt16", "lowrank8", "dense8")),
                       nbytes=self.nbytes)


def _dequant_then_gemm(x: torch.Tensor, packed: dict) -> torch.Tensor:
    """The torch baseline: materialise fp16 factors, then two cuBLAS GEMMs."""
    vt = packed["vt_fp8"].to(x.dtype) * packed["v_scale"].to(x.dtype)[:, None]
    u = packed["u_fp8"].to(x.dtype) * packed["u_scale"].to(x.dtype)[None, :]
    return F.linear(F.linear(x, vt), u)


def run_variant(name: str, x: torch.Tensor, w: Weights) -> torch.Tensor:
    backend = "triton"
    if name == "dense fp16":
        return F.linear(x, w.dense16)
    if name == "two-GEMM fp16":
        return F.linear(F.linear(x, w.vt16), w.u16)
    if name == "fp8 dequant+GEMM":
        return _dequant_then_gemm(x, w.lowrank8)
    if name == "ours lowrank":
        return zk.fp8_lowrank_matmul(x, w.lowrank8, backend=backend)
    return zk.fp8_linear(x, w.dense8, backend=backend)


def float64_reference(name: str, x: torch.Tensor, w: Weights) -> torch.Tensor:
    """x W^T in float64 for the weights that variant actually holds."""
    x = x.double()
    if name == "dense fp16":
        return x @ w.dense16.double().T
    if name == "two-GEMM fp16":
        return (x @ w.vt16.double().T) @ w.u16.double().T
    if name == "ours dense fp8":
        return x @ zk.dequantize_fp8(w.dense8).double().T
    u_hat, v_hat = zk.dequantize_fp8(w.lowrank8)
    return (x @ v_hat.double()) @ u_hat.double().T


def check_variant(name: str, x: torch.Tensor, w: Weights, tol: float = 5e-3) -> float:
    ref = float64_reference(name, x, w)
    y = run_variant(name, x, w)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    if not (y.shape == ref.shape and y.dtype == x.dtype and err < tol):
        raise AssertionError(f"{name}: relative error {err:.2e} (tolerance {tol:.0e}), output "
                             f"{tuple(y.shape)} {y.dtype}")
    return err


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_median_us([lambda: dst.copy_(src)], replays=20)
    return 2 * nbytes / us / 1e3


def check_all(shapes, tokens, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in shapes:
        w = Weights.random(out_f, in_f, hq_rank(out_f, in_f), device, gen)
        for m in tokens:
            x = torch.randn(m, in_f, generator=gen).half().to(device)
            errs = {name: check_variant(name, x, w) for name in VARIANTS}
            print(f"check {out_f}x{in_f} k={hq_rank(out_f, in_f)} M={m}: " +
                  ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))


def time_shape(out_f: int, in_f: int, bandwidth_gbs: float) -> list[dict]:
    """Check, then time every variant at every token count for one shape."""
    gen = torch.Generator().manual_seed(out_f + in_f)
    k = hq_rank(out_f, in_f)
    base = Weights.random(out_f, in_f, k, "cuda", gen)
    rows = []
    for name in VARIANTS:
        copies = [base] + [base.clone() for _ in range(copies_to_exceed_l2(base.nbytes[name]) - 1)]
        for m in TOKENS:
            x = torch.randn(m, in_f, generator=gen).half().cuda()
            check_variant(name, x, base)
            us = graph_median_us([lambda w=w: run_variant(name, x, w) for w in copies])
            moved = base.nbytes[name] + 2 * m * (in_f + out_f)
            rows.append(dict(shape=f"{out_f}x{in_f}", k=k, m=m, variant=name, us=us,
                             gbs=moved / us / 1e3, floor=moved / bandwidth_gbs / 1e3 / us))
        del copies
        torch.cuda.empty_cache()
    dense = {r["m"]: r["us"] for r in rows if r["variant"] == "dense fp16"}
    for r in rows:
        r["speedup"] = dense[r["m"]] / r["us"]
    return rows


def print_table(rows: list[dict]) -> None:
    print("| shape | k | M | variant | µs | GB/s | of floor | speed-up vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["shape"], r["m"], VARIANTS.index(r["variant"]))):
        print(f"| {r['shape']} | {r['k']} | {r['m']} | {r['variant']} | {r['us']:.1f} | {r['gbs']:.0f} | "
              f"{r['floor']:.0%} | {r['speedup']:.2f}x |")


def print_target(rows: list[dict]) -> None:
    decode = [r for r in rows if r["variant"] == "ours lowrank" and r["m"] in DECODE_TOKENS]
    worst = min(decode, key=lambda r: r["speedup"])
    verdict = "met" if worst["speedup"] >= TARGET_DECODE_SPEEDUP else "NOT met"
    print(f"\nTarget (HQ factors at storage {STORAGE}, decode M in {DECODE_TOKENS}: >= {TARGET_DECODE_SPEEDUP}x "
          f"faster than dense fp16): {verdict}; worst {worst['speedup']:.2f}x at {worst['shape']}, M={worst['m']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: checking tiny shapes in the Triton interpreter, no timing")
        check_all(CHECK_SHAPES, TOKENS, "cpu")
        return 0
    check_all(SHAPES, [1, 256], "cuda")
    if args.check_only:
        return 0
    bandwidth = copy_bandwidth_gbs()
    print(f"\n{gpu_name()}; device-to-device copy bandwidth {bandwidth:.0f} GB/s; "
          f"HQ k = 0.8 mn/(m+n) rounded down to a multiple of 16\n")
    rows = [r for out_f, in_f in SHAPES for r in time_shape(out_f, in_f, bandwidth)]
    print_table(rows)
    print_target(rows)
    return 0


# --- pytest-benchmark entry points (pytest bench/ --benchmark-only); GPU only ------------------
def _bench_params():
    return [(s, m, v) for s in SHAPES for m in TOKENS for v in VARIANTS]


try:
    import pytest

    @pytest.mark.gpu
    @pytest.mark.parametrize("shape,m,variant", _bench_params(),
                             ids=[f"{s[0]}x{s[1]}-M{m}-{v.replace(' ', '_')}" for s, m, v in _bench_params()])
    def test_fp8_matmul(benchmark, shape, m, variant):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        out_f, in_f = shape
        gen = torch.Generator().manual_seed(0)
        w = Weights.random(out_f, in_f, hq_rank(out_f, in_f), "cuda", gen)
        x = torch.randn(m, in_f, generator=gen).half().cuda()
        check_variant(variant, x, w)
        copies = [w] + [w.clone() for _ in range(copies_to_exceed_l2(w.nbytes[variant]) - 1)]
        benchmark.extra_info["graph_median_us"] = graph_median_us(
            [lambda c=c: run_variant(variant, x, c) for c in copies])
        benchmark.extra_info["k"] = hq_rank(out_f, in_f)
        benchmark(lambda: (run_variant(variant, x, w), torch.cuda.synchronize()))
except ImportError:  # plain-script use without pytest
    pass


if __name__ == "__main__":
    sys.exit(main())
