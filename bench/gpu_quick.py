"""Every headline GPU figure of issues 3, 4, 6 and 17 in one call of at most 7 minutes, as one markdown file.

The first device call of a session with a lent H200 (or H100), from the repository root::

    run(command="bash bench/gpu_session.sh quick", timeout_s=480)

It writes ``$OUT/quick-<GPU>-<date>.md`` (the table, GPU name and date in its heading) and
``quick-<GPU>-<date>.log`` (every part's output). To record it: append the .md file under
``files_at`` to bench/RESULTS.md (``cat <files_at>/quick-*.md >> bench/RESULTS.md``), then compare
its kernel rows with the predictions of ``python bench/traffic.py`` and retune
``zskernels/configs/*.json`` (``bash bench/gpu_session.sh tune``) if time is left.

Parts, in this order, each in its own process with a time budget (seconds; ``--budget`` scales
them; 415 s in all). A part may also use what the parts before it left unused; one that cannot
start with its whole budget is skipped, one that overruns is stopped; the table says which, and
keeps the rows a stopped part printed. The .md file is rewritten after every part.

  check     (70)  every kernel variant against float64 on odd shapes, M in every config bucket:
                  the check functions of bench_remap_matmul.py (int8 and fp8 remap), bench_fp8_matmul.py
                  (HQ factors, fp8 dense) and bench_sigma_scores.py (single and batched scores)
  kernels  (110)  µs and speed-up against cuBLAS dense fp16 at LLaMA-7B shapes, M = 1, 16, 2048:
                  remap rho 0.6, HQ fp8 factors at storage 0.4, fp16 factors at ratio 0.8 (torch
                  two-GEMM) and remap rho 0.8 (prefill); each case checked against float64 first
  int4      (25)  int4 decode (M = 1) at LLaMA-7B shapes, dense and low-rank (groups of 64): the shipped
                  128-row GEMV against the 32-row one it replaced (``_alternatives`` "gemv-32-rows" of
                  configs/int4_matmul.json, forced), side by side, each checked against the torch path
  scores    (35)  sigma_scores against the torch two-matmul path (bench_sigma_scores.bench_case)
  compress  (70)  bench/compress_scale.py: --compress-layers (4) 7B-shaped blocks, 8 x 2048
                  calibration tokens; seconds per stage and per calibration token, peak memory, and
                  the 32-layer, 256 x 2048-token time extrapolated from them
  serve     (95)  bench/serve_scale.py --static: decode tokens/s dense vs remap vs HQ, batch 1, with
                  --serve-layers (4) 7B-shaped blocks (torch.compile of 32 would not fit the budget)

Timings are CUDA-graph medians with weights rotated beyond L2 (bench/_timing.py). Needs torch,
triton, numpy and (compress, serve) transformers, and installs nothing: a missing one fails its
part alone, with the error in the table. pytest is optional (bench_sigma_scores imports it).

    python bench/gpu_quick.py                 # on the GPU (what gpu_session.sh quick runs)
    python bench/gpu_quick.py --tiny          # anywhere: interpreter, tiny shapes, every section (the CPU test)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE.parent / "python", HERE):  # zskernels, zssvd, the bench modules
    sys.path.insert(0, str(path))

CUDA = torch.cuda.is_available()
BUDGETS = {"check": 70, "kernels": 110, "int4": 25, "scores": 35, "compress": 70, "serve": 95}
TOTAL_BUDGET = sum(BUDGETS.values()) + 10  # seconds (415): 10 s for this process's start; under 7 minutes in all
RESULT = "RESULT "  # prefix of the JSON line a part prints


# ----------------------------------------------------------------------------------------------
# Helpers shared by the parts
# ----------------------------------------------------------------------------------------------
def _import_bench(name: str):
    """A bench_*.py module; bench_sigma_scores imports pytest for its benchmark entry points only,
    so a machine without pytest gets an inert stand-in rather than losing the checks."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        identity = lambda *a, **k: (lambda f: f)  # noqa: E731
        sys.modules["pytest"] = types.SimpleNamespace(mark=types.SimpleNamespace(parametrize=identity, gpu=None),
                                                      skip=lambda *a, **k: None)
    return __import__(name)


def time_us(calls: list) -> float:
    """Median µs of one call: CUDA-graph replays on a GPU, wall clock elsewhere (the tiny mode)."""
    if CUDA:
        from _timing import graph_median_us
        return graph_median_us(calls)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for call in calls:
            call()
        samples.append((time.perf_counter() - start) * 1e6 / len(calls))
    return statistics.median(samples)


def copies(nbytes: int, tiny: bool) -> int:
    from _timing import copies_to_exceed_l2
    return 2 if tiny else copies_to_exceed_l2(nbytes)


def emit(rows: list[dict], **notes) -> None:
    print(RESULT + json.dumps({"rows": rows, **notes}, default=str), flush=True)


# ----------------------------------------------------------------------------------------------
# Parts (each prints RESULT lines; run in a child process on the GPU)
# ----------------------------------------------------------------------------------------------
CHECK_TOKENS = (1, 3, 17, 65, 300)  # one per config bucket: GEMV, decode dot, M <= 64, M <= 256, prefill


def part_check(tiny: bool) -> None:
    """Every variant of every op against float64, on shapes that are multiples of no block size."""
    device = "cuda" if CUDA else "cpu"
    tokens = (1, 17) if tiny else CHECK_TOKENS
    remap, fp8, sigma = (_import_bench(n) for n in ("bench_remap_matmul", "bench_fp8_matmul", "bench_sigma_scores"))
    from zskernels import pack_remap, unpack_remap

    def attempt(op: str, what: str, fn) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                fn()
            emit([{"op": op, "cases": what, "result": "pass"}])
        except Exception as err:  # noqa: BLE001 -- a failed check is the finding to report
            emit([{"op": op, "cases": what, "result": f"FAIL: {type(err).__name__}: {str(err)[:300]}"}])

    def check_remap(fmt: str, shapes) -> None:
        for out, in_ in shapes:
            case = remap.make_case(out, in_, remap.aligned_rank(remap.RATIO, out, in_), device)
            if fmt == "fp8":
                case["packed"] = pack_remap(*unpack_remap(case["packed"]), fmt="fp8")
            for m in tokens:
                remap.check(case, torch.randn(m, in_, device=device).to(torch.float16))

    remap_shapes = ((33, 33),) if tiny else remap.CHECK_SHAPES
    for fmt in ("int8", "fp8"):
        attempt(f"remap_matmul ({fmt}) vs dense, two-GEMM, dequant", f"{remap_shapes} x M {tokens}",
                lambda fmt=fmt: check_remap(fmt, remap_shapes))
    fp8_shapes = ((97, 83),) if tiny else ((97, 83), (80, 112), (1000, 2100))
    attempt("fp8_lowrank_matmul, fp8_linear vs torch", f"{fp8_shapes} x M {tokens}",
            lambda: fp8.check_all(fp8_shapes, tokens, device))
    sigma_shapes = sigma.CHECK_SHAPES[:1] if tiny else sigma.CHECK_SHAPES

    def check_scores() -> None:
        for shape in sigma_shapes:
            sigma.check_variants(*sigma.random_inputs(*shape, device=device))
        sigma.check_batched(device)

    attempt("sigma_scores (every precision) + batched", f"(m, n, k) {sigma_shapes}", check_scores)


def _remap_rows(out: int, in_: int, tokens: tuple, tiny: bool) -> None:
    """Dense, fp16 two-GEMM and remap at rho 0.6 (and 0.8 for prefill), fp16 factors at ratio 0.8."""
    remap = _import_bench("bench_remap_matmul")
    device = "cuda" if CUDA else "cpu"
    ranks = {"remap rho 0.6": remap.aligned_rank(remap.RATIO, out, in_),
             "fp16 factors ratio 0.8": max(16, int(0.8 * out * in_ / (out + in_)) // 16 * 16),
             "remap rho 0.8": remap.aligned_rank(remap.PREFILL_RATIO, out, in_)}
    for label, k in ranks.items():
        case = remap.make_case(out, in_, k, device)
        variants = ("two-GEMM",) if label.startswith("fp16") else ("ours", "two-GEMM", "dequant")
        for m in tokens:
            if label == "remap rho 0.8" and m < 256:
                continue  # the prefill target's row
            x = torch.randn(m, in_, device=device).to(torch.float16)
            remap.check(case, x)
            timed = {}
            for v in ("dense",) + variants:
                ws = remap.weight_copies(v, case, copies(remap.weight_bytes(v, out, in_, k), tiny))
                timed[v] = time_us([lambda w=w, f=remap.CALLS[v]: f(x, w) for w in ws])
            emit([{"what": label, "shape": f"{out}x{in_}", "M": m, "k": k, "dense_us": timed["dense"],
                   "us": timed[variants[0]], "speedup": timed["dense"] / timed[variants[0]],
                   "others": {v: round(timed[v], 1) for v in variants[1:]}}])
        del case


def _hq_rows(out: int, in_: int, tokens: tuple, tiny: bool) -> None:
    """HQ fp8 factors at storage 0.4 (and fp8 dense) against cuBLAS dense fp16."""
    fp8 = _import_bench("bench_fp8_matmul")
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(out + in_)
    k = fp8.hq_rank(out, in_)
    base = fp8.Weights.random(out, in_, k, device, gen)
    variants = ("dense fp16", "ours lowrank", "ours dense fp8", "fp8 dequant+GEMM")
    for m in tokens:
        x = torch.randn(m, in_, generator=gen).half().to(device)
        timed = {}
        for v in variants:
            fp8.check_variant(v, x, base)
            ws = [base] + [base.clone() for _ in range(copies(base.nbytes[v], tiny) - 1)]
            timed[v] = time_us([lambda w=w, v=v: fp8.run_variant(v, x, w) for w in ws])
        emit([{"what": "HQ fp8 factors, storage 0.4", "shape": f"{out}x{in_}", "M": m, "k": k,
               "dense_us": timed["dense fp16"], "us": timed["ours lowrank"],
               "speedup": timed["dense fp16"] / timed["ours lowrank"],
               "others": {v: round(timed[v], 1) for v in variants[2:]}}])


def part_kernels(tiny: bool) -> None:
    shapes = ((48, 40),) if tiny else ((4096, 4096), (11008, 4096), (4096, 11008))
    tokens = (1, 300) if tiny else (1, 16, 2048)
    if CUDA:
        emit([], bandwidth_gbs=_import_bench("bench_remap_matmul").copy_bandwidth_gbs())
    for out, in_ in shapes:
        for rows in (_remap_rows, _hq_rows):
            rows(out, in_, tokens, tiny)
            if CUDA:
                torch.cuda.empty_cache()


INT4_OLD = "gemv-32-rows"  # the M = 1 config shipped before the 128-row GEMV


def part_int4(tiny: bool) -> None:
    """int4 at M = 1: the shipped M = 1 config against INT4_OLD, same weights, same x, timed back to back."""
    import zskernels
    from zskernels._configs import use_config
    from zskernels.ops.int4.kernels import named_config

    device = "cuda" if CUDA else "cpu"
    old = named_config(INT4_OLD)
    gen = torch.Generator().manual_seed(17)
    for out, in_ in ((48, 40),) if tiny else ((4096, 4096), (11008, 4096), (4096, 11008)):
        k = int(0.8 * out * in_ / (out + in_)) // 16 * 16  # fp8-lowrank's rank (storage 0.4 in fp8)
        w = torch.randn(out, in_, generator=gen).to(device)
        x = torch.randn(1, in_, generator=gen).half().to(device)
        dense = [w.half() for _ in range(copies(2 * out * in_, tiny))]
        dense_us = time_us([lambda d=d: torch.nn.functional.linear(x, d) for d in dense])
        stores = {"int4 dense": (zskernels.int4_linear, zskernels.quantize_int4(w, 64), "-"),
                  "int4 lowrank": (zskernels.int4_lowrank_matmul, zskernels.pack_int4_lowrank(
                      torch.randn(out, k, generator=gen).to(device), torch.randn(in_, k, generator=gen).to(device),
                      64), k)}
        del w
        for what, (op, packed, rank) in stores.items():
            ref = op(x, packed, backend="torch").double()
            nbytes = sum(t.numel() * t.element_size() for t in packed.values())
            ws = [packed] + [{n: t.clone() for n, t in packed.items()} for _ in range(copies(nbytes, tiny) - 1)]
            row, errors = {"what": what, "shape": f"{out}x{in_}", "M": 1, "k": rank, "dense_us": dense_us}, {}
            for label, forced in (("new", None), ("old", old)):
                with use_config("int4_matmul", forced) if forced else contextlib.nullcontext():
                    y = op(x, packed, backend="triton").double()
                    errors[label] = ((y - ref).norm() / ref.norm()).item()
                    row[f"us_{label}"] = time_us([lambda p=p: op(x, p, backend="triton") for p in ws])
            row.update(speedup=dense_us / row["us_new"], new_vs_old=row["us_old"] / row["us_new"],
                       err=max(errors.values()), check="ok" if max(errors.values()) < 5e-3 else "FAIL")
            emit([row])
            del ws
        del stores, dense
        if CUDA:
            torch.cuda.empty_cache()


def part_scores(tiny: bool) -> None:
    sigma = _import_bench("bench_sigma_scores")
    if CUDA:
        for case in ((4096, 4096, 4096), (11008, 4096, 4096)):
            emit([{k: r[k] for k in ("shape", "k", "variant", "us", "tflops", "vs_off", "mib", "err")}
                  for r in sigma.bench_case(*case)])
        return
    m, n, k = sigma.CHECK_SHAPES[0]
    inputs = sigma.random_inputs(m, n, k, "cpu")
    errors = sigma.check_variants(*inputs)
    base = time_us([lambda: sigma.torch_two_matmul(*inputs)])
    for name in (sigma.BASELINE, "ours, bf16x3 (default)"):
        us = time_us([lambda f=sigma.VARIANTS[name][0]: f(*inputs)])
        emit([{"shape": f"{m}x{n}", "k": k, "variant": name, "us": us, "tflops": 2 * m * n * k / us / 1e6,
               "vs_off": base / us, "mib": None, "err": errors[name]}])


def _with_layers(preset: str, layers: int) -> str:
    """A preset like ``preset`` with ``layers`` decoder blocks, registered for compress/serve_scale."""
    from compress_scale import PRESETS
    name = f"{preset}-{layers}l"
    PRESETS[name] = dict(PRESETS[preset], num_hidden_layers=layers)
    return name


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def part_compress(tiny: bool, layers: int) -> None:
    import compress_scale
    preset = "tiny" if tiny else _with_layers("llama-7b", layers)
    argv = ["--preset", preset, "--device", "cuda" if CUDA else "cpu"]
    argv += ["--samples", "2", "--seq-len", "32"] if tiny else ["--samples", "8", "--seq-len", "2048"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compress_scale.main(argv)
    emit(_json_lines(out.getvalue()), argv=argv, layers=compress_scale.PRESETS[preset]["num_hidden_layers"])


def part_serve(tiny: bool, layers: int) -> None:
    import serve_scale
    if tiny:
        argv = ["--preset", "tiny", "--device", "cpu", "--batch", "1", "--prompt-len", "8", "--new-tokens", "6",
                "--repeats", "1"]
    else:
        argv = ["--preset", _with_layers("llama-7b", layers), "--static", "--batch", "1", "--prompt-len", "64",
                "--new-tokens", "33", "--repeats", "3"]
    # rows are printed as they are measured, so a stopped run keeps the variants it finished
    serve_scale.main(argv)
    print(RESULT + json.dumps({"rows": [], "argv": argv}), flush=True)


PARTS = {"check": part_check, "kernels": part_kernels, "int4": part_int4, "scores": part_scores,
         "compress": part_compress, "serve": part_serve}


# ----------------------------------------------------------------------------------------------
# Orchestration: each part in a child process with its budget; one markdown file
# ----------------------------------------------------------------------------------------------
def run_part(name: str, args: argparse.Namespace, budget: float, log) -> tuple[str, list[dict]]:
    """(status, RESULT payloads) of one part, run as a child whose output goes to ``log`` as well."""
    cmd = [sys.executable, __file__, "--part", name, "--serve-layers", str(args.serve_layers),
           "--compress-layers", str(args.compress_layers)] + (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    with open(log.name + f".{name}", "w+") as out:  # a file, so a stopped child's lines survive
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=budget).returncode
            status = "done" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"STOPPED at its budget of {budget:.0f} s"
        out.seek(0)
        text = out.read()
    os.unlink(log.name + f".{name}")
    log.write(f"\n===== {name}: {status}, {time.perf_counter() - start:.0f} s =====\n{text}")
    log.flush()
    payloads = [json.loads(line[len(RESULT):]) for line in text.splitlines() if line.startswith(RESULT)]
    if name == "serve":  # serve_scale prints its own JSON rows
        payloads.insert(0, {"rows": _json_lines(text)})
    if status != "done":
        tail = [line for line in text.splitlines() if line.strip() and not line.startswith(("{", RESULT))][-3:]
        status += ": " + " / ".join(t.strip()[:200] for t in tail)
    return f"{status} ({time.perf_counter() - start:.0f} s of {budget:.0f} s)", payloads


def _rows(payloads: list[dict]) -> list[dict]:
    return [r for p in payloads for r in p.get("rows", [])]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def _table(rows: list[dict], keys: list[str]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows])


def section_kernels(payloads: list[dict]) -> list[str]:
    bw = [p["bandwidth_gbs"] for p in payloads if "bandwidth_gbs" in p]
    lines = [f"Device-to-device copy bandwidth: {bw[0]:.0f} GB/s. " if bw else "",
             "speed-up = cuBLAS dense fp16 µs / ours µs (> 1: faster than dense). Targets: remap rho 0.6 decode "
             ">= 1.45x, HQ decode >= 2.0x, prefill M = 2048 at ratio 0.8 >= 1.0x."]
    return lines + [""] + _table(_rows(payloads), ["what", "shape", "M", "k", "dense_us", "us", "speedup", "others"])


def section_compress(payloads: list[dict]) -> list[str]:
    rows = _rows(payloads)
    if not rows:
        return ["(no rows)"]
    r, layers = rows[0], next((p["layers"] for p in payloads if "layers" in p), None)
    tokens = r["tokens"]
    scale_tokens, scale_layers = 256 * 2048 / tokens, 32 / layers
    lines = [f"`compress_scale.py --preset {r['preset']}` ({layers} blocks), {tokens} calibration tokens, {r['dtype']} "
             f"on {r['device']}: total {r['total_s']} s, "
             f"peak {r['peak_gib']} GiB allocated (model {r['model_gib']} GiB), achieved ratio "
             f"{r['achieved_ratio']:.3f}. Extrapolation to 32 blocks x 256 x 2048 tokens: the calibration pass "
             f"scales with tokens x blocks, the other stages with blocks.", "",
             "| stage | s measured | ms per 1k calibration tokens | s at 32 blocks, 256 x 2048 (extrapolated) |",
             "|---|---|---|---|"]
    total = 0.0
    for stage, s in r["timings"].items():
        per_token = stage == "calibration_pass"
        at_scale = s * scale_layers * (scale_tokens if per_token else 1)
        total += at_scale
        lines.append(f"| {stage} | {s} | {1e6 * s / tokens:.2f} | {at_scale:.0f} |")
    return lines + [f"| total | {r['total_s']} | {1e6 * r['total_s'] / tokens:.2f} | {total:.0f} |"]


SECTIONS = {
    "check": ("Correctness against float64 (odd shapes, M in every config bucket)",
              lambda p: _table(_rows(p), ["op", "cases", "result"])),
    "kernels": ("Kernels at LLaMA-7B shapes (CUDA-graph medians, weights rotated beyond L2)", section_kernels),
    "int4": (f"int4 decode, M = 1: shipped 128-row GEMV (us_new) vs {INT4_OLD} (us_old); new_vs_old = us_old / us_new",
             lambda p: _table(_rows(p), ["what", "shape", "M", "k", "dense_us", "us_new", "us_old", "speedup",
                                         "new_vs_old", "err", "check"])),
    "scores": ("Scoring against the torch two-matmul path (vs_off: speed-up over fp32 with TF32 off)",
               lambda p: _table(_rows(p), ["shape", "k", "variant", "us", "tflops", "vs_off", "mib", "err"])),
    "compress": ("Compression of LLaMA-7B-shaped blocks, reduced calibration set", section_compress),
    "serve": ("Decode and prefill, LLaMA-7B-shaped blocks, dense vs remap (rho 0.6) vs HQ (storage 0.4)",
              lambda p: _table(_rows(p), ["model", "batch", "prompt_len", "new_tokens", "prefill_tokens_per_s",
                                          "decode_tokens_per_s", "peak_memory_gib", "weights_gib"])),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="interpreter-sized shapes (the CPU test)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--budget", type=float, default=1.0, help="multiply every part's budget by this")
    parser.add_argument("--serve-layers", type=int, default=4)
    parser.add_argument("--compress-layers", type=int, default=4)
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.part:
        layers = {"serve": args.serve_layers, "compress": args.compress_layers}
        fn = PARTS[args.part]
        fn(args.tiny, layers[args.part]) if args.part in layers else fn(args.tiny)
        return 0

    gpu = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir = Path(os.environ.get("OUT", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base = str(out_dir / f"quick-{gpu.split(' (')[0].replace(' ', '_')}-{stamp}")
    import triton
    head = [f"## {gpu}, {stamp}: bench/gpu_quick.py{' --tiny' if args.tiny else ''}", "",
            f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}; "
            f"command `bash bench/gpu_session.sh quick`. Parts and their budgets (s): "
            + ", ".join(f"{p} {BUDGETS[p] * args.budget:.0f}" for p in args.parts.split(","))]
    deadline = time.perf_counter() + TOTAL_BUDGET * args.budget
    sections, names = [], args.parts.split(",")
    with open(base + ".log", "w") as log:
        for i, name in enumerate(names):
            # a part may use its budget plus whatever the parts before it left unused
            budget = BUDGETS[name] * args.budget
            allowed = deadline - time.perf_counter() - sum(BUDGETS[n] * args.budget for n in names[i + 1:])
            title, render = SECTIONS[name]
            if allowed < budget:
                status, body = f"SKIPPED: only {allowed:.0f} s left for it, its budget is {budget:.0f} s", []
            else:  # the tiny mode (the CPU test) keeps each part to its own budget: a hang fails sooner
                status, payloads = run_part(name, args, budget if args.tiny else allowed, log)
                body = render(payloads)
            sections += ["", f"### {title}", "", f"Status: {status}", ""] + body
            print(f"{name}: {status}", flush=True)
            Path(base + ".md").write_text("\n".join(head + sections) + "\n")  # kept current if stopped
    text = "\n".join(head + sections) + "\n"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
