"""vLLM linear method for zssvd checkpoints: packed buffers per fused shard, tensor-parallel slices.

``create_weights`` registers, for every tensor name the layer's checkpoint modules store
(``weight_u``, ``v_q``, ``weight_fp8``, ``weight``, ...), an empty placeholder parameter whose
``weight_loader`` receives each checkpoint tensor (``(param, w, shard_id)`` from fused layers,
``(param, w)`` from the others, the shard id then read from ``w.shard_id``) and keeps this rank's
slice of it (``sharding.slice_module``). ``process_weights_after_loading`` checks that every
tensor arrived, builds the layer's ``FusedParts`` and registers its tensors as buffers;
``apply`` is ``FusedParts.forward`` (the zskernels ops on the GPU, their torch paths on the CPU).
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear, ColumnParallelLinear

from ...nn.packed_linear import DTYPES_BY_NAME
from .sharding import COLUMN, ROW, WHOLE, FusedParts, ShardingError, slice_module

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


def _shard_index(shard_id) -> int:
    if shard_id is None:
        return 0
    return QKV_SHARDS[shard_id] if isinstance(shard_id, str) else int(shard_id)


def _role(layer) -> str:
    if getattr(layer, "tp_size", 1) == 1:
        return WHOLE
    if isinstance(layer, RowParallelLinear):
        return ROW
    if isinstance(layer, ColumnParallelLinear):
        return COLUMN
    return WHOLE  # ReplicatedLinear


def _column_start(layer, index: int, size: int) -> int:
    """First output row of shard ``index`` on this rank; KV heads repeat when tp exceeds them."""
    rank = layer.tp_rank
    if index > 0 and getattr(layer, "num_kv_head_replicas", 1) > 1:
        rank //= layer.num_kv_head_replicas
    return rank * size


class ZSSVDLinearMethod(LinearMethodBase):
    """One vLLM linear layer (possibly fusing several checkpoint modules) over zssvd's packed layouts."""

    def __init__(self, names: list[str], descriptions: list[dict | None]):
        self.names, self.descriptions = names, descriptions

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.names):
            raise ShardingError(f"{layer.prefix}: vLLM fuses {len(output_partition_sizes)} modules here, the "
                                f"checkpoint describes {self.names}; this architecture's fusing is not supported")
        layer.zssvd_received = [{} for _ in self.names]
        layer.zssvd_sizes = (list(output_partition_sizes), input_size_per_partition)
        layer.zssvd_dtype = params_dtype
        for name, dtype in self._tensor_names().items():
            param = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            param.weight_loader = self._loader(layer, name)
            layer.register_parameter(name, param)

    def _tensor_names(self) -> dict[str, torch.dtype]:
        names = {}
        for desc in self.descriptions:
            specs = {"weight": None} if desc is None else desc["tensors"]
            for name, spec in specs.items():
                names.setdefault(name, DTYPES_BY_NAME[spec["dtype"]] if spec else torch.float32)
        return names

    def _loader(self, layer, name: str):
        def load(param, loaded_weight: torch.Tensor, shard_id=None):
            shard_id = shard_id if shard_id is not None else getattr(loaded_weight, "shard_id", None)
            index = _shard_index(shard_id)
            if index >= len(self.names):
                raise ShardingError(f"{layer.prefix}: checkpoint tensor {name} for shard {shard_id!r}, "
                                    f"but the checkpoint describes only {self.names}")
            layer.zssvd_received[index][name] = loaded_weight.to(param.device)
        return load

    def process_weights_after_loading(self, layer) -> None:
        if not hasattr(layer, "zssvd_received"):
            return  # already processed
        parts = [self._part(layer, i) for i in range(len(self.names))]
        for name in self._tensor_names():
            delattr(layer, name)
        del layer.zssvd_received
        layer.zssvd_parts = FusedParts(parts, layer.zssvd_dtype)
        for name, tensor in layer.zssvd_parts.tensors().items():
            layer.register_buffer(f"zssvd_{name}", tensor, persistent=False)

    def _part(self, layer, index: int):
        name, desc = self.names[index], self.descriptions[index]
        got = layer.zssvd_received[index]
        expected = ["weight"] if desc is None else list(desc["tensors"])
        missing = [t for t in expected if t not in got]
        if missing:
            raise ShardingError(f"{name}: the checkpoint lacks {missing}; re-create it with zssvd compress")
        for t, spec in ({} if desc is None else desc["tensors"]).items():
            if list(got[t].shape) != spec["shape"]:
                raise ShardingError(f"{name}.{t}: stored shape {list(got[t].shape)}, its description says "
                                    f"{spec['shape']}; the checkpoint is inconsistent, re-create it")
        role = _role(layer)
        out_sizes, in_size = layer.zssvd_sizes
        size = out_sizes[index] if role == COLUMN else in_size
        start = _column_start(layer, index, size) if role == COLUMN else layer.tp_rank * size
        part = slice_module(desc, {t: got[t] for t in expected}, role, start, size, name)
        if (part.out_features, part.in_features) != (out_sizes[index], in_size):
            raise ShardingError(f"{name}: this rank's slice is {part.out_features} x {part.in_features}, the vLLM "
                                f"layer expects {out_sizes[index]} x {in_size}; the checkpoint's module sizes do "
                                "not match this model's configuration")
        return part

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.zssvd_parts.forward(x, bias)
