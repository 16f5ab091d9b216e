"""Loading a checkpoint across devices: ``zssvd.load(DIR, device_map=...)`` through accelerate.

A device map says, per module prefix, where the module lives: an accelerator (``0``, ``"cuda:1"``), the CPU
(``"cpu"``: kept in CPU memory, moved to the execution device for each forward when a GPU computes) or the disk
(``"disk"``: read from the checkpoint's own ``model.safetensors`` for each forward; nothing is copied).
``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` let accelerate's ``infer_auto_device_map``
choose from the free memory of each device (or ``max_memory``).

What is particular to zssvd:

* the sizes accelerate plans with are the packed bytes: the empty model holds each packed module's buffers (on
  the meta device) in their stored dtypes (int8, fp8, uint8 int4 codes, 16-bit tails, fp32 scales), not the
  dense matrix it replaced;
* a packed module is never split: its buffers are one operand of one kernel call, so it is a no-split class
  (and a map naming one of its buffers is refused);
* packed tensors are buffers, so offloading must include buffers (``offload_buffers=True``): otherwise
  accelerate would keep every compressed weight on the execution device;
* tied tensors (a checkpoint's aliases) are one tensor again where both names land on the same device.

accelerate stays optional at import time: it is imported here, on first use, with a one-line error if absent.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..nn import PackedDenseLinear, PackedLowRankLinear, packed_modules

PACKED_CLASSES = (PackedLowRankLinear.__name__, PackedDenseLinear.__name__)
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOADED = ("cpu", "disk")


def assign(model: nn.Module, name: str, value) -> None:
    """Set the parameter, buffer or submodule at dotted ``name`` of ``model`` to ``value``."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, value)


def require_accelerate():
    try:
        import accelerate
    except ImportError as err:
        raise ImportError("loading with a device_map needs accelerate: pip install accelerate") from err
    return accelerate


def no_split_classes(model: nn.Module) -> list[str]:
    """The model's own unsplittable blocks (decoder layers) and the packed modules."""
    return sorted({*(getattr(model, "_no_split_modules", None) or ()), *PACKED_CLASSES})


def check_device(device) -> None:
    """Refuse (one line) a device this machine does not have: ``cuda:1`` with one GPU, any GPU without CUDA."""
    if device in OFFLOADED:
        return
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(f"device_map places modules on {device!r}, but this machine has no {dev.type} device: "
                         "map them to 'cpu' (or 'disk'), or load where the device is")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device_map places modules on {device!r}, but this machine has {count} {dev.type} "
                         f"device(s) (0..{count - 1}): fix the map")


def device_of(device_map: dict, name: str):
    """The device of tensor or module ``name``: the entry of its longest mapped prefix."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    raise ValueError(f"device_map does not place {name}: add an entry for it or one of its parents (or '')")


def check_packed_whole(model: nn.Module, device_map: dict) -> None:
    """A map entry inside a packed module would split its buffers (one kernel operand) across devices."""
    for name in packed_modules(model):
        inside = [key for key in device_map if key.startswith(name + ".")]
        if inside:
            raise ValueError(f"device_map splits the packed module {name} ({inside[0]}): map {name} whole")


def resolve_device_map(model: nn.Module, device_map, max_memory: dict | None = None) -> dict:
    """A full ``{module prefix: device}`` map for the empty (meta) ``model``: an automatic strategy is
    inferred from each device's free memory (or ``max_memory``); a single device maps everything there."""
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = no_split_classes(model)
        if device_map == "sequential":
            memory = get_max_memory(max_memory)
        else:
            memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                           offload_buffers=True)
    elif isinstance(device_map, (str, int, torch.device)):
        device_map = {"": device_map}
    elif not isinstance(device_map, dict):
        raise TypeError(f"device_map must be one of {AUTO_MAPS}, a device or a dict {{module prefix: device}}, "
                        f"got {type(device_map).__name__}")
    device_map = {key: str(value) if isinstance(value, torch.device) else value for key, value in device_map.items()}
    for device in set(device_map.values()):
        check_device(device)
    check_packed_whole(model, device_map)
    return device_map


def _target(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def load_placed(model: nn.Module, weights: Path, device_map: dict, aliases: dict[str, str]) -> dict:
    """Fill the meta ``model`` from ``weights`` as ``device_map`` says; returns the offload index of what is
    mapped to the disk (entries pointing into ``weights`` itself).

    Every tensor takes the dtype its empty tensor has (``cast_model`` may have re-typed the empty model), the
    same conversion ``load`` applies after loading. A tied alias on the same device as its source becomes
    that very tensor again.
    """
    from accelerate.utils import set_module_tensor_to_device

    index = {}
    names = list(model.state_dict(keep_vars=True))
    with safe_open(str(weights), framework="pt") as f:
        # sources before their aliases: an alias on its source's device takes the loaded source itself
        for name in [n for n in names if n not in aliases] + [n for n in names if n in aliases]:
            stored, device = aliases.get(name, name), device_of(device_map, name)
            target = _target(model, name)
            if device == "disk":
                index[name] = {"safetensors_file": str(weights), "weight_name": stored,
                               "dtype": str(target.dtype).removeprefix("torch.")}
                continue
            same = stored != name and device_of(device_map, stored) == device
            value = _target(model, stored) if same else f.get_tensor(stored).to(target.dtype)
            set_module_tensor_to_device(model, name, device, value=value)
            if same:  # set_module_tensor_to_device wrapped it anew: tie the alias to the source itself
                assign(model, name, _target(model, stored))
    return index


def offloading_hook(model: nn.Module, name: str):
    """The accelerate hook that offloads module ``name``'s tensors (on it or on an ancestor, such as its
    decoder block), with the prefix it names them under; (None, None) for a resident module."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        hook = getattr(model.get_submodule(prefix), "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        for h in hooks:
            if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
                return h, prefix
    return None, None


def _offload(model: nn.Module, loader, name: str, value: torch.Tensor, weights: Path,
             stored: str | None = None) -> None:
    """Make ``value`` what the offload hooks read for tensor ``name``: the CPU state of a CPU-offloaded module,
    an entry pointing to checkpoint tensor ``stored`` (default ``name``) in ``weights``, converted to
    ``value``'s dtype, for a disk one."""
    if device_of(getattr(model, "hf_device_map", None) or {"": "cpu"}, name) == "disk":
        loader.state_dict.pop(name, None)  # the state dict has priority over the index
        loader.index[name] = {"safetensors_file": str(weights), "weight_name": stored or name,
                              "dtype": str(value.dtype).removeprefix("torch.")}
    else:
        loader.state_dict[name] = value.to("cpu")
    if name not in loader.all_keys:
        loader.all_keys.append(name)


def _offload_buffers(model: nn.Module, hook, prefix: str, weights: Path) -> None:
    """Make ``hook`` offload its module's buffers too: transformers dispatches with ``offload_buffers=False``
    by default, which would keep every packed weight resident on the execution device. Each persistent
    buffer is offloaded (``_offload``) and leaves a meta tensor behind."""
    if hook.offload_buffers:
        return
    for module_name, module in model.get_submodule(prefix).named_modules():
        for key, value in list(module._buffers.items()):
            if value is None or key in module._non_persistent_buffers_set or value.is_meta:
                continue
            _offload(model, hook.weights_map.dataset, ".".join(p for p in (prefix, module_name, key) if p), value,
                     weights)
            module._buffers[key] = torch.empty_like(value, device="meta")
    hook.offload_buffers = True


def place_offloaded(model: nn.Module, name: str, value: torch.Tensor, weights: Path) -> bool:
    """Put the correct ``value`` of tensor ``name`` (a checkpoint tensor of ``weights``) where accelerate's
    offload hooks read it, and leave a meta tensor in the module. False when the tensor's module is resident."""
    owner, _, key = name.rpartition(".")
    hook, prefix = offloading_hook(model, owner)
    if hook is None:
        return False
    _offload_buffers(model, hook, prefix, weights)
    _offload(model, hook.weights_map.dataset, name, value, weights)
    model.get_submodule(owner)._buffers[key] = torch.empty_like(value, device="meta")
    return True


def offload_aliases(model: nn.Module, weights: Path, aliases: dict[str, str]) -> None:
    """Give the offload hooks the tied aliases they lack: transformers offloads a tied weight to the disk only
    with its source, so a source kept on the CPU left the hook of a disk-mapped alias without a tensor."""
    with safe_open(str(weights), framework="pt") as f:
        for alias, source in aliases.items():
            hook, _ = offloading_hook(model, alias.rpartition(".")[0])
            if hook is not None and alias not in hook.weights_map.dataset.all_keys:
                value = f.get_tensor(source).to(_target(model, alias).dtype)
                _offload(model, hook.weights_map.dataset, alias, value, weights, stored=source)


def dispatch(model: nn.Module, device_map: dict, index: dict) -> nn.Module:
    """accelerate's hooks for a map over several devices (or with the disk); one device: a plain move."""
    from accelerate import dispatch_model

    skip = getattr(model, "_skip_keys_device_placement", None)
    return dispatch_model(model, device_map, offload_index=index or None, offload_buffers=True, skip_keys=skip)
