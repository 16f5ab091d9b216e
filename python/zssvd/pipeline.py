"""The whole method, stage by stage, as the paper (and the README) number them:

    1 calibrate -> 2 whiten -> 3 decompose -> 4 score -> 5 select -> 6 correct -> 7 pack

``analyze`` (torchao's *prepare*) runs everything that does not depend on the target ratio: the
calibration pass (covariances, gradients), whitening, the whitened SVDs, the scores and, when asked,
the second-order terms. ``compress`` (*convert*) selects, corrects and packs for one
``CompressionConfig``, changing the model in place. Every stage is one ``Stages.run`` call: the
stage helper below is the only place that knows about the cache, timings and ranks.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ._version import __version__
from .config import AnalysisOptions, CompressionConfig, free_device_memory  # noqa: F401  (re-exported)
from .io.models import TargetSet, assign_input_groups, check_causal_lm, find_targets, model_fingerprint
from .report import build_report, model_nbytes, sampled_steps, score_summary  # noqa: F401  (re-exported)
from .runtime.cache import StageCache, cache_key
from .runtime.distributed import active, decompose_sharded, everywhere, is_main, sharded_for_passes
from .runtime.memory import MemoryTracker, large_blocks_mapped
from .runtime.progress import progress
from .stages.calibration import CalibrationSet
from .stages.correction import correct
from .stages.covariance import CovarianceCollector
from .stages.curvature import curvature_terms
from .stages.decompose import Factors
from .stages.gradients import calibration_pass, model_device
from .stages.packing import pack_model
from .stages.scores import component_scores
from .stages.precision import all_parts, choose_precisions
from .stages.selection import AUTO_GROUP_SIZE, MatrixSpec, RatioError, Selection, check_ratio, select
from .stages.whitening import whitening_factor

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]  # (module, fully qualified name) -> compress it?


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
    curvature: dict[str, torch.Tensor] | None = None  # second-order terms (``analyze(second_order=True)``)
    windows_per_rank: list[int] | None = None  # the calibration pass's windows on each rank (torchrun)
    memory: MemoryTracker = field(default_factory=MemoryTracker)  # peak memory of each stage so far
    sharded: nn.Module | None = None  # the FSDP2-sharded model of ``AnalysisOptions.shard_model`` (torchrun)

    def pass_model(self, model: nn.Module) -> nn.Module:
        """The model every gradient pass runs on: the sharded one when there is one, else ``model``."""
        return model if self.sharded is None else self.sharded


class Stages:
    """The stage helper: runs one stage from its cache entry or computes it, timed, and caches it.

    ``run(name, compute, entry=..., save=..., restore=...)`` returns ``restore(files, meta)`` when the
    cache holds ``entry``; otherwise ``compute()``, timed under ``name``, whose result the main rank
    alone stores as ``save(result) -> (files, meta)``. ``shared=True`` marks a stage the ranks compute
    together (the sharded SVDs): its entry is used only when every rank has it.
    """

    def __init__(self, cache_dir: str | None, key: str = "", timings: dict | None = None,
                 memory: MemoryTracker | None = None):
        self.cache = StageCache(cache_dir if key else None)
        self.cache.usable()  # an unusable directory is found now, before any work, and costs only the cache
        self.key = key
        self.timings = {} if timings is None else timings
        self.memory = MemoryTracker() if memory is None else memory  # peak memory by stage, like the timings

    @contextmanager
    def timed(self, name: str):
        with self.memory.stage(name):
            start = time.perf_counter()
            yield
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def run(self, name: str | None, compute: Callable, *, entry: str | None = None, save: Callable | None = None,
            restore: Callable | None = None, shared: bool = False):
        # A cache hit is recorded as the stage, "cached": its memory is that of reading the entry.
        with self.memory.stage(name or entry, cached=True) if entry else nullcontext() as record:
            cached = self.cache.load(entry, self.key) if entry else None
            if shared and not everywhere(cached is not None):  # the ranks compute together, or none does
                cached = None
            if cached is not None:
                if is_main():
                    log.info("%s: reused from the stage cache (%s)", entry, self.cache.path(entry, self.key))
                return restore(*cached)
            if record is not None:
                record.keep = False  # a miss: the computed stage is recorded below instead
        with self.timed(name) if name else nullcontext():  # None: the stage times its own parts
            result = compute()
        if entry and is_main():
            with self.memory.stage(f"cache_store:{entry}"):
                self.cache.store(entry, self.key, *save(result))
        return result


@large_blocks_mapped()  # from the calibration pass to the factors' cache store (runtime.memory)
def analyze(model: nn.Module, calib: CalibrationSet, options: AnalysisOptions | None = None, *,
            filter_fn: FilterFn | None = None, second_order: bool = False) -> Analysis:
    """Prepare: calibrate, whiten, decompose and score every target of ``model`` (stages 1-4).

    The model is not changed. ``filter_fn(module, fqn)`` chooses the targets among the modules of the
    decoder blocks (default: every ``nn.Linear``); ``second_order`` also computes the terms of
    ``zero-sum-2nd`` (one more gradient pass). Under ``torch.distributed`` (e.g. ``torchrun``) every
    rank calls this with the same model and calibration set: the calibration pass and the whitening
    run on every rank, the whitened SVDs are shared out (``zssvd.runtime.distributed``), and every
    rank returns the whole analysis. Only rank 0 writes cache entries. With ``options.shard_model`` the
    gradient passes run on an FSDP2-sharded model (``Analysis.sharded``): rank 0 shards a copy and keeps
    ``model`` whole for packing, the other ranks shard ``model`` itself (``sharded_for_passes``).
    """
    options = options or AnalysisOptions()
    check_causal_lm(model)
    _check_weights(model)
    targets = find_targets(model, options.blocks_path, filter_fn=filter_fn)
    assign_input_groups(model, targets, calib.input_ids[:1, : min(16, calib.seq_len)].to(model_device(model)))
    key = cache_key(model_fingerprint(model, options.source), calib.fingerprint(), __version__,
                    [t.name for t in targets]) if options.cache_dir else ""  # before sharding: reads whole weights
    sharded = _sharded(model, options)
    passes = model if sharded is None else sharded
    options = options.resolved(passes, targets, tuple(calib.input_ids.shape))
    device = options.compute_device(passes)
    stages = Stages(options.cache_dir, key, memory=MemoryTracker(device))

    pass_targets = targets.rebind(passes)
    stats = stages.run("calibration_pass", lambda: _statistics(passes, pass_targets, calib, options),  # 1
                       entry="stats", save=_stats_entry, restore=_stats_from_entry, shared=True)
    stages.key = cache_key(key, options.decompose_method, options.base_jitter) if key else ""
    whitening, jitter, factors = stages.run(  # 2 + 3 share one entry: the corrections need S with the factors
        None, lambda: _whiten_and_decompose(stages, pass_targets, stats, options, device),
        entry="factors", save=_factors_entry, restore=_factors_from_entry(targets), shared=True)
    with stages.timed("scores"):  # 4
        scores = {t.name: component_scores(factors[t.name], stats["grads"].pop(t.name), backend=options.score_backend,
                                           device=device) for t in targets}
    analysis = Analysis(targets=targets, specs=[MatrixSpec(t.name, *t.shape) for t in targets], whitening=whitening,
                        jitter=jitter, factors=factors, scores=scores, loss=stats["loss"], calibration=calib,
                        options=options, timings=stages.timings, key=stages.key,
                        windows_per_rank=stats.get("windows_per_rank"), memory=stages.memory, sharded=sharded)
    if second_order:
        add_curvature(model, analysis)  # 4b
    return analysis


prepare = analyze  # torchao's name for the ratio-independent half


@large_blocks_mapped()
def compress_(model: nn.Module, calib: CalibrationSet, config: CompressionConfig | None = None, *legacy,
              analysis: Analysis | None = None, options: AnalysisOptions | None = None,
              filter_fn: FilterFn | None = None, **legacy_kwargs):
    """Convert: compress ``model`` IN PLACE to ``config``; returns ``(model, report)`` (stages 5-7).

    The replaced ``nn.Linear`` layers give up their weights: compress a copy (``copy.deepcopy``) when
    the original is still needed. ``analysis`` (from ``analyze`` on the same model and calibration set)
    skips stages 1-4, e.g. when sweeping ratios or strategies; without one, ``analyze`` runs first.
    With a sharded analysis (``AnalysisOptions.shard_model`` under torchrun) rank 0 packs its whole
    ``model`` and returns it with the report; the other ranks, whose ``model`` is sharded, return
    ``(model, None)``.
    The older form ``compress(model, calib, ratio, storage, strategy, corrections, ordered=, min_rank=)``
    still works and warns (``DeprecationWarning``).
    """
    config = _config_from_legacy(config, legacy, legacy_kwargs)
    if analysis is None:
        options = options or AnalysisOptions()
        check_causal_lm(model)
        targets = find_targets(model, options.blocks_path, filter_fn=filter_fn)
        check_ratio([MatrixSpec(t.name, *t.shape) for t in targets], config.ratio, config.storage,
                    config.min_rank, config.group_size)  # fail fast, before the slow stages
        analysis = analyze(model, calib, options, filter_fn=filter_fn)
    targets = analysis.targets.rebind(model)  # ``model`` may be a copy of the analysed one
    if config.strategy == "zero-sum-2nd":
        add_curvature(model, analysis)  # ratio-independent: a no-op when ``analyze(second_order=True)`` did it
    stages = Stages(None, timings=dict(analysis.timings), memory=analysis.memory.copy())

    selection = stages.run("selection", lambda: _select(analysis, config))  # 5
    truncated = truncate(analysis, selection)
    if config.storage == "int4" and config.group_size == AUTO_GROUP_SIZE:  # 5b: measured before any correction
        selection = stages.run("precision", lambda: _measured_precisions(analysis, config, targets, selection))
        truncated = truncate(analysis, selection)
    correction = None
    if config.corrections:  # 6
        passes = analysis.pass_model(model)
        correction = stages.run("correction", lambda: correct(
            passes, analysis.targets.rebind(passes), calib.input_ids, truncated, analysis.whitening,
            config.corrections, decompose_method=analysis.options.decompose_method,
            **analysis.options.pass_settings()))
        truncated = correction.factors
    if analysis.sharded is not None and not is_main():
        return model, None  # only rank 0 kept a whole model to pack (``sharded_for_passes``)
    stages.run("packing", lambda: pack_model(model, targets, truncated, selection))  # 7
    return model, build_report(model, analysis, config, selection, stages.timings, correction,
                               memory=stages.memory.summary())


compress = compress_  # the name the README and older code use; it changes the model in place all the same
convert = compress_  # torchao's name for the ratio-dependent half


def add_curvature(model: nn.Module, analysis: Analysis) -> dict[str, torch.Tensor]:
    """The second-order terms of ``zero-sum-2nd`` (one more gradient pass; cached with the factors)."""
    if analysis.curvature is None:
        stages = Stages(analysis.options.cache_dir, analysis.key, analysis.timings, analysis.memory)
        passes = analysis.pass_model(model)
        analysis.curvature = stages.run(
            "curvature", lambda: curvature_terms(passes, analysis.targets.rebind(passes),
                                                 analysis.calibration.input_ids, analysis.factors,
                                                 **analysis.options.pass_settings()),
            entry="curvature", save=lambda c: ({"curvature": c}, {}), restore=lambda files, meta: files["curvature"],
            shared=True)
    return analysis.curvature


def rescore(model: nn.Module, analysis: Analysis, calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """Scores of the analysis's components under another calibration set's gradient.

    The whitened factors stay those of the analysis, so component i of every matrix is the same
    direction in both score sets and their signs can be compared (see ``scores.sign_flips``).
    """
    passes = analysis.pass_model(model)
    targets = analysis.targets.rebind(passes)
    grads = calibration_pass(passes, targets, calib.input_ids, desc="gradient pass (rescoring)",
                             **analysis.options.pass_settings()).grads
    device = analysis.options.compute_device(passes)
    return {t.name: component_scores(analysis.factors[t.name], grads[t.name], backend=analysis.options.score_backend,
                                     device=device)
            for t in targets}


def truncate(analysis: Analysis, selection: Selection) -> dict[str, Factors]:
    """The kept components of every factorised matrix."""
    return {name: Factors(f.U[:, keep], f.sigma[keep], f.Z[:, keep])
            for name, f in analysis.factors.items()
            if not selection.dense[name] for keep in [selection.keep[name]]}


# --- the stages' bodies and their cache entries -------------------------------------------------------------


def _check_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the model's weight {name} contains NaN/Inf: the checkpoint is corrupt or was "
                             "loaded in a dtype that overflows; fix the weights before compressing")


def _sharded(model: nn.Module, options: AnalysisOptions) -> nn.Module | None:
    """The sharded model of ``options.shard_model`` (a collective), or None: not asked, or one process."""
    if not options.shard_model:
        return None
    if not active():
        log.info("shard_model: a single process holds the whole model, nothing to shard (start N processes with "
                 "torchrun --nproc-per-node N to shard it across them)")
        return None
    return sharded_for_passes(model, options.blocks_path)


def _statistics(model, targets: TargetSet, calib: CalibrationSet, options: AnalysisOptions) -> dict:
    """Stage 1: covariances, gradients and the loss from one pass over the calibration set."""
    # Offloaded models keep their statistics in CPU memory, like their weights; so does the block order.
    stats_device = options.statistics_home()
    collector = CovarianceCollector(targets, device=stats_device)
    result = calibration_pass(model, targets, calib.input_ids, covariances=collector, grad_device=stats_device,
                              desc="calibration pass (covariances + gradients)", **options.pass_settings())
    return {"covariances": collector.covariances(), "grads": result.grads, "loss": result.loss,
            "tokens": result.tokens, "windows_per_rank": result.windows_per_rank}


def _stats_entry(stats: dict):
    return ({"covariances": stats["covariances"], "grads": stats["grads"]},
            {"loss": stats["loss"], "tokens": stats["tokens"], "windows_per_rank": stats["windows_per_rank"]})


def _stats_from_entry(files: dict, meta: dict) -> dict:
    return {"covariances": files["covariances"], "grads": files["grads"], "loss": meta["loss"],
            "windows_per_rank": meta.get("windows_per_rank")}


def _whiten_and_decompose(stages: Stages, targets: TargetSet, stats: dict, options: AnalysisOptions, device):
    """Stages 2 and 3: S for every input group, then the whitened SVD of every target."""
    whitening, jitter = {}, {}
    with stages.timed("whitening"):
        for group in progress(targets.groups, desc="whitening", unit="group"):
            cov = stats["covariances"].pop(group)  # freed as soon as it is factored
            w = whitening_factor(cov.to(device), group, base_jitter=options.base_jitter)
            whitening[group], jitter[group] = w.factor.to(cov.device), w.relative_jitter
    escalated = {g: j for g, j in jitter.items() if j > options.base_jitter}
    if escalated:
        log.info("whitening needed a larger diagonal shift for %d groups (max %.1e x trace/n)",
                 len(escalated), max(escalated.values()))
    with stages.timed("decomposition"):
        factors = decompose_sharded({t.name: t.module.weight.detach() for t in targets},
                                    {t.name: whitening[t.group] for t in targets},
                                    method=options.decompose_method, device=device,
                                    out_device=options.statistics_home())
    return {g: s.float() for g, s in whitening.items()}, jitter, factors


def _factors_entry(result):
    whitening, jitter, factors = result
    tensors = {f"S::{g}": s for g, s in whitening.items()}
    for name, f in factors.items():
        tensors.update({f"U::{name}": f.U, f"sigma::{name}": f.sigma, f"Z::{name}": f.Z})
    return {"factors": tensors}, {"jitter": jitter}


def _factors_from_entry(targets: TargetSet):
    def restore(files: dict, meta: dict):
        tensors = files["factors"]
        whitening = {g: tensors[f"S::{g}"] for g in targets.groups}
        factors = {t.name: Factors(tensors[f"U::{t.name}"], tensors[f"sigma::{t.name}"], tensors[f"Z::{t.name}"])
                   for t in targets}
        return whitening, meta["jitter"], factors
    return restore


def _select(analysis: Analysis, config: CompressionConfig, group_sizes: dict | None = None) -> Selection:
    """Stage 5: the zero-sum rule (or another strategy) over every component of every target."""
    sigmas = {name: f.sigma for name, f in analysis.factors.items()}
    return select(analysis.specs, analysis.scores, sigmas, ratio=config.ratio, storage=config.storage,
                  strategy=config.strategy, ordered=config.ordered, min_rank=config.min_rank,
                  curvature=analysis.curvature if config.strategy == "zero-sum-2nd" else None,
                  group_size=config.group_size, rank_multiple=config.rank_multiple, group_sizes=group_sizes)


def _measured_precisions(analysis: Analysis, config: CompressionConfig, targets: TargetSet,
                         selection: Selection) -> Selection:
    """Stage 5b (``group_size="auto"``): group sizes measured at the g = 64 ranks, the ranks chosen again
    with those sizes in the costs, then the sizes measured again at the new ranks (``stages.precision``)."""
    weights = {t.name: t.module.weight for t in targets}
    groups = {t.name: t.group for t in targets}

    def measured(sel: Selection) -> Selection:
        return choose_precisions(sel, weights, truncate(analysis, sel), analysis.whitening, groups)

    first = measured(selection)
    try:
        again = _select(analysis, config, group_sizes=all_parts(first.group_sizes))
    except RatioError:  # the chosen sizes price some matrix's smallest ranks above the budget: keep the first
        log.info("int4 precision: the ranks could not be chosen again with the measured group sizes; "
                 "keeping those of the g = 64 selection")
        return first
    return measured(again)


_LEGACY = ("ratio", "storage", "strategy", "corrections")


def _config_from_legacy(config, args: tuple, kwargs: dict) -> CompressionConfig:
    """``compress(model, calib, ratio, storage, ..., ordered=..., min_rank=...)`` -> a ``CompressionConfig``."""
    if isinstance(config, CompressionConfig) and not args and not kwargs:
        return config
    if isinstance(config, CompressionConfig):
        raise TypeError("pass either a CompressionConfig or the separate settings, not both")
    if config is not None:
        args = (config, *args)
    if len(args) > len(_LEGACY):
        raise TypeError(f"compress takes at most {len(_LEGACY)} positional settings ({', '.join(_LEGACY)})")
    values = {**dict(zip(_LEGACY, args)), **kwargs}
    if values:
        warnings.warn("compress(model, calib, ratio=..., storage=..., ...) is deprecated: pass "
                      "config=zssvd.CompressionConfig(ratio=..., ...)", DeprecationWarning, stacklevel=3)
    return CompressionConfig.from_dict(values)
