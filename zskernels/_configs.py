"""The one loader (and writer) of block configurations, kept as data in ``configs/<op>.json``.

A config file maps a GPU name (as ``torch.cuda.get_device_name()`` prints it) to a list of
buckets, each ``{"max_m": M, ...kernel meta-parameters...}``, sorted by ``max_m``; the first
bucket whose ``max_m`` is at least the op's size key (tokens; components for sigma_scores) wins,
and the last bucket takes everything larger. GPUs without an entry use ``"default"``; keys
starting with ``_`` are comments. Configs are read once and chosen on the host before a kernel
launches, so nothing here runs during CUDA-graph capture. ``write_buckets`` is how
``bench/tune_configs.py`` stores tuned buckets for one GPU.

The CPU paths' thresholds live beside them in ``configs/cpu_routes.json``: one flat entry per CPU, keyed by
its model name as /proc/cpuinfo gives it, else by its vendor id, else ``"default"`` (``cpu_route_setting``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import _device

CONFIG_DIR = Path(__file__).with_name("configs")
_FORCED: dict[str, dict] = {}  # op -> config every pick returns (use_config)


def _path(op: str, config_dir: Optional[Path]) -> Path:
    return Path(config_dir or CONFIG_DIR) / f"{op}.json"


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no block configs for op {path.stem!r}: expected {path}") from err
    if "default" not in table:
        raise ValueError(f"{path} has no 'default' entry")
    for gpu, buckets in table.items():
        if gpu.startswith("_"):
            continue  # comments
        if not buckets or any("max_m" not in b for b in buckets):
            raise ValueError(f"{path}: every bucket of {gpu!r} needs a 'max_m'")
    return table


def table(op: str, config_dir: Optional[Path] = None) -> dict:
    """The whole config file of ``op`` (cached; ``config_dir`` defaults to ``zskernels/configs``)."""
    return _load(_path(op, config_dir))


def pick_config(op: str, size: int, device: torch.device, config_dir: Optional[Path] = None) -> dict:
    """Meta-parameters for ``op`` at ``size`` (its bucket key) on ``device``; a fresh dict."""
    if op in _FORCED:
        return dict(_FORCED[op])
    tab = table(op, config_dir)
    buckets = tab.get(_device.device_name(device), tab["default"])
    chosen = next((b for b in buckets if size <= b["max_m"]), buckets[-1])
    return {k: v for k, v in chosen.items() if k != "max_m"}


CPU_ROUTES = "cpu_routes"


def cpu_route_setting(key: str, config_dir: Optional[Path] = None):
    """One CPU path threshold for this CPU (e.g. "int4_kernel_min_rows"): from the entry of its model name, else
    of its vendor id, else of "default"; an environment variable ZSKERNELS_<KEY> overrides it (an int, or
    "none")."""
    override = os.environ.get(f"ZSKERNELS_{key.upper()}")
    if override is not None:
        return _cpu_setting_value(key, override)
    from . import _cpu_kernel

    info = _cpu_kernel.cpu_info()
    tab = _load_cpu_routes(_path(CPU_ROUTES, config_dir))
    for name in (info.get("model name"), info.get("vendor_id"), "default"):
        if name in tab and key in tab[name]:
            return tab[name][key]
    raise KeyError(f"{_path(CPU_ROUTES, config_dir)} has no {key!r} in its 'default' entry")


def _cpu_setting_value(key: str, text: str) -> Optional[int]:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"ZSKERNELS_{key.upper()}={text!r}: give a whole number of rows, or none") from None


@functools.lru_cache(maxsize=None)
def _load_cpu_routes(path: Path) -> dict:
    table = json.loads(path.read_text())
    if "default" not in table:
        raise ValueError(f"{path} has no 'default' entry")
    return {name: entry for name, entry in table.items() if not name.startswith("_")}


@contextlib.contextmanager
def use_config(op: str, config: dict) -> Iterator[None]:
    """Every pick for ``op`` returns ``config`` inside the block (tests force a path; tuning times one)."""
    saved = _FORCED.get(op)
    _FORCED[op] = dict(config)
    try:
        yield
    finally:
        if saved is None:
            _FORCED.pop(op, None)
        else:
            _FORCED[op] = saved


def write_buckets(op: str, gpu: str, buckets: list[dict], config_dir: Optional[Path] = None) -> Path:
    """Store ``buckets`` as ``gpu``'s entry of ``op``'s config file (other entries kept); returns the path.

    Buckets are sorted by ``max_m`` and checked as the loader checks them; the file is written
    next to itself and renamed, so a reader never sees half of it.
    """
    if gpu.startswith("_") or gpu == "default":
        raise ValueError(f"tuned configs need a GPU name, got {gpu!r}")
    buckets = sorted((dict(b) for b in buckets), key=lambda b: b["max_m"])
    path = _path(op, config_dir)
    tab = json.loads(path.read_text())
    tab[gpu] = buckets
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(tab, indent=2) + "\n")
    os.replace(tmp, path)
    _load.cache_clear()
    table(op, config_dir)  # validates what was written
    return path
