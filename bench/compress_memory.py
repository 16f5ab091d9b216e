"""Compression memory by component: measured on SmolLM2-135M, extrapolated to LLaMA-7B shapes.

The calibration pass holds, besides the model, three things whose sizes follow from the shapes:
* gradient sinks: one float32 accumulator per target weight (4 bytes a weight);
* covariances: one float64 matrix per input group (8 n^2 bytes for inputs of width n);
* one step's activations, saved by autograd for the backward, and its logits with their gradient.

The activations are measured here, not guessed: one forward of one window runs under
``torch.autograd.graph.saved_tensors_hooks`` with the pipeline's gradient sinks and recomputed
gated products, and every saved storage that is not a parameter is counted once, classified by its
shape (hidden-wide, MLP-wide, per-head query or key/value tensors). Those counts per token and block, times another
model's widths, give its activations; the rest is arithmetic. ``--report`` adds the measured
per-stage peaks of a ``zssvd compress`` run's report.json.

    python bench/compress_memory.py [--report OUT/report.json] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

LLAMA_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, params=6.738e9)


def saved_activation_counts(model, targets, ids: torch.Tensor) -> dict[str, float]:
    """Saved elements per token and block of one forward, by shape class (see the module docstring)."""
    from zssvd.stages.gradients import recomputed_gated_products, weight_gradient_sinks

    cfg = model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (s.nbytes() // t.element_size(), tuple(t.shape))
        return t

    sinks = {t.name: torch.zeros(t.shape) for t in targets}
    # as the pipeline runs it: gated MLPs keep gate and up only (recomputed_gated_products, entered first)
    with recomputed_gated_products(model), weight_gradient_sinks(model, targets, sinks), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, use_cache=False).logits
    elements = defaultdict(float)
    for numel, shape in seen.values():
        if shape and shape[-1] == logits.shape[-1]:
            kind = "vocab"  # the head's outputs: counted apart, as logits
        elif shape and shape[-1] == i:
            kind = "intermediate"
        elif len(shape) == 4 and shape[1] == heads:
            kind = "query_heads"
        elif len(shape) == 4 and shape[1] == kv_heads:
            kind = "kv_heads"
        elif shape and shape[-1] == h:
            kind = "hidden"
        else:
            kind = "other"
        elements[kind] += numel
    tokens = ids.numel()
    widths = {"intermediate": i, "hidden": h, "query_heads": h, "kv_heads": h * kv_heads // heads, "other": h}
    # per token and block, in units of each class's width: e.g. intermediate 4.0 = four i-wide tensors
    counts = {k: elements[k] / (tokens * layers * widths[k]) for k in widths}
    counts["bytes_per_token_per_block"] = sum(elements[k] for k in widths) * logits.element_size() / (tokens * layers)
    return counts


def activation_bytes(counts: dict, shape: dict, element: int) -> float:
    """One block's saved bytes per token for a model of ``shape`` from the measured counts."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h * shape["kv_heads"] // shape["heads"]
    return element * (counts["intermediate"] * i + counts["hidden"] * h + counts["query_heads"] * h
                      + counts["kv_heads"] * kv + counts["other"] * h)


def statistics_bytes(shape: dict) -> tuple[float, float]:
    """(float32 gradient sinks, float64 covariances) of one LLaMA block: 7 matrices, 4 input groups."""
    h, i = shape["hidden"], shape["intermediate"]
    weights = 4 * h * h + 3 * h * i
    return 4.0 * weights, 8.0 * (3 * h * h + i * i)


def head_bytes(tokens: int, vocab: int, element: int) -> float:
    """Logits and their gradient (the chunked loss keeps no other full-size copy) plus 32 MiB chunk temporaries."""
    return 2 * tokens * vocab * element + 3 * 2 ** 25


def gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f}"


def llama7b_table(counts: dict, micro_batch: int, seq_len: int) -> list[str]:
    s = LLAMA_7B
    model = s["params"] * 2  # bf16
    grads, covs = statistics_bytes(s)
    tokens = micro_batch * seq_len
    block_act = activation_bytes(counts, s, 2) * tokens
    head = head_bytes(tokens, s["vocab"], 2)
    boundary = tokens * s["hidden"] * 2
    target = 1.5 * model
    rows = [
        ("block order (GPU default for 7B): model + one block's statistics + one block's activations",
         model + grads + covs + max(block_act + 3 * boundary, head + boundary)),
        ("batch order, checkpointing, statistics on the host: model + boundaries + one block recomputed",
         model + s["layers"] * boundary + max(block_act, head)),
        ("batch order, no checkpointing, statistics on the GPU",
         model + s["layers"] * (grads + covs + block_act) + head),
    ]
    lines = [f"LLaMA-7B shapes, bf16 ({gib(model)} GiB), micro-batch {micro_batch} x {seq_len}; "
             f"target 1.5x the bf16 model = {gib(target)} GiB",
             "", "| pass | predicted GPU peak (GiB) | x bf16 model | meets 1.5x |", "|---|---|---|---|"]
    for what, peak in rows:
        lines.append(f"| {what} | {gib(peak)} | {peak / model:.2f} | {'yes' if peak <= target else 'no'} |")
    lines += ["", f"components (GiB): one block's float32 gradient sinks {gib(grads)}, float64 covariances {gib(covs)}, "
              f"activations of one block for one micro-batch {gib(block_act)}, logits + gradient {gib(head)}, "
              f"one boundary of hidden states {gib(boundary)}"]
    return lines


def smollm2_table(model, targets, counts: dict, seq_len: int, step_windows: int, report: dict | None) -> list[str]:
    cfg = model.config
    shape = dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
                 kv_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(4 * t.shape[0] * t.shape[1] for t in targets)
    covs = sum(8 * t.shape[1] ** 2 for t in targets if t.group == t.name)
    tokens = step_windows * seq_len
    act = activation_bytes(counts, shape, 4) * tokens * cfg.num_hidden_layers
    head = head_bytes(tokens, cfg.vocab_size, 4)
    lines = [f"SmolLM2-135M, float32, one step = {step_windows} x {seq_len} tokens",
             "", "| component | GiB |", "|---|---|",
             f"| model (float32) | {gib(weights)} |", f"| gradient sinks (float32) | {gib(grads)} |",
             f"| covariances (float64) | {gib(covs)} |", f"| activations of a step (measured per token) | {gib(act)} |",
             f"| logits + gradient of a step | {gib(head)} |",
             f"| sum (the calibration pass's live peak) | {gib(weights + grads + covs + act + head)} |"]
    if report and report.get("memory"):
        memory = report["memory"]
        lines += ["", f"measured (report.json): process peak {gib(memory['peak_bytes'])} GiB resident",
                  "", "| stage | start GiB | peak GiB | end GiB | exact | cached |", "|---|---|---|---|---|---|"]
        for name, s in memory["by_stage"].items():
            lines.append(f"| {name} | {gib(s['start_bytes'])} | {gib(s['peak_bytes'])} | {gib(s['end_bytes'])} | "
                         f"{s['exact']} | {s['cached']} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--report", default=None, help="a compress run's report.json: its measured stage peaks")
    p.add_argument("--micro-batch", type=int, default=1, help="windows per step of the SmolLM2 run")
    p.add_argument("--micro-batch-7b", type=int, default=4)
    p.add_argument("--seq-len-7b", type=int, default=2048)
    args = p.parse_args(argv)

    from zssvd.io.models import assign_input_groups, find_targets, load_model

    loaded = load_model(args.model)
    model = (loaded[0] if isinstance(loaded, tuple) else loaded).float().eval()
    targets = find_targets(model, None)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    assign_input_groups(model, targets, ids[:, :16])  # the covariances are one per input group
    counts = saved_activation_counts(model, targets, ids)
    report = json.load(open(args.report)) if args.report else None
    step = args.micro_batch
    lines = ["saved activations per token and block, in tensors of each width: "
             + ", ".join(f"{k} {v:.2f}" for k, v in counts.items() if k != "bytes_per_token_per_block")
             + f" ({counts['bytes_per_token_per_block'] / 1024:.1f} KiB per token and block in float32)", ""]
    lines += smollm2_table(model, targets, counts, args.seq_len, step, report) + [""]
    lines += llama7b_table(counts, args.micro_batch_7b, args.seq_len_7b)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
