"""Pack gather / unpack scatter kernels with their launchers and plain-torch references.

A region table (``(n, 3)`` int64 rows ``(address, offset, nbytes)``) says which bytes to copy
into, or back out of, one contiguous ``uint8`` packed buffer; see :mod:`stager.kernels.table`
for the format and :mod:`stager.kernels.pack` for the kernel.

Region checksums (``stager-lanes64``, defined in :mod:`stager.kernels.lanes64`):
``region_checksums`` hashes every region of a table in one launch (:mod:`stager.kernels.checksum`),
``pack_gather(..., checksums=out)`` does it in the pack launch itself, and
``region_checksums_reference`` is their plain-torch oracle.

Importing this package imports no Triton: the table helpers are plain torch, and the launchers
(``pack_gather``, ``unpack_scatter``, their ``*_reference`` twins, ``triton_available``,
``kernel_backend``, and the checksum launchers) load :mod:`stager.kernels.pack`, and with it
Triton, on first access.
"""

from __future__ import annotations

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
    from stager.kernels.checksum import (
        ChecksumTable,
        prepare_checksum_table,
        region_checksums,
        region_checksums_reference,
    )
    from stager.kernels.pack import (
        kernel_backend,
        pack_gather,
        pack_gather_reference,
        triton_available,
        unpack_scatter,
        unpack_scatter_reference,
    )

_LAZY_CHECKSUM = frozenset(
    {"ChecksumTable", "prepare_checksum_table", "region_checksums", "region_checksums_reference"}
)

_LAZY = frozenset(
    {
        "kernel_backend",
        "pack_gather",
        "pack_gather_reference",
        "triton_available",
        "unpack_scatter",
        "unpack_scatter_reference",
    }
)

__all__ = [
    "BLOCK",
    "WIDE_MIN",
    "WORD",
    "ChecksumTable",
    "PackTable",
    "kernel_backend",
    "pack_gather",
    "pack_gather_reference",
    "packed_size",
    "prepare_checksum_table",
    "prepare_table",
    "region_checksums",
    "region_checksums_reference",
    "table_from_tensors",
    "table_from_triples",
    "triton_available",
    "unpack_scatter",
    "unpack_scatter_reference",
    "validate_table",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_CHECKSUM:
        from stager.kernels import checksum

        return getattr(checksum, name)
    if name in _LAZY:
        from stager.kernels import pack

        return getattr(pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY | _LAZY_CHECKSUM)
