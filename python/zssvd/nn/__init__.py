"""Compressed linear layers (``packed_linear``) and the registry of their low-rank storages."""
from .packed_linear import (
    LOWRANK_STORAGES,
    STORAGES,
    LowRankStorage,
    PackedDenseLinear,
    PackedLowRankLinear,
    describe_packed,
    module_from_description,
    packed_modules,
    register_storage,
    storage_for_dtype,
)

__all__ = ["LOWRANK_STORAGES", "STORAGES", "LowRankStorage", "PackedDenseLinear", "PackedLowRankLinear",
           "describe_packed", "module_from_description", "packed_modules", "register_storage", "storage_for_dtype"]
