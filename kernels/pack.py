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

from stager.errors import RegionTableError
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


def _jit(fn: Any) -> Any:
    # n_blocks is not specialised (on == 1 or % 16), so one compiled kernel serves every table.
    return triton.jit(fn, do_not_specialize=["n_blocks"]) if triton is not None else fn


@_jit
def _pack_copy_kernel(
    # launch table: (n_blocks, 4) int64 rows (address, offset, nbytes, wide), one per program
    blocks_ptr,
    n_blocks,
    # packed buffer: contiguous uint8; 16-byte aligned when WIDE
    packed_ptr,
    # sizes
    BLOCK: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    EDGE: tl.constexpr,
    # modes
    GATHER: tl.constexpr,
    WIDE: tl.constexpr,
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


def _launch(pt: PackTable, buf: torch.Tensor, *, gather: bool) -> None:
    if pt.n_blocks == 0:
        return
    with _device_context(pt.device):
        _pack_copy_kernel[(pt.n_blocks,)](
            blocks_ptr=pt.blocks,
            n_blocks=pt.n_blocks,
            packed_ptr=buf,
            BLOCK=BLOCK,
            BYTE_TILE=BYTE_TILE,
            EDGE=EDGE,
            GATHER=gather,
            WIDE=buf.data_ptr() % WORD == 0,
            num_warps=NUM_WARPS,
        )


def pack_gather_reference(
    table: torch.Tensor | PackTable, out: torch.Tensor, *, validate: bool = True
) -> torch.Tensor:
    """Plain-torch :func:`pack_gather`: one ``copy_`` per region, on the current stream.

    The oracle of the kernel tests and the fallback where Triton cannot run. Returns ``out``.
    """
    pt = _prepared(table, out, "out", validate=validate, scatter=False, blocks=False)
    _copy_reference(pt, out, gather=True)
    return out


def unpack_scatter_reference(
    table: torch.Tensor | PackTable, src: torch.Tensor, *, validate: bool = True
) -> None:
    """Plain-torch :func:`unpack_scatter`: one ``copy_`` per region, on the current stream."""
    pt = _prepared(table, src, "src", validate=validate, scatter=True, blocks=False)
    _copy_reference(pt, src, gather=False)


def pack_gather(
    table: torch.Tensor | PackTable,
    out: torch.Tensor,
    *,
    validate: bool = True,
    use_triton: bool | None = None,
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

    Raises :class:`~stager.errors.RegionTableError` naming the first bad row.
    """
    kernel = _use_kernel(
        use_triton, out.device if isinstance(out, torch.Tensor) else torch.device("cpu")
    )
    pt = _prepared(table, out, "out", validate=validate, scatter=False, blocks=kernel)
    if kernel:
        _launch(pt, out, gather=True)
    else:
        _copy_reference(pt, out, gather=True)
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
