"""Stage 7 (pack) -- replace every target by its compressed module.

A factorised matrix becomes a ``PackedLowRankLinear`` holding U_k sqrt(Sigma_k) and
Z_k sqrt(Sigma_k) (= (sqrt(Sigma_k) V_k^T S^{-1})^T), in the storage the budget paid for:
the model's own float dtype for ``dense``, remap-packed 8/16-bit for ``remap``, fp8 for ``hq``,
4-bit groups for ``int4``. A matrix the selection keeps dense stays the original ``nn.Linear`` --
or, in ``hq`` and ``int4`` mode, becomes a ``PackedDenseLinear`` in fp8 / int4 (round-to-nearest
of the original weight, in groups of the selection's ``group_size``, or of each factor's and
matrix's own when ``stages.precision`` measured them).
"""
from __future__ import annotations

import torch
from torch import nn

from .decompose import Factors
from ..io.models import TargetSet
from ..nn import STORAGES, PackedDenseLinear, PackedLowRankLinear, storage_for_dtype
from .selection import Selection

MODULE_STORAGE = {"remap": "remap", "hq": "fp8", "int4": "int4"}  # "dense" uses the model's dtype
DENSE_STORAGE = {"hq": "fp8", "int4": "int4"}  # matrices kept dense; the other modes keep the nn.Linear


def module_storage(storage: str, model_dtype: torch.dtype) -> str:
    return MODULE_STORAGE.get(storage) or storage_for_dtype(model_dtype)


@torch.no_grad()
def pack_model(model: nn.Module, targets: TargetSet, truncated: dict[str, Factors], selection: Selection) -> dict:
    """Swap compressed modules into ``model`` in place; returns {name: description} of packed modules.

    The replaced ``nn.Linear`` objects are left with empty weights: compress a copy if the original
    model is still needed.
    """
    manifest = {}
    for target in targets:
        options = _options(selection, target.name)
        linear = target.module
        weight, bias = linear.weight, linear.bias
        if selection.dense[target.name]:
            if selection.storage not in DENSE_STORAGE:
                continue  # the original Linear stays
            new = PackedDenseLinear.from_weight(weight.float(), bias, DENSE_STORAGE[selection.storage], **options)
        else:
            U, V = truncated[target.name].to(device=weight.device).balanced_factors()  # pack where it will run
            new = pack_lowrank(U.float(), V.float(), bias, module_storage(selection.storage, weight.dtype), options)
        new.to(weight.device)
        model.set_submodule(target.name, new)
        # The replaced Linear gives up its weight at once (references to the module, e.g. in a TargetSet,
        # would keep it alive), so the model never holds a dense and a packed copy of many matrices.
        linear.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        manifest[target.name] = new.describe()
    return manifest


def _options(selection: Selection, name: str) -> dict:
    """Keyword options of the storage's packers for one target: int4's group size (V^T's or the dense
    weight's), and U's own when the precisions were measured per factor."""
    if selection.storage != "int4":
        return {}
    groups = selection.int4_group_sizes(name)
    if "weight" in groups:
        return {"group_size": groups["weight"]}
    return {"group_size": groups["v"], "u_group_size": groups["u"]}


def pack_lowrank(U: torch.Tensor, V: torch.Tensor, bias, storage: str, options: dict) -> PackedLowRankLinear:
    """W ~= U V^T as a ``PackedLowRankLinear`` in ``storage``, with the packer's ``options`` (int4: group_size)."""
    if not options:
        return PackedLowRankLinear.from_factors(U, V, bias, storage=storage)
    tensors = STORAGES[storage].pack(U, V, **options)  # the packer checks shapes and values
    return PackedLowRankLinear(V.shape[0], U.shape[0], U.shape[1], storage, tensors, bias)


def unpack_model(model: nn.Module) -> nn.Module:
    """Replace every packed module by an ``nn.Linear`` with its de-quantised weight (in place).

    The result computes the same function through plain dense layers: the reference that packed
    kernels and generation are checked against.
    """
    packed = [(name, m) for name, m in model.named_modules() if isinstance(m, (PackedLowRankLinear, PackedDenseLinear))]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for name, module in packed:
        model.set_submodule(name, module.to_linear(dtype))
    return model
