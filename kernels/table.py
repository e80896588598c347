"""Region tables: what the pack/unpack kernels copy, validated once and laid out for launch.

A *region table* is an ``int64`` tensor of shape ``(n, 3)``, one row per region::

    table[i] = (address, offset, nbytes)

* ``address``: the region's first byte in its own memory (``tensor.data_ptr()``), any alignment.
  Device regions hold device addresses; the regions of one table live on one device.
* ``offset``: where the region's first byte goes in the packed buffer, in bytes.
* ``nbytes``: the region's length in bytes; ``0`` is allowed and copies nothing.

The packed buffer is one contiguous ``uint8`` tensor. Regions may not overlap inside it. They may
overlap at their addresses for packing (the same storage read twice), but not for unpacking
(two regions written at once would race); :attr:`PackTable.scatter_conflict` says why.

A *launch table* (:attr:`PackTable.blocks`) is what the kernel reads: an ``int64`` tensor of shape
``(n_blocks, 4)`` on the launch device, one row per program::

    blocks[b] = (address, offset, nbytes, wide)

Each row is a chunk of at most :data:`BLOCK` bytes of one region (chunk ``j`` of a region starts
``j * BLOCK`` bytes into it), so one 64 MiB region and ten thousand 40-byte regions both spread
evenly over the programs. ``wide`` is the number of bytes, a multiple of 16, that the kernel moves
as 16-byte words; they start at the chunk's first 16-byte-aligned address, ``(-address) % 16``
bytes in. It is non-zero only when the address and the offset agree modulo 16 (so both sides are
aligned together, given a 16-byte-aligned packed buffer), at least one word fits and the chunk
has at least :data:`WIDE_MIN` bytes. The bytes
before and after the words, and whole chunks with ``wide == 0``, are copied one byte at a time.

Everything here is plain torch and host-side: importing this module does not import Triton.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from stager.kernels.errors import RegionTableError

__all__ = [
    "BLOCK", "WIDE_MIN", "WORD", "PackTable", "packed_size", "prepare_table", "table_from_tensors",
    "table_from_triples", "validate_table"
]

#: Bytes per launch-table row (one program's share of a region). A multiple of :data:`WORD`.
BLOCK = 16384
#: Width in bytes of the wide path's words.
WORD = 16
#: Chunks shorter than this are copied byte by byte even when aligned: a few words gain nothing.
WIDE_MIN = 64

_INT64_MAX = (1 << 63) - 1


def _row_text(table: torch.Tensor, i: int) -> str:
    addr, off, nbytes = (int(v) for v in table[i].tolist())
    return f"row {i} (address=0x{addr:x}, offset={off}, nbytes={nbytes})"


def _first(mask: torch.Tensor) -> int | None:
    """Index of the first True in a 1-D bool tensor, or None."""
    hits = torch.nonzero(mask)
    return int(hits[0, 0]) if hits.numel() else None


def _check_format(table: object) -> torch.Tensor:
    """Check dtype and shape; return the table on the host (one copy if it was on a device)."""
    if not isinstance(table, torch.Tensor):
        raise RegionTableError(
            f"region table must be a torch.Tensor of dtype int64 and shape (n, 3); "
            f"got {type(table).__name__}"
        )
    if table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 3:
        raise RegionTableError(
            f"region table must have dtype int64 and shape (n, 3) with rows "
            f"(address, offset, nbytes); got dtype={table.dtype}, shape={tuple(table.shape)}"
        )
    return table.detach().to("cpu")


def _first_overlap(start: torch.Tensor, nbytes: torch.Tensor) -> tuple[int, int] | None:
    """Rows ``(i, j)`` of the first pair of non-empty ranges ``[start, start + nbytes)`` that
    overlap, or None. Sorting by start makes any overlap show up between neighbours."""
    rows = torch.nonzero(nbytes > 0).flatten()
    if rows.numel() < 2:
        return None
    s = start[rows]
    order = torch.sort(s, stable=True).indices
    rows, s = rows[order], s[order]
    ends = s + nbytes[rows]
    bad = _first(s[1:] < ends[:-1])
    if bad is None:
        return None
    return int(rows[bad]), int(rows[bad + 1])


def validate_table(
    table: torch.Tensor, *, packed_nbytes: int | None = None, for_scatter: bool = False
) -> None:
    """Check a region table; raise :class:`RegionTableError` naming the first bad row.

    Checks, all vectorised over the rows: dtype ``int64`` and shape ``(n, 3)``; offsets and
    lengths non-negative; a non-null address for every non-empty region and no address range
    past ``2**63``; with ``packed_nbytes``, every non-empty region inside a packed buffer of that
    many bytes; no two non-empty regions overlapping in the packed buffer; with ``for_scatter``,
    none overlapping at their addresses either (unpacking would write them concurrently).
    """
    host = _check_format(table)
    addr, off, nbytes = host.unbind(1)
    nonempty = nbytes > 0
    checks = [
        (off < 0, "offset is negative"),
        (nbytes < 0, "nbytes is negative"),
        (addr < 0, "address is negative"),
        (nonempty & (addr == 0), "address is null for a non-empty region"),
        # off + nbytes and addr + nbytes must fit in int64; written so that nothing overflows.
        (nonempty & (off > _INT64_MAX - nbytes), "offset + nbytes overflows int64"),
        (nonempty & (addr > _INT64_MAX - nbytes), "address + nbytes overflows int64"),
    ]
    for mask, problem in checks:
        i = _first(mask)
        if i is not None:
            raise RegionTableError(f"region table {_row_text(host, i)}: {problem}")
    if packed_nbytes is not None:
        i = _first(nonempty & (off + nbytes > packed_nbytes))
        if i is not None:
            end = int(off[i]) + int(nbytes[i])
            raise RegionTableError(
                f"region table {_row_text(host, i)}: ends at byte {end}, past the end of the "
                f"packed buffer ({packed_nbytes} bytes); use a larger buffer or fix the offset"
            )
    pair = _first_overlap(off, nbytes)
    if pair is not None:
        i, j = pair
        raise RegionTableError(
            f"region table {_row_text(host, j)} overlaps {_row_text(host, i)} in the packed "
            f"buffer; every region needs its own bytes there"
        )
    if for_scatter:
        conflict = _scatter_conflict(host)
        if conflict is not None:
            raise RegionTableError(conflict)


def _scatter_conflict(host: torch.Tensor) -> str | None:
    """Why ``host`` cannot be unpacked (two regions overlap at their addresses), or None."""
    pair = _first_overlap(host[:, 0], host[:, 2])
    if pair is None:
        return None
    i, j = pair
    return (
        f"region table {_row_text(host, j)} overlaps {_row_text(host, i)} at its address; "
        f"unpacking would write both at once"
    )


def packed_size(table: torch.Tensor) -> int:
    """Bytes a packed buffer needs for ``table``: one past the last byte any region uses."""
    return _packed_end(_check_format(table))


def _packed_end(host: torch.Tensor) -> int:
    nonempty = host[:, 2] > 0
    return int((host[nonempty, 1] + host[nonempty, 2]).max()) if bool(nonempty.any()) else 0


def table_from_triples(triples: Iterable[Sequence[int]]) -> torch.Tensor:
    """Build a region table from ``(address, offset, nbytes)`` triples (not validated here)."""
    rows = [tuple(int(v) for v in t) for t in triples]
    bad = next((i for i, r in enumerate(rows) if len(r) != 3), None)
    if bad is not None:
        raise RegionTableError(
            f"region table row {bad}: expected (address, offset, nbytes), got {rows[bad]!r}"
        )
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 3)


def table_from_tensors(
    tensors: Sequence[torch.Tensor],
    offsets: Sequence[int] | None = None,
    *,
    align: int = WORD,
) -> torch.Tensor:
    """Build a region table with one row per tensor, covering the tensor's bytes.

    Each tensor must be contiguous (its bytes are ``numel * element_size`` from ``data_ptr()``)
    and all must be on one device. ``offsets`` places them in the packed buffer; by default they
    are laid out in order, each starting at a multiple of ``align`` bytes (16 keeps the wide path
    open for aligned tensors). The packed size is :func:`packed_size` of the result.
    """
    if align < 1:
        raise RegionTableError(f"align must be a positive number of bytes; got {align}")
    if offsets is not None and len(offsets) != len(tensors):
        raise RegionTableError(
            f"got {len(tensors)} tensors but {len(offsets)} offsets; give one offset per tensor"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RegionTableError(
            f"all tensors of one region table must be on one device; got "
            f"{sorted(str(d) for d in devices)}"
        )
    rows: list[tuple[int, int, int]] = []
    cursor = 0
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise RegionTableError(
                f"region table row {i}: tensor of shape {tuple(t.shape)} and stride "
                f"{tuple(t.stride())} is not contiguous; pass .contiguous() or its storage"
            )
        nbytes = t.numel() * t.element_size()
        if offsets is None:
            off = -(-cursor // align) * align
            cursor = off + nbytes
        else:
            off = int(offsets[i])
        rows.append((t.data_ptr() if nbytes else 0, off, nbytes))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 3)


def _launch_rows(host: torch.Tensor) -> torch.Tensor:
    """Split each region into chunks of at most BLOCK bytes; ``(n_blocks, 4)`` int64 rows."""
    addr, off, nbytes = host.unbind(1)
    counts = torch.where(nbytes > 0, (nbytes + (BLOCK - 1)) // BLOCK, 0)
    total = int(counts.sum())
    region = torch.repeat_interleave(torch.arange(host.shape[0]), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(total) - first[region]) * BLOCK
    b_addr = addr[region] + start
    b_off = off[region] + start
    b_n = torch.clamp(nbytes[region] - start, max=BLOCK)
    head = (-b_addr) % WORD
    together = (b_addr - b_off) % WORD == 0
    wide = torch.where(
        together & (b_n >= torch.clamp(head + WORD, min=WIDE_MIN)),
        (b_n - head) // WORD * WORD,
        torch.zeros_like(b_n),
    )
    return torch.stack([b_addr, b_off, b_n, wide], dim=1).contiguous()


@dataclass(frozen=True, eq=False)
class PackTable:
    """A region table checked once and laid out as a launch table on its device.

    Build it with :func:`prepare_table` before capturing a CUDA graph, then pass it to
    ``pack_gather`` / ``unpack_scatter`` as often as needed: a launch with a prepared table does
    no host-to-device copy and no work that grows with the number of regions.
    """

    regions: torch.Tensor
    """The region table, ``(n, 3)`` int64 on the host."""
    blocks: torch.Tensor
    """The launch table, ``(n_blocks, 4)`` int64 on :attr:`device` (see the module docstring)."""
    device: torch.device
    """Where the regions, the packed buffer and the launch table live."""
    packed_nbytes: int
    """One past the last packed byte any region uses: the smallest packed buffer that fits."""
    nbytes: int
    """Total bytes the regions hold."""
    wide_nbytes: int
    """Of those, the bytes moved as 16-byte words (given a 16-byte-aligned packed buffer)."""
    validated: bool
    """Whether :func:`validate_table` passed (``validate=False`` skips it)."""
    scatter_conflict: str | None
    """Why unpacking is refused (regions overlap at their addresses), or None."""

    @property
    def n_regions(self) -> int:
        """Rows of the region table."""
        return int(self.regions.shape[0])

    @property
    def n_blocks(self) -> int:
        """Rows of the launch table: the kernel's grid."""
        return int(self.blocks.shape[0])


def prepare_table(
    table: torch.Tensor, device: torch.device | str | int, *, validate: bool = True
) -> PackTable:
    """Validate ``table`` (unless ``validate=False``) and build its launch table on ``device``.

    All the host work of a launch happens here, once: the checks of :func:`validate_table`
    (including whether the table may be unpacked), the split into chunks and one copy of the
    launch table to the device. Do it before CUDA-graph capture.
    """
    host = _check_format(table).clone()  # the caller may reuse its tensor
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    scatter_conflict: str | None = None
    if validate:
        validate_table(host)
        scatter_conflict = _scatter_conflict(host)
    rows = _launch_rows(host)
    packed = _packed_end(host)
    if device.type == "cuda":
        # From pinned memory, without blocking: a pageable copy would first wait on the host for
        # everything already queued on the current stream (an earlier checkpoint's copies, and the
        # training work they wait for). Torch's pinned-memory cache keeps the host block until
        # the copy has run.
        blocks = rows.pin_memory().to(device, non_blocking=True)
    else:
        blocks = rows.to(device) if device.type != "cpu" else rows
    return PackTable(
        regions=host,
        blocks=blocks,
        device=device,
        packed_nbytes=packed,
        nbytes=int(host[:, 2].clamp(min=0).sum()),
        wide_nbytes=int(rows[:, 3].sum()) if rows.numel() else 0,
        validated=validate,
        scatter_conflict=scatter_conflict,
    )


def tensor_text(value: object) -> str:
    """``dtype=..., shape=..., device=...`` of a tensor, else its type name (for error messages)."""
    if isinstance(value, torch.Tensor):
        return f"dtype={value.dtype}, shape={tuple(value.shape)}, device={value.device}"
    return type(value).__name__


def _check_buffer(buf: object, name: str) -> torch.Tensor:
    if not isinstance(buf, torch.Tensor):
        raise RegionTableError(f"{name} must be a contiguous uint8 tensor; got {type(buf).__name__}")
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


def table_for_buffer(
    table: torch.Tensor | PackTable,
    buf: torch.Tensor,
    name: str,
    *,
    validate: bool,
    scatter: bool,
    blocks: bool,
) -> PackTable:
    """Check the packed buffer ``buf`` (argument ``name`` of a launcher) against ``table``;
    prepare a raw table (without its launch rows unless ``blocks``) on ``buf``'s device."""
    buf = _check_buffer(buf, name)
    if isinstance(table, PackTable):
        pt = table
        if pt.device != buf.device:
            raise RegionTableError(
                f"the prepared table is for {pt.device} but {name} is on {buf.device}; "
                f"prepare the table on the buffer's device"
            )
    else:
        if isinstance(table, torch.Tensor) and table.device.type != "cpu" and table.device != buf.device:
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
