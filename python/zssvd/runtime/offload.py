"""Models larger than the device: decoder blocks streamed to the execution device one at a time.

accelerate's offload hooks keep every weight in CPU memory (``offload="cpu"``) or in memory-mapped
files in a folder (``offload=DIR``) and load a module's weights onto the execution device just
before it runs, dropping them afterwards. Each decoder block is loaded whole (accelerate's
``preload_module_classes``), so the device holds one block's weights at a time plus the
activations. Under activation checkpointing (``gradients.checkpointed_blocks``, entered after this
context) a recomputed block loads its weights again, so the backward needs no resident weights
either. Gradients are taken by ``gradients.weight_gradient_sinks``, which needs no parameter
objects to survive between the forward and the backward.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..io.models import find_blocks


@contextlib.contextmanager
def streamed_blocks(model: nn.Module, blocks_path: str | None, device: torch.device | str,
                    offload: str | None):
    """Offload ``model``'s weights and stream them to ``device`` block by block while inside.

    ``offload`` is None (do nothing), "cpu", or a folder for disk offload (a fresh subfolder is
    made there and removed afterwards). On exit the hooks are removed and every weight is back
    where it was, with the same values.
    """
    if offload is None:
        yield
        return
    from accelerate import cpu_offload, disk_offload
    from accelerate.hooks import remove_hook_from_submodules

    _check_on_cpu(model)
    _, blocks = find_blocks(model, blocks_path)
    block_classes = sorted({type(block).__name__ for block in blocks})
    folder = None
    try:
        if offload == "cpu":
            cpu_offload(model, execution_device=torch.device(device), preload_module_classes=block_classes)
        else:
            Path(offload).mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="zssvd-offload-", dir=offload)
            disk_offload(model, folder, execution_device=torch.device(device), preload_module_classes=block_classes)
        yield
    finally:
        remove_hook_from_submodules(model)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _check_on_cpu(model: nn.Module) -> None:
    elsewhere = {str(p.device) for p in model.parameters() if p.device.type != "cpu"}
    if elsewhere:
        raise ValueError(f"offloading needs the model in CPU memory, but it has weights on {', '.join(sorted(elsewhere))}: "
                         "load it on the CPU (the execution device is given separately, e.g. --device cuda)")
