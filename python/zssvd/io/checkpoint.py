"""Saving and loading compressed models: safetensors + JSON, never pickle.

A checkpoint directory holds

* ``config.json``: a ``zssvd`` config wrapping the base model's (see ``hf_config.py``), two small remote-code
  files so that ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works, and
  the tokenizer files;
* ``model.safetensors``: every tensor of the compressed model -- untouched weights, packed
  buffers of the compressed modules -- with tied tensors stored once;
* ``zssvd.json``: the manifest: format version, one JSON description per compressed module
  (shapes, rank, storage, tensor layout, bytes), tied-tensor aliases, and each weight file's
  size and SHA-256;
* ``report.json``: what the compression did (see ``report.build_report``).

``load`` rebuilds the base architecture without allocating its weights, swaps in empty
packed modules from their descriptions, checks every stored tensor against them, and loads.
A truncated, altered or mismatched file is refused with an error that says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..nn import describe_packed, module_from_description
from .hf_config import REMOTE_CODE, ZSSVDConfig, wrapped_config

FORMAT_VERSION = 1
MANIFEST = "zssvd.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """The directory is not a valid zssvd checkpoint (missing, corrupt, altered or mismatched)."""


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once, and the aliases that point to it."""
    state, aliases, first = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else (name,)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state, aliases


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
                    manifest: dict | None = None) -> Path:
    """Write a loadable checkpoint of a compressed ``model`` to ``out_dir``.

    The manifest's module descriptions come from the packed modules themselves (``describe()``);
    ``manifest`` overrides them (for tests of foreign or damaged descriptions).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = manifest if manifest is not None else describe_packed(model)
    config = model.config
    wrapped_config(config).save_pretrained(out)
    for name, code in REMOTE_CODE.items():
        (out / name).write_text(code)
    state, aliases = _unique_state(model)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "zssvd_format": str(FORMAT_VERSION)})
    os.replace(tmp, out / WEIGHTS)
    description = {
        "format_version": FORMAT_VERSION,
        "zssvd_version": __version__,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "modules": modules,
        "tied": aliases,
        "files": {WEIGHTS: {"bytes": (out / WEIGHTS).stat().st_size, "sha256": file_sha256(out / WEIGHTS)}},
    }
    (out / MANIFEST).write_text(json.dumps(description, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a zssvd checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('format_version')}, this zssvd reads "
                              f"version {FORMAT_VERSION}; upgrade zssvd or re-create the checkpoint")
    return manifest


def verify_files(directory: Path, manifest: dict, checksums: bool = True) -> None:
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes but the manifest says {info['bytes']}: "
                                  "the file is truncated or was altered; copy or re-create it")
        if checksums and file_sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST}: the file was altered "
                                  "or corrupted; copy or re-create it")


def build_empty_model(directory: Path, manifest: dict):
    """The base architecture with parameters on the meta device and packed modules swapped in."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = ZSSVDConfig.from_pretrained(directory).to_base()
    dtype = getattr(torch, manifest["dtype"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, desc in manifest["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"{MANIFEST} names module {name}, which the {config.model_type} "
                                  "architecture does not have") from err
        model.set_submodule(name, module_from_description(desc, bias_dtype=dtype))
    return model


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Load a compressed model written by ``save_compressed`` (or ``zssvd compress``)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, checksums=verify)
    model = build_empty_model(directory, manifest)
    state = _read_weights(directory / WEIGHTS)
    _check_shapes(model, state, manifest)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in manifest["tied"]]
    if missing or unexpected:
        raise CheckpointError(f"{WEIGHTS} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for alias, source in manifest["tied"].items():
        _assign(model, alias, model.get_parameter(source) if source in dict(model.named_parameters())
                else model.get_buffer(source))
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftovers:
        raise CheckpointError(f"the checkpoint leaves these tensors unset: {leftovers[:5]}")
    return model.to(device).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"cannot read {path}: {err}; the file is corrupt") from err


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], manifest: dict) -> None:
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in state.items():
        if name in expected and (tuple(expected[name].shape) != tuple(tensor.shape)
                                 or expected[name].dtype != tensor.dtype and not expected[name].is_meta):
            raise CheckpointError(f"{name}: stored {tuple(tensor.shape)} {tensor.dtype}, expected "
                                  f"{tuple(expected[name].shape)} {expected[name].dtype} from {MANIFEST}")


def _assign(model: nn.Module, name: str, value) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, value)

