"""Peak memory by pipeline stage: resident memory (RSS) on the CPU, allocated memory on CUDA.

``MemoryTracker.stage(name)`` brackets a stage. While any stage is open a daemon thread samples
the process's resident bytes (``/proc/self/statm``) and, on CUDA, ``torch.cuda.memory_allocated``
every ``interval`` seconds; at the stage's end the kernel's high-water mark (``VmHWM``) and
``torch.cuda.max_memory_allocated`` are read too. Neither counter is ever reset, so tools that
read them afterwards (``/usr/bin/time -v``, a benchmark's own ``max_memory_allocated``) see the
true process peak. A stage during which the process set a new record gets that record, exactly
(``"exact": true``); a stage below an earlier record gets the largest sample, which can miss a
spike shorter than the interval. Nested stages each see their own peak.

``report.json`` gets ``tracker.summary()``: the process peak, the device peak and ``by_stage``
(peak, start and end bytes per stage; ``"cached": true`` for a stage restored from the stage cache).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import resource
import sys
import threading
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors of an iterable (their storage as laid out, not their storages' sizes)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a /proc file (Linux), or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_resident_bytes() -> int:
    """The process's resident high-water mark: ``VmHWM``, else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    high_water = proc_kib_field("/proc/self/status", "VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- giving freed memory back to the kernel (glibc) -------------------------------------------------------------
#
# glibc serves blocks below its mmap threshold from heaps it rarely shrinks, and raises that threshold to
# the size of every mapped block freed (up to 32 MiB), so after the first step a calibration pass's
# activations (1-12 MiB each for SmolLM2) all come from the heap. What a step frees then stays resident and
# fragments: 0.9-1.2 GB above the live set of the pass at one window per step. A fixed threshold keeps such
# blocks in their own mappings, which ``free`` returns to the kernel at once.

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
LARGE_BLOCK_BYTES = 1 << 20  # mapped from here up: a 512-token window's hidden states are 1.1 MiB in float32


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of at least ``threshold`` bytes from its own mapping, from now on.

    Returns whether the C library took the setting (False without glibc, where nothing changes). Once set,
    the threshold no longer rises by itself (glibc refuses values above 32 MiB). Library code enters
    ``large_blocks_mapped`` instead, which hands the process back a settled threshold at its end.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"the mmap threshold must be a positive number of bytes, got {threshold!r}")
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))


# glibc's rising threshold stops at 32 MiB: where a long-running process that frees large blocks ends up.
# glibc cannot be told to rise again once a threshold is set, so the end of a scope sets this ceiling.
SETTLED_THRESHOLD_BYTES = 32 << 20
_scope_lock = threading.Lock()
_scope_depth = 0


@contextlib.contextmanager
def large_blocks_mapped(threshold: int = LARGE_BLOCK_BYTES):
    """``map_large_blocks(threshold)`` while inside; the outermost exit sets the settled 32 MiB threshold.

    The pipeline's entry points enter it, so the threshold holds from the calibration pass to the factors'
    cache store (with glibc's rising threshold back, the stages after the pass fragment the heap again and
    the store sets the run's peak), while a process that goes on to serve the model afterwards keeps
    mid-sized blocks in the heap, as it would without us. Nested and concurrent scopes share one setting.
    Also a decorator.
    """
    global _scope_depth
    with _scope_lock:
        _scope_depth += 1
        if _scope_depth == 1:
            map_large_blocks(threshold)
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                map_large_blocks(SETTLED_THRESHOLD_BYTES)


def return_freed_memory() -> bool:
    """Give the free pages of every malloc heap back to the kernel (glibc's ``malloc_trim(0)``).

    Returns whether anything was returned; always False without glibc. Safe at any time: it only
    releases pages that hold no live block.
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _device_counters(device: torch.device | None):
    """(allocated now, max allocated) on a CUDA device; None elsewhere."""
    if device is None or device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


@dataclass
class _Open:
    """A stage in progress: its peaks so far and the counters' values when it began."""

    name: str
    cached: bool
    start: int
    peak: int
    high_water_at_start: int
    device_start: int | None
    device_peak: int | None
    device_high_water_at_start: int | None
    keep: bool = True  # False: forget this stage at its end (e.g. a cache lookup that missed)

    def see(self, rss: int | None, device_now: int | None) -> None:
        if rss is not None:
            self.peak = max(self.peak, rss)
        if device_now is not None and self.device_peak is not None:
            self.device_peak = max(self.device_peak, device_now)


class MemoryTracker:
    """Peak resident (and CUDA) memory of each stage; see the module docstring."""

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.01):
        self.device = torch.device(device) if device is not None else None
        self.interval = interval
        self.by_stage: dict[str, dict] = {}
        self._open: list[_Open] = []
        self._lock = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def copy(self) -> "MemoryTracker":
        """A tracker that starts from this one's records (e.g. one compression among several of an analysis)."""
        return copy.deepcopy(self)

    def __getstate__(self):  # the records only: a lock and a thread cannot be copied or pickled
        return {"device": self.device, "interval": self.interval, "by_stage": self.by_stage}

    def __setstate__(self, state):
        self.__init__(state["device"], state["interval"])
        self.by_stage = copy.deepcopy(state["by_stage"])

    @contextlib.contextmanager
    def stage(self, name: str, *, cached: bool = False):
        rss = resident_bytes()
        start = rss if rss is not None else peak_resident_bytes()
        counters = _device_counters(self.device)
        record = _Open(name, cached, start, start, peak_resident_bytes(),
                       counters[0] if counters else None, counters[0] if counters else None,
                       counters[1] if counters else None)
        with self._lock:
            self._open.append(record)
            self._ensure_sampler()
        try:
            yield record
        finally:
            with self._lock:
                self._open.remove(record)
                if not self._open:
                    self._stop.set()
            self._finish(record)

    def _ensure_sampler(self) -> None:
        """Start a sampler unless one runs. Called under the lock: never wait here for a stopping sampler,
        which may itself be waiting for the lock; it ends on its own, its event being set."""
        if self._sampler is not None and self._sampler.is_alive() and not self._stop.is_set():
            return
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(self._stop,), name="zssvd-memory", daemon=True)
        self._sampler.start()

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            rss = resident_bytes()
            counters = _device_counters(self.device)
            with self._lock:
                for record in self._open:
                    record.see(rss, counters[0] if counters else None)

    def _finish(self, record: _Open) -> None:
        if not record.keep:
            return
        end = resident_bytes()
        counters = _device_counters(self.device)
        record.see(end, counters[0] if counters else None)
        high_water = peak_resident_bytes()
        exact = high_water > record.high_water_at_start  # the process's record was set inside this stage
        if exact:
            record.peak = max(record.peak, high_water)
        entry = {"peak_bytes": record.peak, "start_bytes": record.start,
                 "end_bytes": end if end is not None else record.peak, "exact": exact, "cached": record.cached}
        if counters and record.device_peak is not None:
            if counters[1] > record.device_high_water_at_start:
                record.device_peak = max(record.device_peak, counters[1])
            entry.update(device_peak_bytes=record.device_peak, device_start_bytes=record.device_start)
        earlier = self.by_stage.get(record.name)
        if earlier is not None:  # a stage run again (e.g. per correction round): keep the larger peak
            entry["peak_bytes"] = max(entry["peak_bytes"], earlier["peak_bytes"])
            entry["start_bytes"] = earlier["start_bytes"]
            entry["exact"] = entry["exact"] or earlier["exact"]
            if "device_peak_bytes" in earlier:
                entry["device_peak_bytes"] = max(entry.get("device_peak_bytes", 0), earlier["device_peak_bytes"])
        self.by_stage[record.name] = entry

    def summary(self) -> dict:
        """``report.json``'s ``memory``: the process's peaks so far and each stage's."""
        # The kernel's high-water mark lags resident samples by a few pages per thread: take the larger.
        peak = max([peak_resident_bytes()] + [s["peak_bytes"] for s in self.by_stage.values()])
        out = {"peak_bytes": peak, "by_stage": copy.deepcopy(self.by_stage),
               "measure": "resident set size (VmHWM / sampled statm)"}
        counters = _device_counters(self.device)
        if counters:
            out["device_peak_bytes"] = counters[1]
        return out


def gib(n: int | float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def summary_line(memory: dict) -> str:
    """One line for the CLI: the process peak and the stage that set it."""
    stages = memory.get("by_stage", {})
    top = max(stages, key=lambda s: stages[s]["peak_bytes"]) if stages else None
    line = f"peak memory {gib(memory['peak_bytes'])} resident"
    if top is not None:
        line += f" (largest stage: {top}, {gib(stages[top]['peak_bytes'])})"
    if "device_peak_bytes" in memory:
        line += f", {gib(memory['device_peak_bytes'])} on the device"
    return line


def component_bytes(model, analysis, stages: dict) -> dict:
    """What the stages hold, by component, in bytes: the accounting behind the stage peaks.

    Sizes follow from the shapes: float32 gradient sinks (one per target), float64 covariances (one
    per input group), the whitening factors and the float32 factors as kept, one step's logits and
    their gradient. ``activations_per_step`` is what is left of the calibration pass's peak above
    its start and those (autograd's saved activations plus allocator slack); absent when the pass
    came from the cache.
    """
    params = sum(spec.params for spec in analysis.specs)
    covariances = sum(8 * s.shape[0] ** 2 for s in analysis.whitening.values())
    step = analysis.options.micro_batch
    element = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    logits = step * analysis.calibration.seq_len * vocab * element
    out = {"gradient_sinks": 4 * params, "covariances": covariances,
           "whitening": sum(s.numel() * s.element_size() for s in analysis.whitening.values()),
           "factors": sum(t.numel() * t.element_size() for f in analysis.factors.values() for t in (f.U, f.sigma, f.Z)),
           "step_windows": step, "logits_per_step": logits, "logits_gradient_per_step": logits}
    calib = stages.get("calibration_pass")
    if calib is not None and not calib["cached"]:
        rest = out["gradient_sinks"] + covariances + 2 * logits
        out["activations_per_step"] = max(0, calib["peak_bytes"] - calib["start_bytes"] - rest)
    return out
