"""On-disk cache of the expensive stages (covariances + gradients, whitened factors).

Each entry is a directory ``<root>/<stage>-<key>/`` holding safetensors files and a
``meta.json``; the key hashes everything the stage depends on (model weights, calibration
tokens, settings), so other ratios and strategies reuse it. Entries are written to a
temporary directory and renamed into place, so an interrupted run never leaves a partial
entry behind: an entry either exists whole or not at all.

``meta.json`` records the SHA-256 of every tensor file and of its own contents. An entry that
fails a check (a flipped bit, a truncated file, an entry without checksums from an older
version) is never used: it is removed with a warning that names it, and the stage is recomputed.
A cache directory that cannot be created or written is found before any work (``usable``) and
costs only the cache.
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

from ..io.checkpoint import file_sha256, remove_stale_temporaries

log = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _meta_digest(meta: dict) -> str:
    """Checksum of an entry's metadata (everything in meta.json but this checksum itself)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _BadEntry(ValueError):
    """A cache entry that exists but fails its checks."""


def _check_entry(entry: Path, meta: dict) -> None:
    if "meta_sha256" not in meta or "sha256" not in meta:
        raise _BadEntry("it has no checksums (written by an older zssvd)")
    if meta["meta_sha256"] != _meta_digest(meta):
        raise _BadEntry("meta.json does not match its checksum")
    for name in meta["files"]:
        if file_sha256(entry / f"{name}.safetensors") != meta["sha256"].get(name):
            raise _BadEntry(f"{name}.safetensors does not match its checksum")


class StageCache:
    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def usable(self) -> bool:
        """Check, before any work, that the cache directory can be written; if not, warn and disable it."""
        if not self.enabled:
            return False
        probe = self.root / f".probe{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
            remove_stale_temporaries(self.root)  # entries half-written by killed runs
        except OSError as error:
            log.warning("the cache directory %s cannot be used (%s); running without a cache (--cache-dir "
                        "elsewhere, or 'none')", self.root, error)
            self.root = None
            return False
        return True

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
            _check_entry(entry, meta)
            files = {name: load_file(entry / f"{name}.safetensors") for name in meta["files"]}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            # damaged on disk: never trusted; removed so that the recomputed entry can take its place
            log.warning("ignoring the unreadable cache entry %s (%s); it will be recomputed", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        meta = {k: v for k, v in meta.items() if k not in ("sha256", "meta_sha256")}
        return files, meta

    def store(self, stage: str, key: str, files: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        """Write an entry; a full disk or a write error only costs the cache, never the run."""
        if not self.enabled:
            return
        entry = self.path(stage, key)
        need = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
        except OSError as error:
            log.warning("could not cache the %s stage in %s (%s); the run goes on without it", stage, self.root, error)
            return
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
            meta = {**meta, "files": list(files),
                    "sha256": {name: file_sha256(tmp / f"{name}.safetensors") for name in files}}
            meta["meta_sha256"] = _meta_digest(meta)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("could not cache the %s stage in %s (%s); the run goes on without it", stage, self.root, error)
            return
        try:
            os.replace(tmp, entry)
        except OSError:  # a concurrent run got there first (the rename of a folder onto a full one fails)
            pass  # its complete entry stays
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
