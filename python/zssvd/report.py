"""``report.json``: what a compression did, and the byte counts behind its ratios."""
from __future__ import annotations

import torch
from torch import nn

from ._version import __version__
from .config import CompressionConfig
from .io.checkpoint import retyped_module, storage_dtype
from .nn import describe_packed, packed_modules
from .runtime.memory import component_bytes
from .stages.correction import CorrectionResult
from .stages.selection import Selection


def sampled_steps(n: int, points: int = 2000) -> list[int]:
    """At most about ``points`` evenly spaced indices of a length-n trace, always ending with the last."""
    if n == 0:
        return []
    stride = -(-n // points)
    return list(range(0, n - 1, stride)) + [n - 1]


def score_summary(analysis, bins: int = 61) -> dict:
    """Distribution of dL over all components, by module kind (the last name part), on a symmetric
    log scale: ``edges`` are shared, ``counts[kind]`` has one entry per bin."""
    by_kind: dict[str, list[torch.Tensor]] = {}
    for name, scores in analysis.scores.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(scores.double())
    values = {kind: torch.cat(v) for kind, v in by_kind.items()}
    everything = torch.cat(list(values.values()))
    top = float(everything.abs().max().clamp_min(1e-30))
    floor = max(top * 1e-12, float(everything.abs()[everything != 0].min()) if (everything != 0).any() else top)
    half = torch.logspace(torch.log10(torch.tensor(floor)), torch.log10(torch.tensor(top)), (bins - 1) // 2,
                          dtype=torch.float64)
    edges = torch.cat([-half.flip(0), torch.zeros(1, dtype=torch.float64), half])
    edges[0], edges[-1] = edges[0] * 1.0001, edges[-1] * 1.0001
    return {"edges": edges.tolist(),
            "counts": {kind: torch.histogram(v, bins=edges).hist.long().tolist() for kind, v in values.items()},
            "positive_fraction": float((everything >= 0).double().mean()), "total": int(everything.numel())}


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting tied (shared) tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def stored_target_bytes(model: nn.Module, specs: dict, dtype: torch.dtype) -> int:
    """Bytes a checkpoint stores for the targets: packed modules re-typed to the 16-bit storage ``dtype``
    (``checkpoint.retyped_module``), targets kept as plain weights at that dtype's size."""
    packed = packed_modules(model)
    return sum(retyped_module(packed[name], dtype).nbytes() if name in packed else spec.params * dtype.itemsize
               for name, spec in specs.items())


def int4_precision(selection: Selection) -> dict:
    """int4: every target's group sizes ({"weight": g} or {"v": g, "u": g}) and, when they were measured
    (``--group-size auto``), the output error each candidate g caused (``stages.precision``)."""
    if selection.storage != "int4":
        return {}
    report = {"int4_group_sizes": {name: selection.int4_group_sizes(name) for name in selection.keep}}
    if selection.precision_errors:
        report["int4_precision_errors"] = {name: {part: {str(g): e for g, e in errors.items()}
                                                  for part, errors in parts.items()}
                                           for name, parts in selection.precision_errors.items()}
    return report


def build_report(model: nn.Module, analysis, config: CompressionConfig, selection: Selection, timings: dict,
                 correction: CorrectionResult | None, memory: dict | None = None) -> dict:
    """``report.json``: what ``compress`` did to ``model`` (already packed) from ``analysis`` under ``config``."""
    manifest = describe_packed(model)
    corrections = config.corrections
    specs = {s.name: s for s in analysis.specs}
    removed_dl = sum(float(analysis.scores[name][j]) for name, j in selection.removed
                     if not selection.dense[name])
    target_bytes_16bit = 2 * sum(s.params for s in analysis.specs)
    dtype = next(model.parameters()).dtype
    element = torch.finfo(dtype).bits // 8
    target_bytes_now = sum(manifest[name]["nbytes"] if name in manifest else specs[name].params * element
                           for name in specs)
    stored = stored_target_bytes(model, specs, storage_dtype(model.config))
    steps = sampled_steps(len(selection.running_sum))
    return {
        "zssvd_version": __version__,
        "config": config.to_dict(),
        "target_ratio": selection.target_ratio,
        "achieved_ratio": selection.achieved_ratio,
        "achieved_bytes_ratio": stored / target_bytes_16bit,  # as the checkpoint stores them (16-bit floats)
        "storage": selection.storage,
        "strategy": selection.strategy,
        "ordered": selection.ordered,
        "corrections": corrections,
        "pass_order": analysis.options.pass_order,
        "shard_model": analysis.sharded is not None,  # the gradient passes ran on an FSDP2-sharded model
        "ranks": selection.ranks,
        "full_ranks": {name: s.rank for name, s in specs.items()},
        "kept_dense": sorted(name for name, d in selection.dense.items() if d),
        **int4_precision(selection),
        "calibration": {"source": analysis.calibration.source, "samples": analysis.calibration.num_samples,
                        "seq_len": analysis.calibration.seq_len, "loss": analysis.loss,
                        "bos": analysis.calibration.bos,  # windows start with the tokenizer's BOS
                        # data parallel calibration (torchrun): the world size and each rank's windows
                        "world_size": len(analysis.windows_per_rank or [0]),
                        "windows_per_rank": analysis.windows_per_rank},
        # at truncation, then each round's result; the factors kept are those of the lowest loss
        "correction_losses": correction.losses if correction else [],
        "correction_step_scales": correction.step_scales if correction else [],
        "correction_loss": correction.loss if correction else None,
        "predicted_dl_removed": removed_dl,
        "selection_steps": [i + 1 for i in steps],  # 1-based removal step of each running-sum point
        "selection_running_sum": [selection.running_sum[i] for i in steps],
        "score_summary": score_summary(analysis),
        "target_params": sum(s.params for s in analysis.specs),
        "target_bytes_16bit": target_bytes_16bit,
        "target_bytes_original": sum(s.params for s in analysis.specs) * element,
        "dtype": str(dtype).replace("torch.", ""),
        "target_bytes_packed": target_bytes_now,  # in memory, in the compute dtype
        "target_bytes_stored": stored,
        "model_bytes": model_nbytes(model),
        "whitening_max_relative_jitter": max(analysis.jitter.values()),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # peak resident (and device) bytes of the process and of each stage (zssvd.runtime.memory)
        "memory": memory if memory is None else {
            **memory, "components": component_bytes(model, analysis, memory["by_stage"])},
        "torch_version": torch.__version__,
    }
