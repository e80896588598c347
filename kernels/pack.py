"""Pack gather and unpack scatter: many memory regions into one buffer and back, in one launch.

Regions are rows ``(address, offset, nbytes)`` of a region table (format: :mod:`stager.kernels.table`);
byte ``offset + k`` of the packed buffer holds byte ``k`` of the region, and bytes outside every
region are never touched. :func:`pack_gather` copies every region into the packed buffer (the
staging path), :func:`unpack_scatter` copies it back (the restore path). Both take the table or a
:class:`~stager.kernels.table.PackTable` prepared from it once, with which a launch does no
host-to-device copy and no per-region host work, as CUDA-graph capture needs.

Kernel: one program per launch-table row (``(address, offset, nbytes, wide)``, chunks of at most
``BLOCK`` = 16 KiB; format in :mod:`stager.kernels.table`). The ``wide`` bytes move as 16-byte words
(pairs of ``int64``, 128-bit loads and stores; the host checked both sides' alignment), the rest
one byte at a time in tiles of ``BYTE_TILE``; a packed buffer that is not 16-byte aligned gets the
kernel specialised to bytes only (``WIDE=False``). Addresses are int64 and every load and store is
masked, the launch-table reads included (``pid < n_blocks``). No autotuning: a warm-up launch
compiles exactly what a captured graph replays (``n_blocks`` is not specialised on, so one
compiled kernel serves every table of a given direction and buffer alignment). With
``checksums=`` the kernel is specialised with ``CHECKSUM=True`` and each program hashes the chunk it
has just copied (:mod:`stager.kernels.checksum`). Where the kernel cannot run
(:mod:`stager.kernels.backend`), the launchers fall back to the plain-torch references of
:mod:`stager.kernels.reference` (one ``copy_`` per region).
"""

from __future__ import annotations

from typing import Any

import torch

from stager.kernels.backend import device_context, jit_kernel, tl, use_kernel
from stager.kernels.checksum import (
    LANE_TILE,
    _chunk_hash_sum,
    check_out,
    combine_partials,
    prepare_checksum_table,
)
from stager.kernels.errors import RegionTableError
from stager.kernels.reference import copy_reference, pack_gather_reference, split_checksum_table
from stager.kernels.table import BLOCK, WORD, PackTable, table_for_buffer

__all__ = ["pack_gather", "unpack_scatter"]

#: Bytes one byte-path iteration moves (one per lane).
BYTE_TILE = 2048
#: Lanes of the edge copy around the words: at most 15 head bytes plus 15 tail bytes.
EDGE = 32
#: Warps per program: 128 threads, 8 words (128 bytes) in flight each on the wide path.
NUM_WARPS = 4


@jit_kernel
def _pack_copy_kernel(
    # launch table: (n_blocks, 4) int64 rows (address, offset, nbytes, wide), one per program
    blocks_ptr,
    n_blocks,
    # packed buffer: contiguous uint8; 16-byte aligned when WIDE
    packed_ptr,
    # checksum (CHECKSUM only): (n_blocks, 2) int64 rows (region, first lane), one int64 partial
    # sum out per program
    aux_ptr,
    partials_ptr,
    # sizes
    BLOCK: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    EDGE: tl.constexpr,
    LANE_TILE: tl.constexpr,
    # modes
    GATHER: tl.constexpr,
    WIDE: tl.constexpr,
    CHECKSUM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # A program past the table reads nbytes = 0 and copies nothing.
    live = pid < n_blocks
    row = blocks_ptr + pid * 4
    addr = tl.load(row, mask=live, other=0)
    off = tl.load(row + 1, mask=live, other=0)
    nbytes = tl.load(row + 2, mask=live, other=0)

    region = addr.to(tl.pointer_type(tl.uint8))
    packed = packed_ptr + off
    if GATHER:
        src = region
        dst = packed
    else:
        src = packed
        dst = region
    if WIDE:
        wide = tl.load(row + 3, mask=live, other=0)
    else:
        wide = 0

    if wide > 0:
        # The host guarantees: src + head and dst + head are 16-byte aligned, wide % 16 == 0.
        head = (0 - addr) & 15
        src_w = tl.multiple_of(src + head, 16).to(tl.pointer_type(tl.int64))
        dst_w = tl.multiple_of(dst + head, 16).to(tl.pointer_type(tl.int64))
        n_words = tl.multiple_of(wide // 8, 2)
        w = tl.arange(0, BLOCK // 8)
        m = w < n_words
        tl.store(dst_w + w, tl.load(src_w + w, mask=m), mask=m)
        # Edge bytes: [0, head) and [head + wide, nbytes), together fewer than EDGE.
        e = tl.arange(0, EDGE)
        pos = tl.where(e < head, e, e + wide)
        m = e < nbytes - wide
        tl.store(dst + pos, tl.load(src + pos, mask=m), mask=m)
    else:
        lanes = tl.arange(0, BYTE_TILE)
        for start in range(0, nbytes, BYTE_TILE):
            # int64 scalar arithmetic on the pointers; lanes stay int32
            m = lanes < nbytes - start
            tl.store(dst + start + lanes, tl.load(src + start + lanes, mask=m), mask=m)

    if CHECKSUM:
        # Hash the chunk just copied (gather only: the source region's bytes), from the cache.
        lane0 = tl.load(aux_ptr + pid * 2 + 1, mask=live, other=0)
        part = _chunk_hash_sum(addr, nbytes, lane0, LANE_TILE)
        tl.store(partials_ptr + pid, part.to(tl.int64, bitcast=True), mask=live)


def _launch(pt: PackTable, buf: torch.Tensor, *, gather: bool, checksum: Any = None) -> None:
    if pt.n_blocks == 0:
        return
    with device_context(pt.device):
        _pack_copy_kernel[(pt.n_blocks,)](
            blocks_ptr=pt.blocks,
            n_blocks=pt.n_blocks,
            packed_ptr=buf,
            aux_ptr=checksum.aux if checksum is not None else pt.blocks,
            partials_ptr=checksum.partials if checksum is not None else pt.blocks,
            BLOCK=BLOCK,
            BYTE_TILE=BYTE_TILE,
            EDGE=EDGE,
            LANE_TILE=LANE_TILE,
            GATHER=gather,
            WIDE=buf.data_ptr() % WORD == 0,
            CHECKSUM=checksum is not None,
            num_warps=NUM_WARPS,
        )


def pack_gather(
    table: Any,
    out: torch.Tensor,
    *,
    validate: bool = True,
    use_triton: bool | None = None,
    checksums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy every region of ``table`` into ``out`` at its offset, in one kernel launch.

    ``table`` is a region table (``(n, 3)`` int64, rows ``(address, offset, nbytes)``, on the
    host or on ``out``'s device) or a :class:`PackTable` from ``prepare_table(table,
    out.device)``. ``out`` is a contiguous ``uint8`` tensor on the regions' device; bytes of it
    outside every region keep their value. The copy is queued on the current stream of ``out``'s
    device. Returns ``out``.

    ``validate=False`` skips the checks of the table itself (signs, overlaps: see
    ``validate_table``), for a table already checked; the buffer's dtype, layout, device and
    size are always checked, which costs no per-region work for a prepared table. With a raw
    table the launch table is built and copied to the device on every call: prepare it once
    instead when launching repeatedly or under CUDA-graph capture.

    ``use_triton``: None runs the Triton kernel where it can run (see ``kernel_backend``) and the
    reference elsewhere; True insists on the kernel (``RuntimeError`` where it cannot run);
    False forces the reference.

    ``checksums``: an ``int64`` tensor with one element per region on ``out``'s device, filled
    with each region's ``stager-lanes64`` checksum (see :mod:`stager.kernels.checksum`) by the
    same launch: every program hashes the chunk it has just copied, then the partial sums are
    added per region and finalised by two small torch ops on the same stream. Pass ``table`` as a
    :class:`~stager.kernels.checksum.ChecksumTable` (``prepare_checksum_table``) to launch without
    any allocation or host-to-device copy (CUDA-graph capture). Without ``checksums`` nothing of
    this runs and the kernel is the plain copy.

    Raises :class:`~stager.kernels.errors.RegionTableError` naming the first bad row.
    """
    kernel = use_kernel(use_triton, out.device if isinstance(out, torch.Tensor) else torch.device("cpu"))
    if checksums is None:
        table, _ = split_checksum_table(table)
        pt = table_for_buffer(table, out, "out", validate=validate, scatter=False, blocks=kernel)
        if kernel:
            _launch(pt, out, gather=True)
        else:
            copy_reference(pt, out, gather=True)
        return out
    if not kernel:
        return pack_gather_reference(table, out, validate=validate, checksums=checksums)
    table, ct = split_checksum_table(table)
    pt = table_for_buffer(table, out, "out", validate=validate, scatter=False, blocks=True)
    if ct is None:
        ct = prepare_checksum_table(pt)
    elif ct.pack is not pt:  # pragma: no cover - table_for_buffer returns a given PackTable as it is
        raise RegionTableError("the checksum table was prepared for another pack table")
    check_out(checksums, ct.n_regions, pt.device)
    _launch(pt, out, gather=True, checksum=ct)
    combine_partials(ct, checksums)
    return out


def unpack_scatter(
    table: torch.Tensor | PackTable,
    src: torch.Tensor,
    *,
    validate: bool = True,
    use_triton: bool | None = None,
) -> None:
    """Copy the packed buffer ``src`` back to every region of ``table``, in one kernel launch.

    The reverse of :func:`pack_gather`, with the same arguments; in addition the regions may not
    overlap at their addresses (checked unless ``validate=False``), since they are written
    concurrently.
    """
    kernel = use_kernel(use_triton, src.device if isinstance(src, torch.Tensor) else torch.device("cpu"))
    pt = table_for_buffer(table, src, "src", validate=validate, scatter=True, blocks=kernel)
    if kernel:
        _launch(pt, src, gather=False)
    else:
        copy_reference(pt, src, gather=False)
