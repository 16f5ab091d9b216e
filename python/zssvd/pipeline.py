"""The whole method, stage by stage, as the paper reads:

    calibrate -> whiten -> decompose -> score -> select -> correct -> pack

``analyze`` runs the stages that do not depend on the target ratio (one forward/backward
pass for covariances and gradients, whitening, whitened SVD, scores) and caches them on
disk; ``compress`` selects, corrects and packs for one ratio, storage and strategy, reusing
an analysis when given one.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import __version__
from .blockwise import available_host_bytes, least_host_peak_bytes, statistics_bytes_by_block
from .cache import StageCache, cache_key
from .calibration import CalibrationSet
from .correction import CorrectionResult, correct
from .covariance import CovarianceCollector
from .curvature import curvature_terms
from .decompose import Factors
from .distributed import decompose_sharded, everywhere, is_main
from .gradients import calibration_pass, model_device, statistics_on_host
from .models import TargetSet, assign_input_groups, find_targets, model_fingerprint
from .packing import pack_model
from .progress import progress
from .scores import component_scores
from .selection import MatrixSpec, Selection, check_ratio, select
from .whitening import whitening_factor

log = logging.getLogger(__name__)


@dataclass
class AnalysisOptions:
    """Settings of the ratio-independent stages (part of the cache key where they matter)."""

    micro_batch: int = 4
    checkpointing: bool = False
    decompose_method: str = "gram"
    base_jitter: float = 1e-6
    score_backend: str = "auto"
    blocks_path: str | None = None
    offload: str | None = None  # "cpu" or a folder: stream the decoder blocks to ``device`` one at a time
    device: str | None = None  # execution device (default: where the model's weights are)
    statistics_device: str | None = None  # where covariances and gradients accumulate (default: cpu when
    # offloading or in block order, else the execution device); "cpu" keeps ~(4 + 8 n/m) bytes per weight off the GPU
    pass_order: str = "auto"  # "batch", "block" (one block's statistics on the device at a time, zssvd.blockwise)
    # or "auto": batch unless its statistics would not fit in the device's free memory
    cache_dir: str | None = None
    source: str = ""  # model id, for the cache key

    def compute_device(self, model: nn.Module) -> torch.device:
        """Where the passes, whitening, decompositions and scores run: ``device``, else the weights' device."""
        return torch.device(self.device) if self.device else model_device(model)

    def statistics_home(self) -> str | None:
        """Where covariances, gradients and factors are kept (None: beside the weights).

        Host memory for offloaded models, the block order and ``statistics_device="cpu"``; the
        whitening, decompositions and scores still run on the execution device, one matrix at a time.
        Meaningful once ``pass_order`` is resolved (see ``resolved``).
        """
        return self.statistics_device or ("cpu" if statistics_on_host(self.offload, self.pass_order) else None)

    def resolved(self, model: nn.Module, targets: TargetSet, windows: tuple[int, int]) -> "AnalysisOptions":
        """These options with ``pass_order="auto"`` made concrete for ``model`` and ``windows`` (N, L).

        On a GPU, the batch order keeps every target's float32 gradient and float64 covariance on
        the device; when that would take more than 80% of its free memory, the block order is used.
        Offloaded models take the block order when its hidden states fit in host memory: it loads
        each block three times per pass instead of twice per micro-batch. On the CPU, and with an
        explicit statistics device, the batch order stays.
        """
        if self.pass_order != "auto":
            return self
        order = "batch"
        free = free_device_memory(self.compute_device(model))
        if free is not None and not self.statistics_device:
            if self.offload:
                width = targets.targets[0].shape[1]  # the blocks' hidden size
                element = next(p for p in model.parameters() if p.is_floating_point()).element_size()
                boundary = windows[0] * windows[1] * width * element
                if least_host_peak_bytes(targets, boundary) <= 0.8 * available_host_bytes():
                    order = "block"
            elif sum(map(sum, statistics_bytes_by_block(targets))) > 0.8 * free:
                order = "block"
            if order == "block":
                log.info("calibrating in block order (one block's statistics on the GPU at a time)")
        return replace(self, pass_order=order)

    def pass_settings(self) -> dict:
        """How every gradient pass over the calibration set runs (``gradients.calibration_pass`` keywords)."""
        return dict(micro_batch=self.micro_batch, checkpointing=self.checkpointing, offload=self.offload,
                    device=self.device, order=self.pass_order)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator; None for the CPU (whose statistics share host memory anyway)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


@dataclass
class Analysis:
    """Everything the selection needs, computed once per model and calibration set."""

    targets: TargetSet
    specs: list[MatrixSpec]
    whitening: dict[str, torch.Tensor]  # input group -> S (lower triangular)
    jitter: dict[str, float]  # input group -> relative diagonal shift used
    factors: dict[str, Factors]  # target -> full whitened SVD
    scores: dict[str, torch.Tensor]  # target -> dL per component
    loss: float  # calibration loss of the uncompressed model
    calibration: CalibrationSet
    options: AnalysisOptions
    timings: dict[str, float] = field(default_factory=dict)
    key: str = ""  # cache key of the factors (empty without a cache)
    curvature: dict[str, torch.Tensor] | None = None  # second-order terms, computed when first needed


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def analyze(model: nn.Module, calib: CalibrationSet, options: AnalysisOptions | None = None) -> Analysis:
    """Calibrate, whiten, decompose and score every target of ``model``.

    Under ``torch.distributed`` (e.g. ``torchrun``) every rank must call this with the same model
    and calibration set: the calibration pass and the whitening run on every rank, the whitened
    SVDs are shared out across the ranks (``zssvd.distributed``), and every rank returns the
    whole analysis. Only rank 0 writes cache entries.
    """
    options = options or AnalysisOptions()
    timings: dict[str, float] = {}
    _check_weights(model)
    targets = find_targets(model, options.blocks_path)
    assign_input_groups(model, targets, calib.input_ids[:1, : min(16, calib.seq_len)].to(model_device(model)))
    options = options.resolved(model, targets, tuple(calib.input_ids.shape))
    compute_device = options.compute_device(model)
    cache = StageCache(options.cache_dir)
    key = cache_key(model_fingerprint(model, options.source), calib.fingerprint(), __version__) if cache.enabled else ""

    with _timed(timings, "calibration_pass"):
        stats = _calibration_statistics(model, targets, calib, options, cache, key)
    factor_key = cache_key(key, options.decompose_method, options.base_jitter)
    cached = cache.load("factors", factor_key)
    if not everywhere(cached is not None):  # the ranks decompose together, or none does
        cached = None
    if cached is not None:
        whitening, factors, jitter = _unpack_factors(cached, targets)
    else:
        whitening, jitter = {}, {}
        with _timed(timings, "whitening"):
            for group in progress(targets.groups, desc="whitening", unit="group"):
                cov = stats["covariances"].pop(group)  # freed as soon as it is factored
                w = whitening_factor(cov.to(compute_device), group, base_jitter=options.base_jitter)
                whitening[group], jitter[group] = w.factor.to(cov.device), w.relative_jitter
        with _timed(timings, "decomposition"):
            factors = decompose_sharded({t.name: t.module.weight.detach() for t in targets},
                                        {t.name: whitening[t.group] for t in targets},
                                        method=options.decompose_method, device=compute_device,
                                        out_device=options.statistics_home())
            whitening = {g: s.float() for g, s in whitening.items()}
        if is_main():
            cache.store("factors", factor_key, _pack_factors(whitening, factors), {"jitter": jitter})
    escalated = {g: j for g, j in jitter.items() if j > options.base_jitter}
    if escalated:
        log.info("whitening needed a larger diagonal shift for %d groups (max %.1e x trace/n)",
                 len(escalated), max(escalated.values()))
    with _timed(timings, "scores"):
        scores = {t.name: component_scores(factors[t.name], stats["grads"].pop(t.name), backend=options.score_backend,
                                           device=compute_device)
                  for t in targets}
    specs = [MatrixSpec(t.name, *t.shape) for t in targets]
    return Analysis(targets=targets, specs=specs, whitening=whitening, jitter=jitter, factors=factors,
                    scores=scores, loss=stats["loss"], calibration=calib, options=options, timings=timings,
                    key=factor_key if cache.enabled else "")


def add_curvature(model: nn.Module, analysis: Analysis) -> dict[str, torch.Tensor]:
    """The second-order terms of ``zero-sum-2nd`` (one more gradient pass; cached with the factors)."""
    if analysis.curvature is None:
        cache = StageCache(analysis.options.cache_dir if analysis.key else None)
        cached = cache.load("curvature", analysis.key)
        if cached is not None:
            analysis.curvature = cached[0]["curvature"]
        else:
            with _timed(analysis.timings, "curvature"):
                analysis.curvature = curvature_terms(model, analysis.targets.rebind(model),
                                                     analysis.calibration.input_ids, analysis.factors,
                                                     **analysis.options.pass_settings())
            if is_main():
                cache.store("curvature", analysis.key, {"curvature": analysis.curvature}, {})
    return analysis.curvature


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the model's weight {name} contains NaN/Inf: the checkpoint is corrupt or was "
                             "loaded in a dtype that overflows; fix the weights before compressing")


def _calibration_statistics(model, targets, calib, options, cache, key) -> dict:
    cached = cache.load("stats", key)
    if cached is not None:
        files, meta = cached
        return {"covariances": files["covariances"], "grads": files["grads"], "loss": meta["loss"]}
    # Offloaded models keep their statistics in CPU memory, like their weights; so does the block order.
    stats_device = options.statistics_home()
    collector = CovarianceCollector(targets, device=stats_device)
    result = calibration_pass(model, targets, calib.input_ids, covariances=collector, grad_device=stats_device,
                              desc="calibration pass (covariances + gradients)", **options.pass_settings())
    stats = {"covariances": collector.covariances(), "grads": result.grads, "loss": result.loss}
    if is_main():
        cache.store("stats", key, {"covariances": stats["covariances"], "grads": stats["grads"]},
                    {"loss": result.loss, "tokens": result.tokens})
    return stats


def _pack_factors(whitening, factors) -> dict[str, dict[str, torch.Tensor]]:
    tensors = {f"S::{g}": s for g, s in whitening.items()}
    for name, f in factors.items():
        tensors.update({f"U::{name}": f.U, f"sigma::{name}": f.sigma, f"Z::{name}": f.Z})
    return {"factors": tensors}


def _unpack_factors(cached, targets: TargetSet):
    files, meta = cached
    tensors = files["factors"]
    whitening = {g: tensors[f"S::{g}"] for g in targets.groups}
    factors = {t.name: Factors(tensors[f"U::{t.name}"], tensors[f"sigma::{t.name}"], tensors[f"Z::{t.name}"])
               for t in targets}
    return whitening, factors, meta["jitter"]


def rescore(model: nn.Module, analysis: Analysis, calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """Scores of the analysis's components under another calibration set's gradient.

    The whitened factors stay those of the analysis, so component i of every matrix is the same
    direction in both score sets and their signs can be compared (see ``scores.sign_flips``).
    """
    targets = analysis.targets.rebind(model)
    grads = calibration_pass(model, targets, calib.input_ids, desc="gradient pass (rescoring)",
                             **analysis.options.pass_settings()).grads
    device = analysis.options.compute_device(model)
    return {t.name: component_scores(analysis.factors[t.name], grads[t.name], backend=analysis.options.score_backend,
                                     device=device)
            for t in targets}


def truncate(analysis: Analysis, selection: Selection) -> dict[str, Factors]:
    """The kept components of every factorised matrix."""
    return {name: Factors(f.U[:, keep], f.sigma[keep], f.Z[:, keep])
            for name, f in analysis.factors.items()
            if not selection.dense[name] for keep in [selection.keep[name]]}


def compress(model: nn.Module, calib: CalibrationSet, ratio: float = 0.8, storage: str = "dense",
             strategy: str = "zero-sum", corrections: int = 0, *, ordered: bool = True, min_rank: int = 1,
             analysis: Analysis | None = None, options: AnalysisOptions | None = None):
    """Compress ``model`` in place to ``ratio`` of its targets' storage; returns ``(model, report)``.

    ``analysis`` (from ``analyze`` on the same model and calibration set) skips the
    ratio-independent stages, e.g. when sweeping ratios or strategies.
    """
    if corrections < 0:
        raise ValueError(f"corrections must be >= 0, got {corrections}")
    if analysis is None:
        targets = find_targets(model, (options or AnalysisOptions()).blocks_path)
        check_ratio([MatrixSpec(t.name, *t.shape) for t in targets], ratio, storage, min_rank)  # fail fast
        analysis = analyze(model, calib, options)
    targets = analysis.targets.rebind(model)  # ``model`` may be a copy of the analysed one
    curvature = add_curvature(model, analysis) if strategy == "zero-sum-2nd" else None
    timings = dict(analysis.timings)
    with _timed(timings, "selection"):
        sigmas = {name: f.sigma for name, f in analysis.factors.items()}
        selection = select(analysis.specs, analysis.scores, sigmas, ratio=ratio, storage=storage,
                           strategy=strategy, ordered=ordered, min_rank=min_rank, curvature=curvature)
    truncated = truncate(analysis, selection)
    correction = None
    if corrections:
        with _timed(timings, "correction"):
            correction = correct(model, targets, calib.input_ids, truncated, analysis.whitening, corrections,
                                 decompose_method=analysis.options.decompose_method,
                                 **analysis.options.pass_settings())
            truncated = correction.factors
    with _timed(timings, "packing"):
        manifest = pack_model(model, targets, truncated, selection)
    report = build_report(model, analysis, selection, manifest, timings, corrections, correction)
    model.zssvd_manifest = manifest
    return model, report


def sampled_steps(n: int, points: int = 2000) -> list[int]:
    """At most about ``points`` evenly spaced indices of a length-n trace, always ending with the last."""
    if n == 0:
        return []
    stride = -(-n // points)
    return list(range(0, n - 1, stride)) + [n - 1]


def score_summary(analysis: Analysis, bins: int = 61) -> dict:
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


def build_report(model, analysis: Analysis, selection: Selection, manifest: dict, timings: dict,
                 corrections: int, correction: CorrectionResult | None) -> dict:
    specs = {s.name: s for s in analysis.specs}
    removed_dl = sum(float(analysis.scores[name][j]) for name, j in selection.removed
                     if not selection.dense[name])
    target_bytes_16bit = 2 * sum(s.params for s in analysis.specs)
    dtype = next(model.parameters()).dtype
    element = torch.finfo(dtype).bits // 8
    target_bytes_now = sum(manifest[name]["nbytes"] if name in manifest else specs[name].params * element
                           for name in specs)
    steps = sampled_steps(len(selection.running_sum))
    return {
        "zssvd_version": __version__,
        "target_ratio": selection.target_ratio,
        "achieved_ratio": selection.achieved_ratio,
        "achieved_bytes_ratio": target_bytes_now / target_bytes_16bit,
        "storage": selection.storage,
        "strategy": selection.strategy,
        "ordered": selection.ordered,
        "corrections": corrections,
        "pass_order": analysis.options.pass_order,
        "ranks": selection.ranks,
        "full_ranks": {name: s.rank for name, s in specs.items()},
        "kept_dense": sorted(name for name, d in selection.dense.items() if d),
        "calibration": {"source": analysis.calibration.source, "samples": analysis.calibration.num_samples,
                        "seq_len": analysis.calibration.seq_len, "loss": analysis.loss},
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
        "target_bytes_packed": target_bytes_now,
        "model_bytes": model_nbytes(model),
        "whitening_max_relative_jitter": max(analysis.jitter.values()),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "torch_version": torch.__version__,
    }
