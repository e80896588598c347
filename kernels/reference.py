"""The plain-torch references of the pack kernels: one ``copy_`` per region.

:func:`pack_gather_reference` and :func:`unpack_scatter_reference` take the arguments of
:func:`~stager.kernels.pack.pack_gather` and :func:`~stager.kernels.pack.unpack_scatter` and copy
the same bytes; they are the oracle of the kernel tests and the fallback where Triton cannot run
(see :mod:`stager.kernels.backend`). They reach a raw address through a non-owning storage built
with ``torch._C._construct_storage_from_data_pointer(address, device, nbytes)`` (present in torch
2.6 and later), or, on the CPU without it, through ``ctypes``. Neither keeps the memory alive:
the caller keeps every region's owner alive until the copy has finished, as for the kernel.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from stager.kernels.backend import device_context
from stager.kernels.table import PackTable, table_for_buffer

__all__ = ["pack_gather_reference", "unpack_scatter_reference"]

_STORAGE_FROM_POINTER = getattr(torch._C, "_construct_storage_from_data_pointer", None)


def bytes_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A non-owning uint8 tensor over ``nbytes`` bytes at ``address`` on ``device``."""
    if _STORAGE_FROM_POINTER is not None:
        storage = _STORAGE_FROM_POINTER(address, device, nbytes)
        return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
    raise RuntimeError(
        f"this torch ({torch.__version__}) lacks torch._C._construct_storage_from_data_pointer, "
        f"which the reference needs to read {device} memory by address; use torch>=2.6"
    )


def copy_reference(pt: PackTable, buf: torch.Tensor, *, gather: bool) -> None:
    """Copy every region of ``pt`` into ``buf`` (``gather``) or back out of it, one by one."""
    flat = buf.view(-1)
    with device_context(pt.device):
        for address, offset, nbytes in pt.regions.tolist():
            if nbytes <= 0:
                continue
            region = bytes_at(address, nbytes, pt.device)
            if gather:
                flat[offset : offset + nbytes].copy_(region)
            else:
                region.copy_(flat[offset : offset + nbytes])


def pack_gather_reference(
    table: Any,
    out: torch.Tensor,
    *,
    validate: bool = True,
    checksums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`~stager.kernels.pack.pack_gather`: one ``copy_`` per region, on the current stream.

    The oracle of the kernel tests and the fallback where Triton cannot run. With ``checksums``,
    each region's checksum is computed afterwards by
    :func:`~stager.kernels.checksum.region_checksums_reference`. Returns ``out``.
    """
    table, ct = split_checksum_table(table)
    pt = table_for_buffer(table, out, "out", validate=validate, scatter=False, blocks=False)
    copy_reference(pt, out, gather=True)
    if checksums is not None:
        from stager.kernels.checksum import region_checksums_reference

        region_checksums_reference(ct if ct is not None else pt, checksums, device=pt.device)
    return out


def split_checksum_table(table: Any) -> tuple[Any, Any]:
    """``(the pack table or region table, the ChecksumTable or None)`` of a ``table`` argument."""
    pack = getattr(table, "pack", None)
    if isinstance(pack, PackTable):  # a ChecksumTable
        return pack, table
    return table, None


def unpack_scatter_reference(
    table: torch.Tensor | PackTable, src: torch.Tensor, *, validate: bool = True
) -> None:
    """Plain-torch :func:`~stager.kernels.pack.unpack_scatter`: one ``copy_`` per region, on the
    current stream."""
    pt = table_for_buffer(table, src, "src", validate=validate, scatter=True, blocks=False)
    copy_reference(pt, src, gather=False)
