"""Block configurations kept as data (``zskernels/configs/<op>.json``), chosen by token count.

A config file maps a GPU name (as ``torch.cuda.get_device_name()`` prints it) to a list of
buckets, each ``{"max_m": M, ...kernel meta-parameters...}``, sorted by ``max_m``; the first
bucket whose ``max_m`` is at least the number of tokens wins, and the last bucket takes
everything larger. GPUs without an entry use ``"default"``. Configs are read once and
chosen on the host before a kernel launches, so nothing here runs during CUDA-graph capture.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")


@functools.lru_cache(maxsize=None)
def _table(op: str) -> dict:
    path = CONFIG_DIR / f"{op}.json"
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no block configs for op {op!r}: expected {path}") from err
    if "default" not in table:
        raise ValueError(f"{path} has no 'default' entry")
    for gpu, buckets in table.items():
        if gpu.startswith("_"):
            continue  # comments
        if not buckets or any("max_m" not in b for b in buckets):
            raise ValueError(f"{path}: every bucket of {gpu!r} needs a 'max_m'")
    return table


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def pick_config(op: str, num_tokens: int, device: torch.device) -> dict:
    """Meta-parameters for ``op`` at ``num_tokens`` rows of input on ``device``."""
    table = _table(op)
    buckets = table.get(_device_name(device), table["default"])
    for bucket in buckets:
        if num_tokens <= bucket["max_m"]:
            return {k: v for k, v in bucket.items() if k != "max_m"}
    return {k: v for k, v in buckets[-1].items() if k != "max_m"}
