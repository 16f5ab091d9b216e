"""On-disk cache of the expensive stages (covariances + gradients, whitened factors).

Each entry is a directory ``<root>/<stage>-<key>/`` holding safetensors files and a
``meta.json``; the key hashes everything the stage depends on (model weights, calibration
tokens, settings), so other ratios and strategies reuse it. Entries are written to a
temporary directory and renamed into place, so an interrupted run never leaves a partial
entry behind: an entry either exists whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class StageCache:
    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}"

    def load(self, stage: str, key: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
        """``({file: tensors}, meta)`` of a complete entry, or None."""
        if not self.enabled:
            return None
        entry = self.path(stage, key)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            files = {name: load_file(entry / f"{name}.safetensors") for name in meta.get("files", [])}
        except (OSError, ValueError, SafetensorError) as error:  # damaged on disk: recompute, never trust it
            log.warning("ignoring the unreadable cache entry %s (%s); it will be recomputed", entry, error)
            return None
        return files, meta

    def store(self, stage: str, key: str, files: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        """Write an entry; a full disk or a write error only costs the cache, never the run."""
        if not self.enabled:
            return
        entry = self.path(stage, key)
        need = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if need + (1 << 30) > free:
            log.warning("not caching the %s stage: it needs %.1f GB but %s has %.1f GB free (--cache-dir elsewhere, "
                        "or 'none')", stage, need / 1e9, self.root, free / 1e9)
            return
        tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            for name, tensors in files.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
            (tmp / "meta.json").write_text(json.dumps({**meta, "files": list(files)}, indent=1))
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not cache the %s stage in %s (%s); the run goes on without it", stage, self.root, error)
            return
        if entry.exists():  # a concurrent run got there first; keep its complete entry
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, entry)
