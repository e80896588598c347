"""Pack gather / unpack scatter kernels with their launchers and plain-torch references.

A region table (``(n, 3)`` int64 rows ``(address, offset, nbytes)``) says which bytes to copy
into, or back out of, one contiguous ``uint8`` packed buffer; see :mod:`stager.kernels.table`
for the format and :mod:`stager.kernels.pack` for the kernel.

Importing this package imports no Triton: the table helpers are plain torch, and the launchers
(``pack_gather``, ``unpack_scatter``, their ``*_reference`` twins, ``triton_available``,
``kernel_backend``) load :mod:`stager.kernels.pack`, and with it Triton, on first access.
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
    from stager.kernels.pack import (
        kernel_backend,
        pack_gather,
        pack_gather_reference,
        triton_available,
        unpack_scatter,
        unpack_scatter_reference,
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
    "PackTable",
    "kernel_backend",
    "pack_gather",
    "pack_gather_reference",
    "packed_size",
    "prepare_table",
    "table_from_tensors",
    "table_from_triples",
    "triton_available",
    "unpack_scatter",
    "unpack_scatter_reference",
    "validate_table",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from stager.kernels import pack

        return getattr(pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
