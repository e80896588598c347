"""Pack gather and unpack scatter: many memory regions into one buffer and back, in one launch.

Data format
-----------
Regions are described by a region table, an ``int64`` tensor of shape ``(n, 3)`` with rows
``(address, offset, nbytes)``: the region's first byte (any alignment), where it goes in the
packed buffer, and its length (see :mod:`stager.kernels.table`). The packed buffer is a
contiguous ``uint8`` tensor on the same device as the regions; byte ``offset + k`` of it holds
byte ``k`` of the region. Bytes of the packed buffer outside every region are never touched.

* :func:`pack_gather` copies every region into the packed buffer (the staging path).
* :func:`unpack_scatter` copies the packed buffer back to every region (the restore path).

Both take the region table or a :class:`~stager.kernels.table.PackTable` prepared from it once
(validated, split into chunks of at most ``BLOCK`` bytes, launch table already on the device),
which is what CUDA-graph capture needs: a launch with a prepared table does no host-to-device
copy and no per-region host work.

Kernel
------
One program per launch-table row (``(address, offset, nbytes, wide)``, chunks of at most
``BLOCK`` = 16 KiB). A row whose ``wide`` column is non-zero copies that many bytes as 16-byte
words (pairs of ``int64``, 128-bit loads and stores: source and destination are both 16-byte
aligned there, which the host checked), plus up to 15 bytes before and 15 after, one byte at a
time; any other row (misaligned, or shorter than ``WIDE_MIN``) is copied one byte at a time in
tiles of ``BYTE_TILE``. The wide path also needs the packed buffer itself 16-byte aligned; a
buffer that is not gets the kernel specialised to bytes only (``WIDE=False``). Addresses are
int64 and every load and store is masked, the launch-table reads included (``pid < n_blocks``).
No autotuning: the configuration is fixed, so a warm-up launch compiles exactly what a captured
graph replays (``n_blocks`` is not specialised on, so one compiled kernel serves every table of
a given direction and buffer alignment).

Fused checksum
--------------
``pack_gather(table, out, checksums=c)`` also fills ``c`` (``int64``, one per region) with each
region's ``stager-lanes64`` checksum (:mod:`stager.kernels.lanes64`). The kernel is then
specialised with ``CHECKSUM=True``: after copying its chunk, each program reads the same chunk
again as 8-byte lanes (from the cache it was just loaded through; 8-byte loads when the chunk is
8-byte aligned, else bytes assembled little-endian), hashes them with their index in the region
and stores one partial sum per launch row; two small torch ops on the same stream add the
partials per region and finalise them (:func:`stager.kernels.checksum.combine_partials`). The
per-chunk routine ``_chunk_hash_sum`` lives here and is shared with the stand-alone checksum
kernel. Without ``checksums`` the kernel is specialised with ``CHECKSUM=False`` and is the plain
copy described above.

Backends
--------
The Triton kernel runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set
before ``triton`` is imported). Anywhere else, or where Triton is absent, the launchers fall back
to the plain-torch references ``pack_gather_reference`` / ``unpack_scatter_reference`` (one
``copy_`` per region); :func:`triton_available` and :func:`kernel_backend` say which is used.
The references reach a raw address through a non-owning storage built with
``torch._C._construct_storage_from_data_pointer(address, device, nbytes)`` (present in torch
2.6 and later), or, on the CPU without it, through ``ctypes``. Neither keeps the memory alive:
the caller keeps every region's owner alive until the copy has finished, as for the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import torch

from stager.kernels import lanes64 as _lanes64
from stager.kernels.errors import RegionTableError
from stager.kernels.table import (
    BLOCK,
    WORD,
    PackTable,
    _check_format,
    _packed_end,
    prepare_table,
    validate_table,
)

try:  # Triton is optional: without it every launch takes the reference path.
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: Exception | None = exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = [
    "kernel_backend",
    "pack_gather",
    "pack_gather_reference",
    "triton_available",
    "unpack_scatter",
    "unpack_scatter_reference",
]

#: Bytes one byte-path iteration moves (one per lane).
BYTE_TILE = 2048
#: Lanes of the edge copy around the words: at most 15 head bytes plus 15 tail bytes.
EDGE = 32
#: Warps per program: 128 threads, 8 words (128 bytes) in flight each on the wide path.
NUM_WARPS = 4


#: Lanes one iteration of the checksum's per-chunk loop hashes (``BLOCK // 8`` per chunk).
LANE_TILE = 512


def _jit(fn: Any) -> Any:
    # n_blocks is not specialised (on == 1 or % 16), so one compiled kernel serves every table.
    return triton.jit(fn, do_not_specialize=["n_blocks"]) if triton is not None else fn


def _jit_helper(fn: Any) -> Any:
    return triton.jit(fn) if triton is not None else fn


# ---------------------------------------------------------------- stager-lanes64 on the device
# The checksum's per-chunk routine (see stager.kernels.lanes64 for the definition), shared by the
# checksum kernel (stager.kernels.checksum) and the pack kernel's fused checksum.

if triton is not None:
    _LANE_KEY = tl.constexpr(_lanes64.LANE_KEY)
    _MIX1 = tl.constexpr(_lanes64.MIX1)
    _MIX2 = tl.constexpr(_lanes64.MIX2)


@_jit_helper
def _fmix(z):
    # SplitMix64's finaliser on uint64 (logical shifts, wrapping multiplies)
    z = z ^ (z >> 30)
    z = z * _MIX1
    z = z ^ (z >> 27)
    z = z * _MIX2
    return z ^ (z >> 31)


@_jit_helper
def _chunk_hash_sum(addr, nbytes, lane0, LANE_TILE: tl.constexpr):
    """Sum over a chunk's lanes of fmix(lane + (lane0 + j + 1) * LANE_KEY), as uint64.

    ``addr``: int64 address of the chunk's first byte; ``nbytes``: its length (0 gives 0);
    ``lane0``: index in its region of the chunk's first lane. Lanes are 8-byte loads when the
    chunk is 8-byte aligned, else bytes assembled little-endian; the last 1..7 bytes form one
    more lane, zeros above them (the tail rule).
    """
    src = addr.to(tl.pointer_type(tl.uint8))
    n_full = nbytes // 8
    j = tl.arange(0, LANE_TILE)
    k = tl.arange(0, 8)
    shifts = (k * 8).to(tl.uint64)
    acc = tl.zeros((LANE_TILE,), dtype=tl.uint64)
    if addr % 8 == 0:
        words = src.to(tl.pointer_type(tl.uint64))
        for start in range(0, n_full, LANE_TILE):
            lane = start + j
            m = lane < n_full
            w = tl.load(words + lane, mask=m, other=0)
            z = w + (lane0 + lane + 1).to(tl.uint64) * _LANE_KEY
            acc += tl.where(m, _fmix(z), 0)
    else:
        for start in range(0, n_full, LANE_TILE):
            lane = start + j
            m = lane < n_full
            pos = lane[:, None] * 8 + k[None, :]
            b = tl.load(src + pos, mask=m[:, None], other=0).to(tl.uint64)
            w = tl.sum(b << shifts[None, :], axis=1)
            z = w + (lane0 + lane + 1).to(tl.uint64) * _LANE_KEY
            acc += tl.where(m, _fmix(z), 0)
    rest = nbytes - n_full * 8
    tb = tl.load(src + n_full * 8 + k, mask=k < rest, other=0).to(tl.uint64)
    tw = tl.sum(tb << shifts, axis=0)
    tz = _fmix(tw + (lane0 + n_full + 1).to(tl.uint64) * _LANE_KEY)
    total = tl.sum(acc, axis=0)
    return tl.where(rest > 0, total + tz, total)


@_jit
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


def _interpreting() -> bool:
    if triton is None:
        return False
    interpreted = getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)
    return interpreted is not None and isinstance(_pack_copy_kernel, interpreted)


_INTERPRET = _interpreting()


def triton_available() -> bool:
    """Whether Triton imported; without it every launch uses the plain-torch reference."""
    return triton is not None


def _kernel_support(device: torch.device) -> str | None:
    """None if the Triton kernel can run on ``device``, else why not."""
    if triton is None:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR!r})"
    if _INTERPRET and device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only; got {device}"
    if not _INTERPRET and device.type != "cuda":
        return (
            f"compiled Triton kernels need a CUDA device, got {device}; set TRITON_INTERPRET=1 "
            f"before triton is imported to run them on the CPU"
        )
    return None


def kernel_backend(device: torch.device | str) -> str:
    """What an automatic launch on ``device`` runs: ``"triton"``, ``"triton-interpreter"`` or
    ``"reference"``."""
    if _kernel_support(torch.device(device)) is not None:
        return "reference"
    return "triton-interpreter" if _INTERPRET else "triton"


def _use_kernel(use_triton: bool | None, device: torch.device) -> bool:
    why = _kernel_support(device)
    if use_triton is None:
        return why is None
    if use_triton and why is not None:
        raise RuntimeError(f"use_triton=True but the Triton kernel cannot run: {why}")
    return bool(use_triton)


def _device_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _check_buffer(buf: object, name: str) -> torch.Tensor:
    if not isinstance(buf, torch.Tensor):
        raise RegionTableError(
            f"{name} must be a contiguous uint8 tensor; got {type(buf).__name__}"
        )
    if buf.dtype != torch.uint8 or not buf.is_contiguous():
        raise RegionTableError(
            f"{name} must be a contiguous uint8 tensor; got dtype={buf.dtype}, "
            f"shape={tuple(buf.shape)}, stride={tuple(buf.stride())}; pass a "
            f"torch.empty(n, dtype=torch.uint8) buffer or a .view(torch.uint8) of one"
        )
    return buf


def _first_past_end(regions: torch.Tensor, limit: int) -> str:
    off, nbytes = regions[:, 1], regions[:, 2]
    i = int(torch.nonzero((nbytes > 0) & (off + nbytes > limit))[0, 0])
    a, o, n = (int(v) for v in regions[i].tolist())
    return (
        f"region table row {i} (address=0x{a:x}, offset={o}, nbytes={n}): ends at byte {o + n}, "
        f"past the end of the packed buffer ({limit} bytes); use a larger buffer or fix the offset"
    )


def _prepared(
    table: torch.Tensor | PackTable,
    buf: torch.Tensor,
    name: str,
    *,
    validate: bool,
    scatter: bool,
    blocks: bool,
) -> PackTable:
    """Check ``buf`` against ``table``; prepare a raw table (without its launch rows unless
    ``blocks``) on ``buf``'s device."""
    buf = _check_buffer(buf, name)
    if isinstance(table, PackTable):
        pt = table
        if pt.device != buf.device:
            raise RegionTableError(
                f"the prepared table is for {pt.device} but {name} is on {buf.device}; "
                f"prepare the table on the buffer's device"
            )
    else:
        if (
            isinstance(table, torch.Tensor)
            and table.device.type != "cpu"
            and table.device != buf.device
        ):
            raise RegionTableError(
                f"the region table is on {table.device} but {name} is on {buf.device}; keep the "
                f"table on the host or on the buffer's device"
            )
        if blocks:
            pt = prepare_table(table, buf.device, validate=validate)
        else:
            host = _check_format(table)
            if validate:
                validate_table(host, packed_nbytes=buf.numel(), for_scatter=scatter)
            pt = PackTable(
                regions=host,
                blocks=host.new_empty(0, 4),
                device=buf.device,
                packed_nbytes=_packed_end(host),
                nbytes=0,
                wide_nbytes=0,
                validated=validate,
                scatter_conflict=None,
            )
    if pt.packed_nbytes > buf.numel():
        raise RegionTableError(_first_past_end(pt.regions, buf.numel()))
    if scatter and validate and pt.scatter_conflict is not None:
        raise RegionTableError(pt.scatter_conflict)
    return pt


_STORAGE_FROM_POINTER = getattr(torch._C, "_construct_storage_from_data_pointer", None)


def _bytes_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
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


def _copy_reference(pt: PackTable, buf: torch.Tensor, *, gather: bool) -> None:
    flat = buf.view(-1)
    with _device_context(pt.device):
        for address, offset, nbytes in pt.regions.tolist():
            if nbytes <= 0:
                continue
            region = _bytes_at(address, nbytes, pt.device)
            if gather:
                flat[offset : offset + nbytes].copy_(region)
            else:
                region.copy_(flat[offset : offset + nbytes])


def _launch(pt: PackTable, buf: torch.Tensor, *, gather: bool, checksum: Any = None) -> None:
    if pt.n_blocks == 0:
        return
    with _device_context(pt.device):
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


def pack_gather_reference(
    table: Any,
    out: torch.Tensor,
    *,
    validate: bool = True,
    checksums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`pack_gather`: one ``copy_`` per region, on the current stream.

    The oracle of the kernel tests and the fallback where Triton cannot run. With ``checksums``,
    each region's checksum is computed afterwards by
    :func:`~stager.kernels.checksum.region_checksums_reference`. Returns ``out``.
    """
    table, ct = _split_checksum_table(table)
    pt = _prepared(table, out, "out", validate=validate, scatter=False, blocks=False)
    _copy_reference(pt, out, gather=True)
    if checksums is not None:
        from stager.kernels.checksum import region_checksums_reference

        region_checksums_reference(ct if ct is not None else pt, checksums, device=pt.device)
    return out


def _split_checksum_table(table: Any) -> tuple[Any, Any]:
    """``(the pack table or region table, the ChecksumTable or None)`` of a ``table`` argument."""
    pack = getattr(table, "pack", None)
    if isinstance(pack, PackTable):  # a ChecksumTable
        return pack, table
    return table, None


def unpack_scatter_reference(
    table: torch.Tensor | PackTable, src: torch.Tensor, *, validate: bool = True
) -> None:
    """Plain-torch :func:`unpack_scatter`: one ``copy_`` per region, on the current stream."""
    pt = _prepared(table, src, "src", validate=validate, scatter=True, blocks=False)
    _copy_reference(pt, src, gather=False)


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
    kernel = _use_kernel(
        use_triton, out.device if isinstance(out, torch.Tensor) else torch.device("cpu")
    )
    if checksums is None:
        table, _ = _split_checksum_table(table)
        pt = _prepared(table, out, "out", validate=validate, scatter=False, blocks=kernel)
        if kernel:
            _launch(pt, out, gather=True)
        else:
            _copy_reference(pt, out, gather=True)
        return out
    if not kernel:
        return pack_gather_reference(table, out, validate=validate, checksums=checksums)
    from stager.kernels.checksum import _check_out, combine_partials, prepare_checksum_table

    table, ct = _split_checksum_table(table)
    pt = _prepared(table, out, "out", validate=validate, scatter=False, blocks=True)
    if ct is None:
        ct = prepare_checksum_table(pt)
    elif ct.pack is not pt:  # pragma: no cover - _prepared returns a given PackTable as it is
        raise RegionTableError("the checksum table was prepared for another pack table")
    _check_out(checksums, ct.n_regions, pt.device)
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
    kernel = _use_kernel(
        use_triton, src.device if isinstance(src, torch.Tensor) else torch.device("cpu")
    )
    pt = _prepared(table, src, "src", validate=validate, scatter=True, blocks=kernel)
    if kernel:
        _launch(pt, src, gather=False)
    else:
        _copy_reference(pt, src, gather=False)
