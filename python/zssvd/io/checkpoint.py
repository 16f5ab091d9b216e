"""Saving and loading compressed models: safetensors + JSON, never pickle.

A checkpoint directory (format version 2, written by ``save_compressed``) holds

* ``config.json``: the source model's own config (``model_type: "llama"``, ``architectures:
  ["LlamaForCausalLM"]``, ...) whose ``dtype`` names the 16-bit storage type, plus a
  ``quantization_config`` block: ``{"quant_method": "zssvd", "format_version": 2, "zssvd_version",
  "dtype", "modules": {<module name>: <description>}}``. The descriptions are the packed modules'
  ``describe()``; modules not listed are ordinary weights. Hugging Face reads it through the
  quantizer in ``hf_quantizer.py``, vLLM through ``zssvd.io.vllm``;
* ``model.safetensors``: every tensor -- untouched weights, packed buffers as ``<module>.<tensor>``
  -- with tied tensors stored once;
* ``zssvd.json``: the manifest: format version, dtype, the module descriptions, tied-tensor aliases,
  each weight file's size and SHA-256, and the SHA-256 of config.json's ``quantization_config``
  block and of the whole config (canonical JSON), so that an edited config.json is refused;
* ``report.json``: what the compression did (see ``report.build_report``), tokenizer files.

Storage dtype: float factors, biases and every untouched float weight are stored in 16 bits whatever
dtype the computation used: float16 if the source model was float16, bfloat16 otherwise
(``storage_dtype``); remap's 16-bit tails too. int8 / fp8 tensors, the fp32 per-component (per-row)
scales and int4's codes with their float16 scales and minimums are stored as packed.

Format version 1 (config.json ``model_type: "zssvd"`` around the base config, remote code; see
``hf_config.py``) is still read by ``load``. ``verify_checkpoint`` is the check every loader runs
first: a missing, truncated, altered or edited checkpoint is refused with ``CheckpointError``.

Every file is written to a temporary and renamed into place (``write_atomically``), and ``zssvd.json``
is removed before the other files are written and written after them: a killed save leaves a
directory that every loader refuses, never a half-written file or a mix of two saves.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..nn import (PackedDenseLinear, PackedLowRankLinear, describe_packed, module_from_description, packed_modules,
                  storage_for_dtype)
from ..nn.packed_linear import DTYPE_NAMES, FLOAT_STORAGES
from .models import EMBEDDED_DEFAULT, embedded_default_path
from .placement import assign

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANT_METHOD = "zssvd"
MANIFEST = "zssvd.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Float dtypes a checkpoint may re-type (fp8 is a float dtype too, but a quantised one: never cast).
CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """The directory is not a valid zssvd checkpoint (missing, corrupt, altered or mismatched)."""


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def block_sha256(block: dict) -> str:
    """SHA-256 of a JSON object in canonical form (sorted keys, no spaces): independent of indentation."""
    return hashlib.sha256(json.dumps(block, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------- dtypes


def _config_dtype(config: dict) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).replace("torch.", "") if value is not None else None


def source_dtype(config) -> str | None:
    """The dtype the source model was stored in: its config.json on disk when the model came from a local
    directory (a model loaded in float32 reports float32 in memory), else the in-memory config's dtype."""
    path = Path(getattr(config, "name_or_path", "") or "") / CONFIG
    if path.is_file():
        try:
            stored = _config_dtype(json.loads(path.read_text()))
            if stored is not None:
                return stored
        except json.JSONDecodeError:
            pass
    return _config_dtype(config.to_dict())


def storage_dtype(config) -> torch.dtype:
    """The 16-bit type a checkpoint stores float tensors in: float16 for a float16 source, else bfloat16
    (bfloat16 keeps float32's range, so a float32, bfloat16 or quantised (GGUF) source never overflows)."""
    return torch.float16 if source_dtype(config) == "float16" else torch.bfloat16


REMAP_TAILS = ("v_tail", "u_tail")
REMAP_TAIL_DTYPES = (torch.float16, torch.bfloat16)


def retyped_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its float factors and bias in ``dtype`` (a new module; ``module`` is unchanged).

    A float-storage low-rank module changes storage (fp32 -> bf16, ...); a remap module's 16-bit tails
    take a 16-bit ``dtype`` (they are float factors: a bf16 checkpoint stores them in bf16, and a bf16
    computation reads them without a per-call conversion); 8-bit tensors and scales stay as packed.
    """
    bias = module.bias.detach().to(dtype) if module.bias is not None else None
    tensors = module.packed()
    if isinstance(module, PackedLowRankLinear):
        storage = module.storage
        if storage in FLOAT_STORAGES:
            storage = storage_for_dtype(dtype)
            tensors = {name: t.to(dtype) for name, t in tensors.items()}
        elif storage == "remap" and dtype in REMAP_TAIL_DTYPES:
            tensors = {name: t.to(dtype) if name in REMAP_TAILS else t for name, t in tensors.items()}
        return PackedLowRankLinear(module.in_features, module.out_features, module.rank, storage, tensors, bias)
    if isinstance(module, PackedDenseLinear):
        return PackedDenseLinear(module.in_features, module.out_features, module.storage, tensors, bias)
    raise TypeError(f"not a packed module: {type(module).__name__}")


def retype_packed(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every packed module of ``model`` by its ``retyped_module`` (in place, same device)."""
    for name, module in list(packed_modules(model).items()):
        model.set_submodule(name, retyped_module(module, dtype).to(next(module.buffers()).device))
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a loaded model to a compute ``dtype`` in place: float weights, float factors and biases;
    remap tails when ``dtype`` is 16-bit; never int8 / fp8 tensors or scales, nor non-persistent buffers
    such as rotary ``inv_freq`` (which ``nn.Module.to(dtype)`` would cast; packed modules' own buffers
    survive that cast, ``_PackedBase._apply``)."""
    retype_packed(model, dtype)
    packed = set(packed_modules(model).values())
    for module in model.modules():
        if module in packed:
            continue
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None and t.dtype in CASTABLE and key not in module._non_persistent_buffers_set:
                    t.data = t.data.to(dtype)
    return model


# ----------------------------------------------------------------------------- saving


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


def stored_state(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(tensors as stored, tied aliases, module descriptions) of ``model`` with float data in ``dtype``.

    The model itself is not changed: packed modules are re-typed copies, other tensors cast copies.
    """
    retyped = {name: retyped_module(m, dtype) for name, m in packed_modules(model).items()}
    state, aliases = _unique_state(model)
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        if owner in retyped:
            state[key] = getattr(retyped[owner], attr).detach().contiguous().cpu()
        elif tensor.dtype in CASTABLE:
            state[key] = tensor.to(dtype)
    return state, aliases, {name: m.describe() for name, m in retyped.items()}


def quantization_block(modules: dict, dtype: torch.dtype) -> dict:
    """config.json's ``quantization_config``: what transformers and vLLM dispatch on."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "zssvd_version": __version__,
            "dtype": DTYPE_NAMES[dtype], "modules": modules}


def checkpoint_config(model: nn.Module, block: dict) -> dict:
    """The source model's config as a dict, typed as stored, with our ``quantization_config``."""
    config = model.config.to_dict()
    for key in ("quantization_config", "auto_map", "_name_or_path", "torch_dtype"):
        config.pop(key, None)  # a GGUF source's quantization leftovers; local paths; the legacy dtype key
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])  # where transformers 4.x (vLLM's pins) reads it
    config["architectures"] = list(model.config.architectures or [type(model).__name__])
    config["dtype"] = block["dtype"]
    config["quantization_config"] = block
    return config


# ----------------------------------------------------------------------------- byte counts


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def source_params(model: nn.Module) -> int:
    """Parameters (and persistent buffer elements) of the uncompressed model: each packed module counts
    as the dense matrix it replaced; tied tensors count once."""
    packed = describe_packed(model)
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        owner, _, attr = name.rpartition(".")
        if owner in packed and attr != "bias" or t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel()
    return total + sum(d["in_features"] * d["out_features"] for d in packed.values())


def source_file_bytes(source: str | os.PathLike | None) -> int | None:
    """Bytes of the source's weight files on disk (a local file, or a model directory's weight files);
    None for a hub id or an unknown source."""
    if not source:
        return None
    if str(source) in ("default", "smollm2", EMBEDDED_DEFAULT):
        try:
            source = embedded_default_path()
        except FileNotFoundError:
            return None
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        files = [f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
        return sum(f.stat().st_size for f in files) or None
    return None


def checkpoint_bytes(model: nn.Module, manifest: dict, state: dict[str, torch.Tensor], source: str | None) -> dict:
    """report.json's ``bytes``: the checkpoint's weight files (and their tensors: what loading them in the
    stored dtype takes) against the source model, on disk and at 16 bits per parameter."""
    return {"checkpoint": sum(f["bytes"] for f in manifest["files"].values()),
            "checkpoint_dtype": manifest["dtype"],
            "tensors": sum(t.numel() * t.element_size() for t in state.values()),
            "source_files": source_file_bytes(source or getattr(model.config, "name_or_path", None)),
            "source_16bit": 2 * source_params(model)}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, report: dict | None = None,
                    manifest: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a loadable checkpoint (format version 2) of a compressed ``model`` to ``out_dir``.

    Float tensors are stored in ``dtype`` (default ``storage_dtype``: the 16-bit type of the source);
    the model is not changed. The module descriptions come from the packed modules themselves
    (``describe()``); ``manifest`` overrides them (for tests of foreign or damaged descriptions).
    ``report`` is written to report.json with the checkpoint's bytes added (``report["bytes"]``, also
    set in the dict passed in).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    # zssvd.json goes first and comes back last: a directory caught between the two (a killed run, a full
    # disk) is "not a zssvd checkpoint" to every loader, never a mix of old and new files.
    (out / MANIFEST).unlink(missing_ok=True)
    dtype = dtype or storage_dtype(model.config)
    state, aliases, modules = stored_state(model, dtype)
    if manifest is not None:
        modules = manifest
    block = quantization_block(modules, dtype)
    config = checkpoint_config(model, block)
    _write_json(out / CONFIG, config)
    for stale in ("configuration_zssvd.py", "modeling_zssvd.py"):  # a format-1 checkpoint's remote code
        (out / stale).unlink(missing_ok=True)
    # One metadata key: safetensors writes the metadata map in hash order, so with two keys the same tensors
    # gave different bytes from run to run. The format version is in zssvd.json and config.json.
    write_atomically(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    description = {
        "format_version": FORMAT_VERSION,
        "zssvd_version": __version__,
        "architecture": config["architectures"][0],
        "dtype": block["dtype"],
        "modules": modules,
        "tied": aliases,
        "files": {WEIGHTS: {"bytes": (out / WEIGHTS).stat().st_size, "sha256": file_sha256(out / WEIGHTS)}},
        "quantization_config_sha256": block_sha256(block),
        "config_sha256": block_sha256(config),  # any other edit (architecture, sizes, rope...) is refused too
    }
    description[MANIFEST_SHA256] = manifest_sha256(description)
    _write_json(out / MANIFEST, description)
    if report is not None:
        report["bytes"] = checkpoint_bytes(model, description, state, report.get("model"))
        _write_json(out / "report.json", report)
    return out


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` as indented JSON, written atomically (``write_atomically``)."""
    _write_json(Path(path), data)


TEMPORARY = re.compile(r"\.tmp(\d+)$")  # what write_atomically and the stage cache name their partial files


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary beside ``path``, then rename it into place: a reader sees the old file or
    the new one, never half of one, even when the writer is killed (the temporary is named by the writer's
    process id, so two writers never share one)."""
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_tokenizer(tokenizer, out: Path) -> None:
    """``tokenizer.save_pretrained(out)``, each file renamed into place whole."""
    staging = _temporary(out / ".tokenizer")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer.save_pretrained(staging)
        for item in sorted(staging.iterdir()):
            if item.is_dir():
                shutil.rmtree(out / item.name, ignore_errors=True)
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(directory: Path) -> None:
    """Remove the partial files and folders (``<name>.tmp<pid>``) that killed writers left in ``directory``;
    those of live processes are theirs to finish."""
    for item in directory.iterdir() if directory.is_dir() else ():
        match = TEMPORARY.search(item.name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- verifying


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is not a zssvd checkpoint: {path.name} is missing; {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt: re-create it") from err


def read_manifest(directory: str | os.PathLike) -> dict:
    manifest = _read_json(Path(directory) / MANIFEST, "save it with zssvd.save_compressed or `zssvd compress`")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{Path(directory) / MANIFEST} has format version {manifest.get('format_version')}, "
                              f"this zssvd reads versions {READABLE_VERSIONS}; upgrade zssvd or re-create the "
                              "checkpoint")
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


MANIFEST_SHA256 = "manifest_sha256"


def manifest_sha256(manifest: dict) -> str:
    """The manifest's checksum of itself: canonical JSON of every other field (dtype, tied aliases, ...)."""
    return block_sha256({k: v for k, v in manifest.items() if k != MANIFEST_SHA256})


def _verify_manifest(directory: Path, manifest: dict) -> None:
    # Checkpoints written before zssvd.json carried its own checksum lack the field; their module
    # descriptions are still checked against config.json's block.
    recorded = manifest.get(MANIFEST_SHA256)
    if recorded is not None and recorded != manifest_sha256(manifest):
        raise CheckpointError(f"{directory / MANIFEST} does not match its own SHA-256: zssvd.json was edited after "
                              "saving; restore it or re-create the checkpoint")


def _verify_config(directory: Path, manifest: dict) -> dict:
    """config.json of a format-2 checkpoint against its manifest; returns the config."""
    config = _read_json(directory / CONFIG, "copy it from the original checkpoint")
    block = config.get("quantization_config")
    if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{directory / CONFIG} has no zssvd quantization_config; restore config.json "
                              "from the original checkpoint or re-create it")
    if block_sha256(block) != manifest.get("quantization_config_sha256") or block["modules"] != manifest["modules"]:
        raise CheckpointError(f"{directory / CONFIG}: quantization_config does not match its SHA-256 in "
                              f"{MANIFEST}: config.json was edited; restore it or re-create the checkpoint")
    if block_sha256(config) != manifest.get("config_sha256"):
        raise CheckpointError(f"{directory / CONFIG} does not match its SHA-256 in {MANIFEST}: config.json was "
                              "edited after saving; restore it or re-create the checkpoint")
    return config


def verify_checkpoint(directory: str | os.PathLike, *, checksums: bool = True) -> dict:
    """The manifest of a checkpoint after checking it: format version, weight files' sizes and (unless
    ``checksums=False``) SHA-256, and for format 2 config.json's quantization_config against the manifest.

    Raises ``CheckpointError`` for a missing, truncated, altered or edited checkpoint. Every loader
    (``load``, the transformers quantizer, vLLM) calls it.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, checksums=checksums)
    if manifest["format_version"] >= 2:
        _verify_config(directory, manifest)
        _verify_manifest(directory, manifest)
    return manifest


# ----------------------------------------------------------------------------- loading


def base_config(directory: Path, manifest: dict):
    """The source architecture's config (``PretrainedConfig``) without zssvd's parts."""
    from transformers import AutoConfig

    config = _read_json(directory / CONFIG, "copy it from the original checkpoint")
    base = dict(config["base_config"]) if manifest["format_version"] == 1 else dict(config)
    for key in ("quantization_config", "auto_map"):
        base.pop(key, None)
    return AutoConfig.for_model(base.pop("model_type"), **base)


def swap_packed(model: nn.Module, modules: dict, dtype: torch.dtype) -> nn.Module:
    """Replace the modules named in ``modules`` by empty packed modules built from their descriptions."""
    for name, desc in modules.items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"{MANIFEST} names module {name}, which the {model.config.model_type} "
                                  "architecture does not have; the checkpoint does not fit this model") from err
        try:
            model.set_submodule(name, module_from_description(desc, bias_dtype=dtype))
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{MANIFEST}: module {name} has an unreadable description ({err}); "
                                  "re-create the checkpoint") from err
    return model


def build_empty_model(directory: Path, manifest: dict):
    """The base architecture with parameters on the meta device and packed modules swapped in."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = base_config(directory, manifest)
    dtype = getattr(torch, manifest["dtype"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return swap_packed(model, manifest["modules"], dtype)


def load(directory: str | os.PathLike, *, device: str | torch.device | None = None, verify: bool = True,
         dtype: torch.dtype | None = None, device_map=None, max_memory: dict | None = None) -> nn.Module:
    """Load a compressed model written by ``save_compressed`` (or ``zssvd compress``), format 1 or 2.

    ``device``: the one device to load onto (default the CPU). ``device_map``: place modules on several
    devices instead (``placement.py``): "auto", "balanced", "balanced_low_0", "sequential" (accelerate infers
    the map from each device's free memory, or ``max_memory`` such as ``{0: "20GiB", "cpu": "60GiB"}``), a
    device, or a dict ``{module prefix: device}`` whose devices may include "cpu" and "disk" (offloaded:
    moved to the execution device for each forward; disk-offloaded tensors are read from the checkpoint's
    own weight file). Packed modules are placed whole; the logits are those of a one-device load.
    ``dtype``: cast float weights, float factors and biases to this compute dtype (``cast_model``);
    default: keep the stored dtype.
    """
    if device is not None and device_map is not None:
        raise ValueError("pass device (one device) or device_map (several), not both")
    directory = Path(directory)
    manifest = verify_checkpoint(directory, checksums=verify)
    model = build_empty_model(directory, manifest)
    if device_map is not None:
        return _load_placed(directory, manifest, model, dtype, device_map, max_memory)
    state = _read_weights(directory / WEIGHTS)
    _check_shapes(model, state, manifest)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    _check_keys(missing, unexpected, manifest)
    _tie_aliases(model, manifest)
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftovers:
        raise CheckpointError(f"the checkpoint leaves these tensors unset: {leftovers[:5]}")
    if dtype is not None:
        cast_model(model, dtype)
    return model.to(device or "cpu").eval()


def _tie_aliases(model: nn.Module, manifest: dict) -> None:
    """Each tied alias (``lm_head.weight`` of tied embeddings, ...) set to its source tensor itself."""
    for alias, source in manifest["tied"].items():
        assign(model, alias, model.get_parameter(source) if source in dict(model.named_parameters())
                else model.get_buffer(source))


def _check_keys(missing, unexpected, manifest: dict) -> None:
    missing = [k for k in missing if k not in manifest["tied"]]
    if missing or unexpected:
        raise CheckpointError(f"{WEIGHTS} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def _load_placed(directory: Path, manifest: dict, model: nn.Module, dtype: torch.dtype | None, device_map,
                 max_memory: dict | None) -> nn.Module:
    """``load`` with a device map: the weights go straight from the file to their devices (or stay in it)."""
    from . import placement

    placement.require_accelerate()
    layout = _stored_layout(directory / WEIGHTS)
    _check_shapes(model, layout, manifest)
    expected = set(model.state_dict())
    _check_keys(sorted(expected - set(layout)), sorted(set(layout) - expected), manifest)
    for module in packed_modules(model).values():
        module.to("meta")  # the plan counts their bytes; no memory is taken before they are placed
    _tie_aliases(model, manifest)  # the plan counts a tied tensor once and keeps its names together
    if dtype is not None:
        cast_model(model, dtype)  # the empty tensors take the compute dtypes, which loading converts to
    device_map = placement.resolve_device_map(model, device_map, max_memory)
    index = placement.load_placed(model, directory / WEIGHTS, device_map, manifest["tied"])
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                 if p.is_meta and n not in index]
    if leftovers:
        raise CheckpointError(f"the checkpoint leaves these tensors unset: {leftovers[:5]}")
    return placement.dispatch(model, device_map, index).eval()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _stored_layout(path: Path) -> dict[str, torch.Tensor]:
    """Each stored tensor as an empty meta tensor of its shape and dtype, read from the file's header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: torch.empty(s.get_shape(), dtype=SAFETENSORS_DTYPES[s.get_dtype()], device="meta")
                    for name, s in slices.items()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"cannot read {path}: {err}; the file is corrupt") from err


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


