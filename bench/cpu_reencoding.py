"""What the CPU paths' int8 re-encodings cost in perplexity: each checkpoint evaluated twice in one
16-bit dtype, through the fast CPU paths (``backend="auto"``: remap's factors and fp8 weights
re-encoded to int8 rows, zskernels/README.md) and through the plain torch reference
(``backend="torch"``: the stored values exactly), on the same windows.

    python bench/cpu_reencoding.py CKPT [CKPT ...] --text-file ../shared/data/wikitext-2/test.txt \
        --windows 8 --seq-len 512 [--dtype bfloat16] [--json OUT.jsonl]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from transformers import AutoTokenizer

import zssvd
from zssvd.evaluation.evaluate import perplexity
from zssvd.nn.packed_linear import _PackedBase
from zssvd.stages.calibration import bos_token_id, read_texts, tokenize_stream


def with_backend(model: torch.nn.Module, backend: str) -> int:
    """Route every packed module of ``model`` through ``backend``; returns how many there are."""
    packed = [m for m in model.modules() if isinstance(m, _PackedBase)]
    for module in packed:
        module.forward = functools.partial(type(module).forward, module, backend=backend)
    return len(packed)


def measure(checkpoint: str, ids: torch.Tensor, *, windows: int, seq_len: int, dtype: torch.dtype,
            bos_id: int | None) -> list[dict]:
    rows = []
    for backend in ("auto", "torch"):
        model = zssvd.load(checkpoint, dtype=dtype).eval()
        layers = with_backend(model, backend)
        start = time.perf_counter()
        with torch.no_grad():
            result = perplexity(model, ids, seq_len, max_windows=windows, bos_id=bos_id)
        rows.append({"checkpoint": checkpoint, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
                     "packed_layers": layers, "perplexity": result["perplexity"], "windows": result["windows"],
                     "seq_len": seq_len, "seconds": time.perf_counter() - start})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--text-file", required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", help="append one JSON row per measurement to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoints[0])  # a checkpoint carries its tokenizer
    ids = tokenize_stream(tokenizer, read_texts([args.text_file]))
    for checkpoint in args.checkpoints:
        rows = measure(checkpoint, ids, windows=args.windows, seq_len=args.seq_len, dtype=dtype,
                       bos_id=bos_token_id(tokenizer))
        for row in rows:
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        auto, exact = (r["perplexity"] for r in rows)
        print(f"{checkpoint}: CPU path {auto:.3f}, stored values {exact:.3f} ({(auto / exact - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
