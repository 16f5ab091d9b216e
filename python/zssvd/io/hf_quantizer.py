"""Hugging Face loading of format-2 checkpoints: a transformers quantizer for ``quant_method: "zssvd"``.

``zssvd.register_hf()`` registers ``ZSSVDQuantizationConfig`` and ``ZSSVDHfQuantizer`` with
transformers' ``register_quantization_config`` / ``register_quantizer`` (the extension point of
third-party quantisation methods). ``AutoModelForCausalLM.from_pretrained(DIR)`` then builds the source
architecture (``LlamaForCausalLM``, ...) and calls the quantizer, which

1. verifies the checkpoint (``checkpoint.verify_checkpoint``: sizes, SHA-256, config.json's block),
   refusing a damaged or edited one with ``CheckpointError``;
2. swaps empty packed modules in for the compressed linears, before transformers loads the weights
   into their buffers under their own names;
3. re-types float factors to the compute dtype when ``dtype=`` asked for another one, before the weights
   are loaded (an offloaded module is offloaded as it will compute);
4. after loading, reads the packed tensors again, as stored: transformers 4.5x casts every float
   tensor of a quantised model to the model dtype (remap's fp16 tails must stay fp16) and renames
   ``*.weight_v`` to ``*.parametrizations.weight.original1`` (a legacy weight-norm rule), so what its
   loader did to them cannot be trusted -- the same model ``zssvd.load(DIR, dtype=...)`` builds.

``device_map=`` ("auto", a dict with several devices, "cpu" and "disk") is allowed: transformers plans with the
packed modules' own bytes and never splits one (they have no children). For a module offloaded to the CPU or
the disk, step 4 puts the tensors where accelerate's hooks read them (``placement.place_offloaded``), and
makes the hooks offload buffers too -- packed tensors are buffers, and transformers' default
``offload_buffers=False`` would keep them all on the execution device.

Written against transformers 5.24 and 4.57: the hooks used here exist in both; the checkpoint
directory comes from ``checkpoint_files`` (5.x) or ``config.name_or_path`` (4.x).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn import packed_modules
from .checkpoint import (CONFIG, FORMAT_VERSION, MANIFEST, QUANT_METHOD, WEIGHTS, CheckpointError, retype_packed,
                         swap_packed, verify_checkpoint)
from .placement import AUTO_MAPS, check_device, check_packed_whole, offload_aliases, place_offloaded

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class ZSSVDQuantizationConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a zssvd checkpoint (see ``checkpoint.quantization_block``)."""

    def __init__(self, format_version: int = FORMAT_VERSION, zssvd_version: str = "", dtype: str = "bfloat16",
                 modules: dict | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.zssvd_version = zssvd_version
        self.dtype = dtype
        self.modules = modules or {}

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "zssvd_version": self.zssvd_version, "dtype": self.dtype, "modules": self.modules}


def checkpoint_directory(model, checkpoint_files=None) -> Path:
    """The local directory of the checkpoint being loaded (a hub id is resolved through the HF cache)."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    candidates = [Path(checkpoint_files[0]).parent] if checkpoint_files else []
    candidates.append(Path(name))
    for directory in candidates:
        if (directory / MANIFEST).is_file():
            return directory
    try:
        from transformers.utils import cached_file

        cached_file(name, CONFIG)
        return Path(cached_file(name, MANIFEST)).parent
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot find {MANIFEST} of the zssvd checkpoint {name!r}: pass the checkpoint's "
                              "directory to from_pretrained") from err


class ZSSVDHfQuantizer(HfQuantizer):
    """Loads zssvd checkpoints (pre-quantized only: compressing happens in ``zssvd compress``)."""

    requires_calibration = True
    requires_parameters_quantization = False  # transformers 4.5x

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.stored_dtype = getattr(torch, quantization_config.dtype)
        self.compute_dtype = self.stored_dtype
        self.directory: Path | None = None
        self.manifest: dict | None = None

    def validate_environment(self, *args, device_map=None, **kwargs):
        devices = device_map.values() if isinstance(device_map, dict) else [device_map]
        for device in devices:
            if device is not None and not (isinstance(device, str) and device in AUTO_MAPS):
                check_device(str(device) if isinstance(device, torch.device) else device)

    def update_dtype(self, dtype):
        # transformers 4.5x passes None when from_pretrained got no dtype: keep the stored one, as zssvd.load does
        self.compute_dtype = dtype if isinstance(dtype, torch.dtype) else self.stored_dtype
        return self.compute_dtype

    def update_torch_dtype(self, dtype):  # transformers < 4.56
        return self.update_dtype(dtype)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        self.directory = checkpoint_directory(model, checkpoint_files)
        self.manifest = verify_checkpoint(self.directory)
        swap_packed(model, self.manifest["modules"], self.stored_dtype)
        if self.compute_dtype != self.stored_dtype:
            # re-typed before loading, so that offloaded modules are offloaded in their compute dtypes
            retype_packed(model, self.compute_dtype)
        if isinstance(device_map, dict):
            check_packed_whole(model, device_map)
        self.packed_dtypes = {f"{name}.{key}": tensor.dtype for name, module in packed_modules(model).items()
                              for key, tensor in module.packed().items()}
        # restore_packed reads the packed tensors; transformers 4.5x's renamed weight_v keys would be reported
        packed = "|".join(re.escape(name) for name in self.manifest["modules"])
        pattern = rf"^(?:{packed})\.(?!bias$)"
        for attribute in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing"):
            existing = getattr(model, attribute, None) or ()
            # a set in transformers 5.x, a list in 4.x
            setattr(model, attribute, {*existing, pattern} if TRANSFORMERS_5 else [*existing, pattern])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        restore_packed(model, self.directory / WEIGHTS, self.packed_dtypes)
        offload_aliases(model, self.directory / WEIGHTS, self.manifest["tied"])
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False  # save with zssvd.save_compressed: it writes the manifest and checksums

    @property
    def is_trainable(self) -> bool:
        return False


@torch.no_grad()
def restore_packed(model, weights: Path, dtypes: dict[str, torch.dtype]) -> None:
    """Read every packed tensor (``{name: dtype}``; not the biases) as stored, converted to ``dtype``: onto the
    device its buffer is on, or where accelerate's offload hooks read it for an offloaded module."""
    with safe_open(str(weights), framework="pt") as f:
        for name, dtype in dtypes.items():
            try:
                stored = f.get_tensor(name).to(dtype)
            except Exception as err:  # safetensors' own error type for a missing name
                raise CheckpointError(f"{weights} has no tensor {name}; re-create the checkpoint") from err
            if place_offloaded(model, name, stored, weights):
                continue
            owner, _, key = name.rpartition(".")
            module = model.get_submodule(owner)
            current = getattr(module, key)
            setattr(module, key, stored.to("cpu" if current.is_meta else current.device))


def register() -> None:
    """Register the quantizer and its config with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(ZSSVDQuantizationConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(ZSSVDHfQuantizer)
