"""What to compute (``CompressionConfig``) and how to run it (``AnalysisOptions``), kept apart.

``CompressionConfig`` is the method's own settings: a small serialisable dataclass that
``report.json`` records under ``"config"`` and ``CompressionConfig.from_dict`` reads back.
``AnalysisOptions`` are run options: devices, micro-batches, offloading, pass order, the cache.
They change where and how fast the stages run, not what they compute (up to rounding).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from .io.models import TargetSet
from .runtime.blockwise import available_host_bytes, least_host_peak_bytes, statistics_bytes_by_block
from .stages.gradients import model_device, statistics_on_host
from .stages.selection import base_group_size, int4_bits
from .validate import require_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressionConfig:
    """What ``compress`` computes: the storage budget and how components are chosen.

    ``ratio``: stored size of the targets over their 16-bit dense size; ``storage``: ``dense``,
    ``remap``, ``hq`` or ``int4``; ``strategy``: ``zero-sum`` (the paper), ``zero-sum-2nd``, ``uniform``
    or an ablation; ``corrections``: truncate-correct-re-truncate rounds; ``ordered``: components leave a
    matrix smallest sigma first; ``min_rank``: the fewest components a factorised matrix keeps;
    ``group_size``: int4's values per 16-bit scale and zero point (ignored by the other storages), or
    ``"auto"`` (the default): a group size per factor and per matrix chosen by measurement
    (``stages.precision``; better than 64 everywhere in 10 of the 12 cells measured on SmolLM2, bench/RESULTS.md);
    ``rank_multiple``: factorised ranks are multiples of it (matrices of rank >= 8x it): aligned ranks for
    kernels that want reductions in multiples of 16, at some cost in quality (bench/RESULTS.md, "Rank
    multiples"); the CPU paths pad other ranks themselves.
    """

    ratio: float = 0.8
    storage: str = "dense"
    strategy: str = "zero-sum"
    corrections: int = 0
    ordered: bool = True
    min_rank: int = 1
    group_size: int | str = "auto"
    rank_multiple: int = 1

    def __post_init__(self):
        require_int("corrections", self.corrections, 0)
        require_int("min_rank", self.min_rank, 1)
        require_int("rank_multiple", self.rank_multiple, 1)
        if self.storage == "int4":
            int4_bits(base_group_size(self.group_size))  # one the int4 format takes, else its one-line ValueError

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class AnalysisOptions:
    """Settings of the ratio-independent stages (part of the cache key where they matter)."""

    micro_batch: int | None = None  # windows per step; None: 1 on the CPU, 4 on an accelerator (see ``resolved``)
    checkpointing: bool = False
    decompose_method: str = "gram"
    base_jitter: float = 1e-6
    score_backend: str = "auto"
    blocks_path: str | None = None
    offload: str | None = None  # "cpu" or a folder: stream the decoder blocks to ``device`` one at a time
    device: str | None = None  # execution device (default: where the model's weights are)
    statistics_device: str | None = None  # where covariances and gradients accumulate (default: cpu when
    # offloading or in block order, else the execution device); "cpu" keeps ~(4 + 8 n/m) bytes per weight off the GPU
    pass_order: str = "auto"  # "batch", "block" (one block's statistics on the device at a time, zssvd.runtime.blockwise)
    # or "auto": batch unless its statistics would not fit in the device's free memory
    cache_dir: str | None = None
    source: str = ""  # model id, for the cache key
    shard_model: bool = False  # under torchrun: shard the weights across the ranks with FSDP2 for the gradient
    # passes (runtime.distributed.sharded_for_passes); a single process keeps the whole model

    def __post_init__(self):
        if self.micro_batch is not None:
            require_int("micro_batch", self.micro_batch, 1)
        if self.shard_model and self.offload:
            raise ValueError("shard_model and offload do not combine: sharding already leaves each GPU 1/N of the "
                             "weights; drop --offload, or drop --shard-model to stream the blocks from host memory")
        if not self.base_jitter >= 0:
            raise ValueError(f"base_jitter must be >= 0, got {self.base_jitter}")

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
        """These options with ``micro_batch=None`` and ``pass_order="auto"`` made concrete for ``model`` and
        ``windows`` (N, L).

        On the CPU one window per step: it holds a quarter of the activations of four (SmolLM2 at 32 x 512:
        3.4 GB peak instead of 5.0, for 12% more time on two idle cores; measured in bench/RESULTS.md).
        An accelerator keeps four, which fill it better.

        On a GPU, the batch order keeps every target's float32 gradient and float64 covariance on
        the device; when that would take more than 80% of its free memory, the block order is used.
        Offloaded models take the block order when its hidden states fit in host memory: it loads
        each block three times per pass instead of twice per micro-batch. On the CPU, and with an
        explicit statistics device, the batch order stays.
        """
        if self.micro_batch is None:
            cpu = self.compute_device(model).type == "cpu"
            return replace(self, micro_batch=1 if cpu else 4).resolved(model, targets, windows)
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
