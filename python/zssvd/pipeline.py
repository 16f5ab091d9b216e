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
import torch.distributed as dist
from torch import nn

from ._version import __version__
from .config import AnalysisOptions, CompressionConfig, free_device_memory  # noqa: F401  (re-exported)
from .io.models import TargetSet, assign_input_groups, check_causal_lm, find_targets, model_fingerprint
from .report import build_report, model_nbytes, sampled_steps, score_summary  # noqa: F401  (re-exported)
from .runtime.cache import StageCache, cache_key
from .runtime.distributed import (active, collective, decompose_sharded, everywhere, factor_shapes, is_main,
                                  owners_by_input_group, share_factors, share_from_owners, share_tensors,
                                  sharded_for_passes, world)
from .runtime.memory import MemoryTracker, large_blocks_mapped, tensor_bytes
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
    # Under torchrun: the rank that owns each target (its statistics, whitening, SVD and scores). Rank 0
    # also holds every factor and whitening factor (it packs); the other ranks hold their own only, and
    # every rank holds every score and singular value (``sigmas``). None in one process.
    owners: dict[str, int] | None = None
    sigmas: dict[str, torch.Tensor] = field(default_factory=dict)  # target -> singular values (every rank)
    # bytes of covariances + gradients each rank kept after the reduction, and held while it summed its
    # windows (``stat_bytes``: {"kept": [...], "during_pass": [...], "grads_during_pass": [...]: the gradient
    # sums alone}, one entry per rank)
    stat_bytes: dict[str, list[int]] | None = None

    def pass_model(self, model: nn.Module) -> nn.Module:
        """The model every gradient pass runs on: the sharded one when there is one, else ``model``."""
        return model if self.sharded is None else self.sharded


class Stages:
    """The stage helper: runs one stage from its cache entry or computes it, timed, and caches it.

    ``run(name, compute, entry=..., save=..., restore=...)`` returns ``restore(files, meta)`` when the
    cache holds ``entry``; otherwise ``compute()``, timed under ``name``, whose result the main rank
    alone stores as ``save(result) -> (files, meta)``. ``shared=True`` marks a stage the ranks compute
    together (the sharded SVDs): its entry is used only when every rank has it. ``per_rank=True`` marks
    one whose result differs by rank (each holds its own statistics and factors): every rank stores and
    reads its own entry, named for its rank and the world size (``rank_entry``).
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
            restore: Callable | None = None, shared: bool = False, per_rank: bool = False):
        stored = rank_entry(entry) if entry and per_rank else entry  # the entry's name in the cache
        # A cache hit is recorded as the stage, "cached": its memory is that of reading the entry.
        with self.memory.stage(name or entry, cached=True) if entry else nullcontext() as record:
            cached = self.cache.load(stored, self.key) if entry else None
            if shared and not everywhere(cached is not None):  # the ranks compute together, or none does
                cached = None
            if cached is not None:
                if is_main():
                    log.info("%s: reused from the stage cache (%s)", stored, self.cache.path(stored, self.key))
                return restore(*cached)
            if record is not None:
                record.keep = False  # a miss: the computed stage is recorded below instead
        with self.timed(name) if name else nullcontext():  # None: the stage times its own parts
            result = compute()
        if entry and (is_main() or per_rank):
            with self.memory.stage(f"cache_store:{entry}"):
                self.cache.store(stored, self.key, *save(result))
        return result


def rank_entry(entry: str) -> str:
    """The cache entry of this rank's part of a stage: ``entry`` in one process, ``entry.rank1-of-4`` under
    torchrun (a rerun resumes with the same number of ranks, which share out the same matrices)."""
    rank, size = world()
    return entry if size == 1 else f"{entry}.rank{rank}-of-{size}"


@large_blocks_mapped()  # from the calibration pass to the factors' cache store (runtime.memory)
def analyze(model: nn.Module, calib: CalibrationSet, options: AnalysisOptions | None = None, *,
            filter_fn: FilterFn | None = None, second_order: bool = False) -> Analysis:
    """Prepare: calibrate, whiten, decompose and score every target of ``model`` (stages 1-4).

    The model is not changed. ``filter_fn(module, fqn)`` chooses the targets among the modules of the
    decoder blocks (default: every ``nn.Linear``); ``second_order`` also computes the terms of
    ``zero-sum-2nd`` (one more gradient pass). Under ``torch.distributed`` (e.g. ``torchrun``) every
    rank calls this with the same model and calibration set: each rank calibrates on its share of the
    windows, each statistic is reduced to the rank that owns its matrices, which whitens, decomposes and
    scores them (``zssvd.runtime.distributed``). Every rank returns the scores and singular values of
    every target but its own whitening and factors only (``Analysis.owners``), except rank 0, which
    holds them all to pack; each rank caches its own part (``rank_entry``). With ``options.shard_model`` the
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
    owners = _owners(targets)
    stats = stages.run("calibration_pass", lambda: _statistics(passes, pass_targets, calib, options, owners),  # 1
                       entry="stats", save=_stats_entry, restore=_stats_from_entry, shared=True, per_rank=True)
    stages.key = cache_key(key, options.decompose_method, options.base_jitter) if key else ""
    whitening, jitter, factors = stages.run(  # 2 + 3 share one entry: the corrections need S with the factors
        None, lambda: _whiten_and_decompose(stages, pass_targets, stats, options, device, owners),
        entry="factors", save=_factors_entry, restore=_factors_from_entry(targets), shared=True, per_rank=True)
    with stages.timed("scores"):  # 4: where the gradients are, then shared with every rank
        scores = {t.name: component_scores(factors[t.name], stats["grads"].pop(t.name), backend=options.score_backend,
                                           device=device) for t in targets if t.name in stats["grads"]}
        scores, sigmas = _scores_everywhere(targets, scores, factors, owners)
    analysis = Analysis(targets=targets, specs=[MatrixSpec(t.name, *t.shape) for t in targets], whitening=whitening,
                        jitter=jitter, factors=factors, scores=scores, loss=stats["loss"], calibration=calib,
                        options=options, timings=stages.timings, key=stages.key,
                        windows_per_rank=stats.get("windows_per_rank"), memory=stages.memory, sharded=sharded,
                        owners=owners, sigmas=sigmas, stat_bytes=_stat_bytes_per_rank(stats["stat_bytes"]))
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
    Under torchrun rank 0 packs ``model`` and returns it with the report; the other ranks, which hold
    only their own factors (and, with ``AnalysisOptions.shard_model``, a sharded ``model``), return
    ``(model, None)`` with ``model`` not compressed.
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
        selection = stages.run("precision", lambda: _on_rank0(
            analysis, lambda: _measured_precisions(analysis, config, targets, selection)))
        truncated = truncate(analysis, selection)
    correction = None
    if config.corrections:  # 6
        passes = analysis.pass_model(model)
        truncated, whitening = _everywhere_for_corrections(analysis, selection, truncated)
        correction = stages.run("correction", lambda: correct(
            passes, analysis.targets.rebind(passes), calib.input_ids, truncated, whitening,
            config.corrections, decompose_method=analysis.options.decompose_method, owners=analysis.owners,
            **analysis.options.pass_settings()))
        truncated = correction.factors
    if analysis.owners is not None and not is_main():
        return model, None  # only rank 0 holds every factor (and, sharded, a whole model) to pack
    stages.run("packing", lambda: pack_model(model, targets, truncated, selection))  # 7
    report = build_report(model, analysis, config, selection, stages.timings, correction,
                          memory=stages.memory.summary())
    if analysis.stat_bytes is not None:  # what reducing to the owners saved, rank by rank
        report["calibration"]["stat_bytes_per_rank"] = analysis.stat_bytes["kept"]
        report["calibration"]["stat_bytes_during_pass_per_rank"] = analysis.stat_bytes["during_pass"]
        report["calibration"]["grad_bytes_during_pass_per_rank"] = analysis.stat_bytes.get("grads_during_pass")
    return model, report


compress = compress_  # the name the README and older code use; it changes the model in place all the same
convert = compress_  # torchao's name for the ratio-dependent half


def add_curvature(model: nn.Module, analysis: Analysis) -> dict[str, torch.Tensor]:
    """The second-order terms of ``zero-sum-2nd`` (one more gradient pass; cached with the factors)."""
    if analysis.curvature is None:
        stages = Stages(analysis.options.cache_dir, analysis.key, analysis.timings, analysis.memory)
        passes = analysis.pass_model(model)
        analysis.curvature = stages.run(
            "curvature", lambda: curvature_terms(passes, analysis.targets.rebind(passes),
                                                 analysis.calibration.input_ids, _bases_everywhere(analysis),
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
                             owners=analysis.owners, **analysis.options.pass_settings()).grads
    device = analysis.options.compute_device(passes)
    scores = {t.name: component_scores(analysis.factors[t.name], grads[t.name], backend=analysis.options.score_backend,
                                       device=device)
              for t in targets if t.name in grads}
    if analysis.owners is None:
        return scores
    numels = {t.name: min(t.shape) for t in targets}
    return share_from_owners(scores, numels, analysis.owners)


def truncate(analysis: Analysis, selection: Selection) -> dict[str, Factors]:
    """The kept components of every factorised matrix."""
    return {name: Factors(f.U[:, keep], f.sigma[keep], f.Z[:, keep])
            for name, f in analysis.factors.items()  # under torchrun: the factors this rank holds
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


def _owners(targets: TargetSet) -> dict[str, int] | None:
    """Under torchrun, the rank that needs each target's statistics (``owners_by_input_group``); None in one
    process, where everything stays where it is."""
    if not active():
        return None
    groups: dict[str, list] = {}
    for t in targets:
        groups.setdefault(t.group, []).append((t.name, tuple(t.shape)))
    return owners_by_input_group(groups, world()[1])


def _statistics(model, targets: TargetSet, calib: CalibrationSet, options: AnalysisOptions,
                owners: dict[str, int] | None = None) -> dict:
    """Stage 1: covariances, gradients and the loss from one pass over the calibration set (under
    torchrun, the totals of this rank's own targets only)."""
    # Offloaded models keep their statistics in CPU memory, like their weights; so does the block order.
    stats_device = options.statistics_home()
    collector = CovarianceCollector(targets, device=stats_device)
    result = calibration_pass(model, targets, calib.input_ids, covariances=collector, grad_device=stats_device,
                              desc="calibration pass (covariances + gradients)", owners=owners,
                              **options.pass_settings())
    covariances = collector.covariances()
    # The batch order holds every partial sum until the pass ends; the block order reduces each block's
    # covariances when its forward is done and its gradients when its backward is (``calibration_pass``).
    during_pass = result.stat_peak_bytes
    kept = tensor_bytes(covariances.values()) + tensor_bytes(result.grads.values())
    return {"covariances": covariances, "grads": result.grads, "loss": result.loss,
            "tokens": result.tokens, "windows_per_rank": result.windows_per_rank,
            "stat_bytes": {"kept": kept, "during_pass": during_pass, "grads_during_pass": result.peak_bytes}}


def _stats_entry(stats: dict):
    return ({"covariances": stats["covariances"], "grads": stats["grads"]},
            {"loss": stats["loss"], "tokens": stats["tokens"], "windows_per_rank": stats["windows_per_rank"],
             "stat_bytes": stats["stat_bytes"]})


def _stats_from_entry(files: dict, meta: dict) -> dict:
    kept = tensor_bytes(files["covariances"].values()) + tensor_bytes(files["grads"].values())
    return {"covariances": files["covariances"], "grads": files["grads"], "loss": meta["loss"],
            "windows_per_rank": meta.get("windows_per_rank"),
            "stat_bytes": meta.get("stat_bytes", {"kept": kept, "during_pass": kept})}


def _stat_bytes_per_rank(mine: dict[str, int]) -> dict[str, list[int]]:
    """Every rank's ``{"kept": bytes, "during_pass": bytes}`` of statistics, as lists over the ranks."""
    ranks = [mine]
    if active():
        ranks = [None] * world()[1]
        with collective("gathering the statistic bytes of every rank"):
            dist.all_gather_object(ranks, mine)
    return {kind: [r.get(kind) for r in ranks] for kind in ("kept", "during_pass", "grads_during_pass")}


def _whiten_and_decompose(stages: Stages, targets: TargetSet, stats: dict, options: AnalysisOptions, device,
                          owners: dict[str, int] | None = None):
    """Stages 2 and 3: S for every input group, then the whitened SVD of every target.

    Under torchrun each rank whitens the groups whose covariances it holds and decomposes their matrices;
    the factors and S then go to rank 0, which packs (``decompose_sharded``, ``_whitening_on_rank0``)."""
    whitening, jitter = {}, {}
    with stages.timed("whitening"):
        groups = [g for g in targets.groups if g in stats["covariances"]]  # under torchrun: this rank's own
        for group in progress(groups, desc="whitening", unit="group"):
            cov = stats["covariances"].pop(group)  # freed as soon as it is factored
            w = whitening_factor(cov.to(device), group, base_jitter=options.base_jitter)
            whitening[group], jitter[group] = w.factor.to(cov.device), w.relative_jitter
    jitter = _jitter_everywhere(targets, jitter)
    escalated = {g: j for g, j in jitter.items() if j > options.base_jitter}
    if escalated and is_main():
        log.info("whitening needed a larger diagonal shift for %d groups (max %.1e x trace/n)",
                 len(escalated), max(escalated.values()))
    with stages.timed("decomposition"):
        factors = decompose_sharded({t.name: t.module.weight.detach() for t in targets},
                                    {t.name: whitening[t.group] for t in targets if t.group in whitening},
                                    method=options.decompose_method, device=device,
                                    out_device=options.statistics_home(), owners=owners)
        whitening = {g: s.float() for g, s in whitening.items()}
        if owners is not None:
            whitening = _whitening_on_rank0(targets, whitening, owners, options.statistics_home())
    return whitening, jitter, factors


def _jitter_everywhere(targets: TargetSet, jitter: dict[str, float]) -> dict[str, float]:
    """Every group's diagonal shift on every rank (one number per group; the report and the log read them)."""
    if not active():
        return jitter
    parts: list = [None] * world()[1]
    with collective("gathering the whitening shifts"):
        dist.all_gather_object(parts, jitter)
    merged = {g: j for part in parts for g, j in part.items()}
    return {g: merged[g] for g in targets.groups}


def _whitening_on_rank0(targets: TargetSet, whitening: dict[str, torch.Tensor], owners: dict[str, int],
                        home) -> dict[str, torch.Tensor]:
    """S of every group to rank 0 (it caches them with the factors, measures int4 precisions and sends
    them to every rank for the corrections); the owners keep their own."""
    leader = {t.group: t for t in targets if t.group == t.name}
    shapes = {g: (leader[g].shape[1],) * 2 for g in targets.groups}
    got = share_tensors(whitening, shapes, {g: owners[g] for g in targets.groups}, to_all=False,
                        what="sending the whitening factors to rank 0")
    where = next(iter(whitening.values())).device if whitening else (home or "cpu")  # beside this rank's own
    return {g: s.to(where) for g, s in got.items()}


def _scores_everywhere(targets: TargetSet, scores: dict[str, torch.Tensor], factors: dict[str, Factors],
                       owners: dict[str, int] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(scores, singular values)`` of every target on every rank: each owner scored its own, and every
    rank runs the same selection over all of them. In one process, the arguments as they are."""
    if owners is None:
        return scores, {name: f.sigma for name, f in factors.items()}
    mine = {name: torch.cat([s.double(), factors[name].sigma.double()]) for name, s in scores.items()}
    numels = {t.name: 2 * min(t.shape) for t in targets}
    shared = share_from_owners(mine, numels, owners)
    home = next(iter(factors.values())).sigma.device if factors else torch.device("cpu")
    both = {name: (v[:v.numel() // 2].to(home), v[v.numel() // 2:].float().to(home)) for name, v in shared.items()}
    return {n: b[0] for n, b in both.items()}, {n: b[1] for n, b in both.items()}


def _bases_everywhere(analysis: Analysis) -> dict[str, Factors]:
    """The factors the curvature pass reads, U and sigma, of every target on every rank: under torchrun
    they go from rank 0 to every rank, because every rank's pass projects every layer's output gradients
    on U. Z is not sent (the pass does not read it)."""
    if analysis.owners is None:
        return analysis.factors
    shapes = {s.name: (s.out_features, min(s.out_features, s.in_features)) for s in analysis.specs}
    bases = share_tensors({n: f.U for n, f in analysis.factors.items()} if is_main() else {}, shapes,
                          dict.fromkeys(shapes, 0), to_all=True, what="sending the bases U to every rank")
    return {n: Factors(U, analysis.sigmas[n], U.new_empty(0, U.shape[1])) for n, U in bases.items()}


def _everywhere_for_corrections(analysis: Analysis, selection: Selection, truncated: dict[str, Factors]):
    """``(truncated factors, whitening factors)`` for the correction rounds. Under torchrun every rank runs
    each round's gradient pass over the whole truncated model, so every rank needs every kept factor: this
    broadcast from rank 0 is necessary (it is the kept components only, less than the full factors). Each
    matrix is corrected by its owner (``correct(owners=...)``), which holds its group's S already: no S is sent."""
    if analysis.owners is None:
        return truncated, analysis.whitening
    names = [s.name for s in analysis.specs if not selection.dense[s.name]]
    shapes = factor_shapes({s.name: (s.out_features, s.in_features) for s in analysis.specs if s.name in names},
                           {n: len(selection.keep[n]) for n in names})
    everywhere_truncated = share_factors(truncated if is_main() else {}, shapes, dict.fromkeys(names, 0), to_all=True)
    home = analysis.options.statistics_home()
    return ({n: f.to(device=home) for n, f in everywhere_truncated.items()} if home else everywhere_truncated,
            analysis.whitening)


def _on_rank0(analysis: Analysis, compute: Callable):
    """``compute()`` on rank 0, which holds every factor, its result sent to every rank (under torchrun);
    ``compute()`` itself in one process."""
    if analysis.owners is None:
        return compute()
    result = [compute() if is_main() else None]
    with collective("sharing rank 0's int4 precisions"):
        dist.broadcast_object_list(result, src=0)
    return result[0]


def _factors_entry(result):
    whitening, jitter, factors = result
    tensors = {f"S::{g}": s for g, s in whitening.items()}
    for name, f in factors.items():
        tensors.update({f"U::{name}": f.U, f"sigma::{name}": f.sigma, f"Z::{name}": f.Z})
    return {"factors": tensors}, {"jitter": jitter}


def _factors_from_entry(targets: TargetSet):
    def restore(files: dict, meta: dict):  # under torchrun a rank's entry holds what it held (see ``analyze``)
        tensors = files["factors"]
        whitening = {g: tensors[f"S::{g}"] for g in targets.groups if f"S::{g}" in tensors}
        factors = {t.name: Factors(tensors[f"U::{t.name}"], tensors[f"sigma::{t.name}"], tensors[f"Z::{t.name}"])
                   for t in targets if f"U::{t.name}" in tensors}
        return whitening, meta["jitter"], factors
    return restore


def _select(analysis: Analysis, config: CompressionConfig, group_sizes: dict | None = None) -> Selection:
    """Stage 5: the zero-sum rule (or another strategy) over every component of every target."""
    sigmas = analysis.sigmas or {name: f.sigma for name, f in analysis.factors.items()}
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
