"""End-to-end compression time and peak memory on a LLaMA-7B-shaped model, with the FLOP floor (issue 6).

Random weights in the real shapes and random calibration tokens (256 x 2048 by default): the
speed of every stage is the same as with a real checkpoint.

    python bench/compress_scale.py --device cuda                                # model resident on the GPU
    python bench/compress_scale.py --device cuda --pass-order block               # one block's statistics on the GPU
    python bench/compress_scale.py --device cuda --offload cpu --memory-cap-gib 8  # GPU capped below the model
    python bench/compress_scale.py --preset tiny --device cpu --samples 4 --seq-len 64   # smoke run anywhere

Prints one JSON line: the report's stage timings, peak device memory, the model's bytes, and the
FLOP count of each stage with the seconds it would take at the given peak rates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512),
}


def flop_floor(cfg: dict, samples: int, seq_len: int) -> dict[str, float]:
    """FLOPs of each stage of the pipeline for a LLaMA-shaped model (matrix products only)."""
    h, f, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    tokens = samples * seq_len
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]  # (out, in) per block
    linear = layers * sum(m * n for m, n in shapes) + vocab * h
    attention = layers * 2 * tokens * seq_len * h  # QK^T and PV, causal half of 2 x 2 x T x L x h
    forward = 2 * tokens * linear + attention
    group_widths = [h, h, h, f]  # q/k/v, o, gate/up, down inputs
    covariances = layers * sum(2 * tokens * n * n for n in group_widths)
    # per matrix: A = W S (m n^2), Gram of the smaller side, its eigh (~9 r^3), the other side's vectors
    decomposition = layers * sum(2 * m * n * n + 2 * m * n * min(m, n) + 9 * min(m, n) ** 3 + 2 * m * n * min(m, n)
                                 for m, n in shapes)
    return {"forward": forward, "backward": 2 * forward, "covariances": covariances, "decomposition": decomposition}


def build_model(preset: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[preset], tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval(), PRESETS[preset]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--offload", default=None, help="cpu or a folder: stream the blocks (model kept off the GPU)")
    p.add_argument("--statistics-device", default=None, help="cpu: covariances and gradients in CPU memory")
    p.add_argument("--pass-order", default="auto", choices=("auto", "batch", "block"),
                   help="block: one decoder block's statistics on the GPU at a time; auto: block if batch won't fit")
    p.add_argument("--memory-cap-gib", type=float, default=None, help="cap this process's GPU memory")
    p.add_argument("--matmul-tflops", type=float, default=989.0, help="peak 16-bit rate for the floor (H100 SXM)")
    p.add_argument("--tf32-tflops", type=float, default=494.0,
                   help="peak TF32 rate for the floor (H100 SXM): covariances of 16-bit activations")
    p.add_argument("--fp64-tflops", type=float, default=67.0, help="peak float64 rate for the floor (H100 SXM)")
    args = p.parse_args(argv)

    import zssvd
    from zssvd.config import AnalysisOptions, CompressionConfig
    from zssvd.stages.calibration import CalibrationSet

    cuda = torch.device(args.device).type == "cuda"
    if cuda and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    dtype = getattr(torch, args.dtype)
    model, cfg = build_model(args.preset, dtype, "cpu" if args.offload else args.device)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = torch.randint(0, cfg["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    options = AnalysisOptions(micro_batch=args.micro_batch, checkpointing=not args.no_checkpointing,
                              offload=args.offload, device=args.device if args.offload else None,
                              statistics_device=args.statistics_device, pass_order=args.pass_order)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, report = zssvd.compress(model, CalibrationSet(ids, "random"), CompressionConfig(ratio=args.ratio),
                               options=options)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = flop_floor(cfg, args.samples, args.seq_len)
    rate = {"forward": args.matmul_tflops, "backward": args.matmul_tflops, "covariances": args.tf32_tflops,
            "decomposition": args.fp64_tflops}
    floor_s = {k: v / (rate[k] * 1e12) for k, v in flops.items()}
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "preset": args.preset, "dtype": args.dtype,
        "tokens": args.samples * args.seq_len, "offload": args.offload, "pass_order": report["pass_order"],
        "statistics_device": args.statistics_device, "memory_cap_gib": args.memory_cap_gib,
        "total_s": round(seconds, 2), "timings": {k: round(v, 2) for k, v in report["timings"].items()},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "model_gib": round(model_bytes / 2**30, 2), "achieved_ratio": report["achieved_ratio"],
        "flops": {k: f"{v:.3g}" for k, v in flops.items()}, "floor_s": {k: round(v, 2) for k, v in floor_s.items()},
        "floor_total_s": round(sum(floor_s.values()), 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
