"""Pack gather / unpack scatter and region-checksum kernels, their launchers and plain-torch references.

The region table format is in :mod:`stager.kernels.table`, the kernels in :mod:`stager.kernels.pack`
and :mod:`stager.kernels.checksum`, the checksum's definition in :mod:`stager.kernels.lanes64`.
Importing this package imports no Triton: the table helpers are plain torch, and the launchers
(and ``triton_available``/``kernel_backend``) load their module, and with it Triton, on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stager.kernels.table import (
    BLOCK,
    WIDE_MIN,
    WORD,
    PackTable,
    packed_size,
    prepare_table,
    table_from_tensors,
    table_from_triples,
    validate_table,
)

if TYPE_CHECKING:
    from stager.kernels.backend import kernel_backend, triton_available
    from stager.kernels.checksum import (
        ChecksumTable,
        prepare_checksum_table,
        region_checksums,
        region_checksums_reference,
    )
    from stager.kernels.pack import pack_gather, unpack_scatter
    from stager.kernels.reference import pack_gather_reference, unpack_scatter_reference

_LAZY = {
    name: module
    for module, names in (
        ("checksum", "ChecksumTable prepare_checksum_table region_checksums region_checksums_reference"),
        ("backend", "kernel_backend triton_available"),
        ("pack", "pack_gather unpack_scatter"),
        ("reference", "pack_gather_reference unpack_scatter_reference"),
    )
    for name in names.split()
}
"""Names loaded on first access, and the module of each (every one of them imports Triton)."""

__all__ = [
    "BLOCK", "WIDE_MIN", "WORD", "ChecksumTable", "PackTable", "kernel_backend", "pack_gather",
    "pack_gather_reference", "packed_size", "prepare_checksum_table", "prepare_table", "region_checksums",
    "region_checksums_reference", "table_from_tensors", "table_from_triples", "triton_available",
    "unpack_scatter", "unpack_scatter_reference", "validate_table"
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
