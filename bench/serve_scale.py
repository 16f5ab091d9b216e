"""Decode and prefill throughput of a LLaMA-7B-shaped model: dense vs remap vs HQ packed layers (issue 4).

Random weights in the real shapes (speed does not depend on the values): every target linear is
replaced by a ``PackedLowRankLinear`` at the rank the storage setting gives, then each variant is
timed with ``zssvd.evaluation.serve.measure`` (generate with a static KV cache and CUDA graphs under
``--static``), next to the dense model in the same run.

    python bench/serve_scale.py --device cuda --static             # H100: the issue-4 targets
    python bench/serve_scale.py --preset tiny --device cpu --batch 1 --new-tokens 4   # smoke run

Variants: ``remap`` keeps k = rho * min(m, n) components (rho = --remap-rho, default 0.6);
``hq`` keeps k = 0.8 mn / (m + n) components in fp8, i.e. storage 0.4 of the dense 16-bit matrix.
Prints a markdown table (tokens/s, peak memory, weights + KV cache, allocated memory against the packed
bytes) and one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_scale import PRESETS, build_model  # noqa: E402


def pack_targets(model, storage: str, rank_of) -> None:
    """Replace every decoder-block linear by random factors of rank ``rank_of(m, n)`` in ``storage``."""
    from zssvd.io.models import find_targets
    from zssvd.nn import PackedLowRankLinear

    g = torch.Generator().manual_seed(0)
    for t in find_targets(model):
        m, n = t.shape
        k = rank_of(m, n)
        U = torch.randn(m, k, generator=g) / k**0.5
        V = torch.randn(n, k, generator=g) / n**0.5
        model.set_submodule(t.name, PackedLowRankLinear.from_factors(U, V, storage=storage).to(t.module.weight.device))


def kv_cache_bytes(cfg: dict, batch: int, tokens: int, element_size: int) -> int:
    kv = cfg["hidden_size"] * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * batch * tokens * kv * element_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--remap-rho", type=float, default=0.6)
    p.add_argument("--variants", default="dense,remap,hq")
    p.add_argument("--static", action="store_true", help="static KV cache + CUDA graphs (torch.compile)")
    args = p.parse_args(argv)

    from zssvd.report import model_nbytes
    from zssvd.evaluation.serve import measure, rows_to_markdown

    dtype = getattr(torch, args.dtype)
    ranks = {"dense": None,
             "remap": lambda m, n: max(1, int(args.remap_rho * min(m, n))),
             "hq": lambda m, n: max(1, int(0.8 * m * n / (m + n)))}
    storages = {"remap": "remap", "hq": "fp8"}
    rows = []
    cuda = torch.device(args.device).type == "cuda"
    for variant in args.variants.split(","):
        base = torch.cuda.memory_allocated() if cuda else 0
        model, cfg = build_model(args.preset, dtype, args.device)
        if variant != "dense":
            pack_targets(model, storages[variant], ranks[variant])
        weights = model_nbytes(model)
        # the allocator's live bytes against the bytes the packed tensors claim (issue 4: within 2%)
        allocated = torch.cuda.memory_allocated() - base if cuda else None
        for batch in map(int, args.batch.split(",")):
            row = {"model": variant, **measure(model, batch, args.prompt_len, args.new_tokens,
                                               repeats=args.repeats, static=args.static)}
            kv = kv_cache_bytes(cfg, batch, args.prompt_len + args.new_tokens, torch.finfo(dtype).bits // 8)
            row["weights_plus_kv_gib"] = (weights + kv) / 2**30
            row["weights_gib"] = weights / 2**30
            row["allocated_vs_weights"] = allocated / weights - 1 if cuda else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    print(rows_to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
