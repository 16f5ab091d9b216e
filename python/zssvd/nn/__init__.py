"""Compressed linear layers."""
from .packed_linear import (
    LOWRANK_STORAGES,
    PackedDenseLinear,
    PackedLowRankLinear,
    module_from_description,
    storage_for_dtype,
)

__all__ = ["LOWRANK_STORAGES", "PackedDenseLinear", "PackedLowRankLinear", "module_from_description",
           "storage_for_dtype"]
