"""The staging program: an immutable, ordered list of the ops that stage one device's regions.

A program is built once per plan and device from the plan's regions (their size and arena offset)
and three knobs: the pack threshold, the chunk size and the number of chunk slots. It is pure
structure: it names regions by index and bytes by offset, never by address, so it can be built,
compared and described without a GPU. The addresses come in when a program is *bound*
(:class:`Bindings`: source views, the destination arena, the device chunks, the prepared pack
tables) and run, eagerly (:mod:`stager.graphs.eager`) or as CUDA graphs
(:mod:`stager.graphs.cuda_graph`).

Ops, in the order they run:

* :class:`PackOp` -- gather a *run* of small regions into chunk slot ``slot`` with one
  ``pack_gather`` launch. Each region lands at ``arena_offset - run_start``: the chunk holds the
  run exactly as the arena lays it out, alignment padding included.
* :class:`ChunkCopyOp` -- copy the first ``nbytes`` of that slot to ``arena[arena_offset:]`` in
  one device-to-host copy (the padding bytes it also writes belong to no region).
* :class:`DirectCopyOp` -- copy one region straight into its arena slot.
* :class:`ChecksumOp` -- (checksum programs only) hash the directly copied regions from their
  device sources with one checksum kernel launch.
* :class:`ChecksumCopyOp` -- (checksum programs only) copy the device checksums to the small
  host buffer, after every other copy and before the done marker.
* :class:`RecordEventOp` -- record an event (``done`` closes every program).

Runs. The arena layout is fixed by the plan, so a chunk copy may only cover arena bytes that
belong to packed regions of its run (or to padding). A run is therefore a maximal sequence of
regions that are adjacent in arena order, all on this device, each smaller than the pack
threshold, spanning at most one chunk. Any other region (large, on another device, on the CPU)
ends the run. A run of fewer than :data:`MIN_RUN` regions is copied directly: packing one region
costs a launch and saves nothing. Runs follow arena order, not region index: with regions laid out
in state-dict order, small tensors that alternate with large ones (weight, bias, weight, bias...)
are runs of one and go direct; a plan that puts each device's small regions next to each other in
the arena lets all of them pack.

Slots. Runs use ``slots`` chunk buffers in turn (a ring): run ``k`` packs into slot ``k % slots``.
Every op runs on one stream, so a slot is never refilled before its previous copy has been
issued ahead of it; the device memory is ``slots * chunk_bytes`` whatever the number of runs.

Checksums. ``build_program(..., checksum=True)`` makes a program that also computes the
``stager-lanes64`` checksum (:mod:`stager.kernels.lanes64`) of every region it stages, on the
device, in the same stream (and so in the same CUDA graph): each pack hashes its regions in the
pack launch itself (``pack_gather(..., checksums=...)``), one :class:`ChecksumOp` hashes every
directly copied region from its device source, and a :class:`ChecksumCopyOp` copies the values to
a host buffer before the done marker. The values land in one ``int64`` device buffer with one
*checksum slot* per region: the packed regions in pack order, then the direct ones
(:attr:`Program.checksum_regions` names the region of each slot), so that every launch writes one
contiguous slice. A checksum program is a different program (:attr:`Program.key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch

from stager.envs import format_size

if TYPE_CHECKING:
    from stager.kernels import PackTable
    from stager.plan import Region

__all__ = [
    "MIN_RUN",
    "PackOp",
    "ChunkCopyOp",
    "DirectCopyOp",
    "RecordEventOp",
    "ChecksumOp",
    "ChecksumCopyOp",
    "Op",
    "Program",
    "Bindings",
    "build_program",
    "bind_program",
]

MIN_RUN = 2
"""Fewest small regions worth one pack launch; shorter runs are copied directly."""


@dataclass(frozen=True)
class PackOp:
    """Gather ``regions`` into chunk slot ``slot``, region ``regions[i]`` at byte ``offsets[i]``."""

    slot: int
    regions: tuple[int, ...]
    offsets: tuple[int, ...]
    """Byte offset of each region in the chunk (its arena offset minus the run's start)."""
    sizes: tuple[int, ...]
    nbytes: int
    """Bytes of the regions themselves (without padding)."""
    checksum_at: int = -1
    """Checksum slot of ``regions[0]`` (the others follow), or -1: the pack computes none."""

    kind = "pack"


@dataclass(frozen=True)
class ChunkCopyOp:
    """Copy ``chunk[slot][:nbytes]`` to ``arena[arena_offset : arena_offset + nbytes]``."""

    slot: int
    arena_offset: int
    nbytes: int
    """The run's span in the arena: its regions and the alignment padding between them."""
    first: int
    """Index of the run's first region (for ``describe``)."""
    last: int

    kind = "copy-chunk"


@dataclass(frozen=True)
class DirectCopyOp:
    """Copy region ``region`` (``nbytes``) to ``arena[arena_offset : arena_offset + nbytes]``."""

    region: int
    arena_offset: int
    nbytes: int

    kind = "copy-direct"


@dataclass(frozen=True)
class RecordEventOp:
    """Record the event bound under ``name`` on the program's stream."""

    name: str = "done"

    kind = "record"


@dataclass(frozen=True)
class ChecksumOp:
    """Hash ``regions`` (copied directly) from their device sources into checksum slots
    ``first .. first + len(regions) - 1``, in one launch."""

    regions: tuple[int, ...]
    first: int
    nbytes: int
    """Bytes hashed."""

    kind = "checksum"


@dataclass(frozen=True)
class ChecksumCopyOp:
    """Copy the ``count`` device checksums to the host checksum buffer."""

    count: int

    kind = "copy-sums"


Op = Union[PackOp, ChunkCopyOp, DirectCopyOp, ChecksumOp, ChecksumCopyOp, RecordEventOp]


@dataclass(frozen=True, eq=False)
class Program:
    """An ordered, immutable list of ops staging the regions of one plan that live on ``device``.

    Build it with :func:`build_program`. Two programs with the same :attr:`key` do the same thing.
    """

    device: torch.device
    ops: tuple[Op, ...]
    slots: int
    """Chunk buffers the runs cycle through (0 when nothing is packed)."""
    chunk_bytes: int
    """Bytes each chunk buffer needs: the largest run span (0 when nothing is packed)."""
    chunk_size: int
    """The chunk size the program was built for (no run spans more)."""
    pack_threshold: int
    regions: tuple[int, ...]
    """Every region the program copies, in arena order."""
    checksum: bool = False
    """Whether the program computes each region's checksum on the device."""
    checksum_regions: tuple[int, ...] = ()
    """The region of each checksum slot (checksum programs: every region of :attr:`regions`,
    packed ones first in pack order, then the direct ones; else empty)."""
    key: tuple = field(init=False, repr=False)
    """``(device, slots, chunk_bytes, ops, checksum)``: equal keys, equal programs."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (str(self.device), self.slots, self.chunk_bytes, self.ops, self.checksum))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    # ------------------------------------------------------------------ summaries

    @property
    def packs(self) -> tuple[PackOp, ...]:
        return tuple(op for op in self.ops if isinstance(op, PackOp))

    @property
    def directs(self) -> tuple[DirectCopyOp, ...]:
        return tuple(op for op in self.ops if isinstance(op, DirectCopyOp))

    @property
    def packed_regions(self) -> tuple[int, ...]:
        """Regions that go through a chunk, in arena order."""
        return tuple(i for op in self.packs for i in op.regions)

    @property
    def direct_regions(self) -> tuple[int, ...]:
        """Regions copied straight to the arena, in arena order."""
        return tuple(op.region for op in self.directs)

    @property
    def packed(self) -> bool:
        """Whether any region is packed (the device path is then ``packed``, else ``direct``)."""
        return any(isinstance(op, PackOp) for op in self.ops)

    @property
    def nbytes(self) -> int:
        """Bytes of the regions the program stages (without padding)."""
        return sum(op.nbytes for op in self.ops if isinstance(op, (PackOp, DirectCopyOp)))

    @property
    def span_bytes(self) -> int:
        """Arena bytes the chunk copies move: every run's span, padding included."""
        return sum(op.nbytes for op in self.ops if isinstance(op, ChunkCopyOp))

    @property
    def device_bytes(self) -> int:
        """Device memory the chunk buffers take."""
        return self.slots * self.chunk_bytes

    def pieces(self, n: int) -> tuple[range, ...]:
        """The op indices cut into at most ``n`` consecutive ranges of about equal bytes.

        A pack is never separated from its chunk copy, and the checksum and record ops stay with
        the op before them. Each range can be captured as its own graph and replayed after the
        previous one.
        """
        if n < 1:
            raise ValueError(f"pieces must be >= 1, got {n}")
        starts: list[int] = []  # first op index of each unit
        weights: list[int] = []
        for i, op in enumerate(self.ops):
            trailing = isinstance(op, (RecordEventOp, ChecksumOp, ChecksumCopyOp))
            if isinstance(op, ChunkCopyOp) or (trailing and starts):
                continue  # belongs to the unit before
            starts.append(i)
            weights.append(op.nbytes if isinstance(op, (PackOp, DirectCopyOp)) else 0)
        n = min(n, len(starts))
        total = sum(weights)
        cuts = [0]
        done = 0
        for k, w in enumerate(weights[:-1]):
            done += w
            # cut after this unit once the slice holds its share of the bytes
            if len(cuts) < n and done * n >= total * len(cuts):
                cuts.append(starts[k + 1])
        cuts.append(len(self.ops))
        return tuple(range(a, b) for a, b in zip(cuts, cuts[1:]))

    def describe(self) -> str:
        """A readable listing of the program, one op per line, for logs."""
        packs, directs = self.packs, self.directs
        packed_bytes = sum(p.nbytes for p in packs)
        direct_bytes = sum(d.nbytes for d in directs)
        lines = [
            f"staging program on {self.device}: {len(self.ops)} ops; "
            f"{sum(len(p.regions) for p in packs)} regions ({format_size(packed_bytes)}) packed in "
            f"{len(packs)} runs over {self.slots} chunk slot(s) of {format_size(self.chunk_bytes)}; "
            f"{len(directs)} regions ({format_size(direct_bytes)}) copied directly "
            f"(pack threshold {format_size(self.pack_threshold)}, chunk size {format_size(self.chunk_size)})"
            + ("; checksums on the device" if self.checksum else "")
        ]
        for i, op in enumerate(self.ops):
            if isinstance(op, PackOp):
                what = (
                    f"slot {op.slot} <- {len(op.regions)} regions "
                    f"[{op.regions[0]}..{op.regions[-1]}], {format_size(op.nbytes)}"
                )
            elif isinstance(op, ChunkCopyOp):
                what = (
                    f"slot {op.slot} -> arena[{op.arena_offset}:{op.arena_offset + op.nbytes}] "
                    f"(regions {op.first}..{op.last}, {format_size(op.nbytes)})"
                )
            elif isinstance(op, DirectCopyOp):
                what = (
                    f"region {op.region} -> arena[{op.arena_offset}:{op.arena_offset + op.nbytes}] "
                    f"({format_size(op.nbytes)})"
                )
            elif isinstance(op, ChecksumOp):
                what = (
                    f"{len(op.regions)} direct regions ({format_size(op.nbytes)}) -> checksum slots "
                    f"{op.first}..{op.first + len(op.regions) - 1}"
                )
            elif isinstance(op, ChecksumCopyOp):
                what = f"{op.count} checksums -> host"
            else:
                what = f"event {op.name!r}"
            lines.append(f"  {i:4d} {op.kind:<11} {what}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Program(device={self.device}, ops={len(self.ops)}, packs={len(self.packs)}, "
            f"directs={len(self.directs)}, slots={self.slots}, chunk_bytes={self.chunk_bytes})"
        )


def build_program(
    regions: Sequence["Region"],
    device: torch.device | str,
    *,
    pack_threshold: int,
    chunk_size: int,
    slots: int = 2,
    pack: bool = True,
    checksum: bool = False,
) -> Program:
    """The staging program for the regions of ``regions`` (a plan's full list) on ``device``.

    ``pack=False`` copies every region directly (the fallback when device memory is short).
    Regions of other devices are skipped but still end a run, since their arena bytes lie between.
    ``checksum=True`` also computes every region's checksum on the device (see the module
    docstring): the packs hash what they copy, a :class:`ChecksumOp` hashes the direct regions,
    and a :class:`ChecksumCopyOp` before the done marker brings the values to the host.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    device = torch.device(device)
    ordered = sorted(regions, key=lambda r: r.arena_offset)

    ops: list[Op] = []
    run: list["Region"] = []
    n_runs = 0
    chunk_bytes = 0
    summed: list[int] = []  # checksum slot -> region, for the packs (checksum programs)

    def flush() -> None:
        nonlocal n_runs, chunk_bytes
        if len(run) >= MIN_RUN:
            start = run[0].arena_offset
            span = run[-1].arena_offset + run[-1].nbytes - start
            slot = n_runs % slots
            ops.append(PackOp(
                slot=slot,
                regions=tuple(r.index for r in run),
                offsets=tuple(r.arena_offset - start for r in run),
                sizes=tuple(r.nbytes for r in run),
                nbytes=sum(r.nbytes for r in run),
                checksum_at=len(summed) if checksum else -1,
            ))
            if checksum:
                summed.extend(r.index for r in run)
            ops.append(ChunkCopyOp(slot, start, span, run[0].index, run[-1].index))
            n_runs += 1
            chunk_bytes = max(chunk_bytes, span)
        else:
            ops.extend(DirectCopyOp(r.index, r.arena_offset, r.nbytes) for r in run)
        run.clear()

    for r in ordered:
        if r.device != device:
            flush()  # its arena bytes lie between: a chunk copy must not cover them
            continue
        small = pack and r.nbytes < pack_threshold and r.nbytes <= chunk_size
        if not small:
            flush()
            ops.append(DirectCopyOp(r.index, r.arena_offset, r.nbytes))
            continue
        if run and r.arena_offset + r.nbytes - run[0].arena_offset > chunk_size:
            flush()
        run.append(r)
    flush()
    if checksum:
        directs = [op for op in ops if isinstance(op, DirectCopyOp)]
        if directs:
            ops.append(ChecksumOp(tuple(d.region for d in directs), len(summed), sum(d.nbytes for d in directs)))
            summed.extend(d.region for d in directs)
        if summed:
            ops.append(ChecksumCopyOp(len(summed)))
    ops.append(RecordEventOp("done"))
    return Program(
        device=device,
        ops=tuple(ops),
        slots=min(slots, n_runs),
        chunk_bytes=chunk_bytes,
        chunk_size=chunk_size,
        pack_threshold=pack_threshold,
        regions=tuple(r.index for r in ordered if r.device == device),
        checksum=checksum,
        checksum_regions=tuple(summed),
    )


# --------------------------------------------------------------------------------------------
# Binding a program to memory
# --------------------------------------------------------------------------------------------


PACK, COPY, RECORD, PACK_SUM, SUM = range(5)
"""Step codes of :attr:`Bindings.steps`."""


@dataclass(eq=False)
class Bindings:
    """The memory one program reads and writes; built once by :func:`bind_program`, reused.

    Holding a ``Bindings`` keeps every tensor it names alive (sources, arena, chunks, tables).
    """

    program: Program
    sources: Sequence[torch.Tensor]
    """uint8 view of each region's source span, indexed by region index (the plan's
    ``src_views``)."""
    arena: torch.Tensor
    """uint8 tensor over the whole destination arena (pinned for a CUDA-graph capture)."""
    chunks: tuple[torch.Tensor, ...]
    """One uint8 buffer of at least ``program.chunk_bytes`` per slot, on the program's device."""
    tables: tuple["PackTable", ...]
    """One prepared pack table per :class:`PackOp`, in op order."""
    steps: tuple[tuple[int, Any, Any], ...]
    """One step per op, everything resolved: ``(PACK, table, chunk)``, ``(COPY, target,
    input)`` (an arena slice and a chunk prefix or source view; or the host checksum buffer and
    the device one), ``(RECORD, name, None)``; in checksum programs ``(PACK_SUM, (checksum
    table, checksum slots), chunk)`` and ``(SUM, checksum table, checksum slots)``."""
    checksums: torch.Tensor | None = None
    """Checksum programs: ``int64``, one slot per region (:attr:`Program.checksum_regions`), on
    the program's device; the kernels write it."""
    host_checksums: torch.Tensor | None = None
    """Checksum programs: ``int64`` host buffer of the same length (pinned for a CUDA-graph
    capture) that the program's last copy fills; read it once the done event completed."""
    use_triton: bool | None = None
    """Passed to ``pack_gather``: None picks the kernel where it runs, False the reference."""
    non_blocking: bool = False
    """Device-to-host copies are asynchronous (the arena is pinned)."""


def bind_program(
    program: Program,
    sources: Sequence[torch.Tensor],
    arena: torch.Tensor,
    chunks: Sequence[torch.Tensor],
    *,
    use_triton: bool | None = None,
    non_blocking: bool = False,
    checksums: torch.Tensor | None = None,
    host_checksums: torch.Tensor | None = None,
) -> Bindings:
    """Bind ``program`` to memory: check sizes, build every arena slice and pack table once.

    Preparing a pack table copies its launch table to the device (on the current stream, which
    then must not be waiting behind the caller's work). A checksum program also needs
    ``checksums`` (``int64``, one element per :attr:`Program.checksum_regions`, on the program's
    device) and ``host_checksums`` (the same on the host, pinned for a capture); its checksum
    tables are prepared here too, so a run allocates no buffer of its own. Raises ``ValueError``
    when a buffer is too small, missing or on the wrong device.
    """
    from stager.kernels import prepare_checksum_table, prepare_table, table_from_triples

    if arena.dtype != torch.uint8 or arena.dim() != 1:
        raise ValueError(f"arena must be a 1-D uint8 tensor; got dtype={arena.dtype}, shape={tuple(arena.shape)}")
    if len(chunks) < program.slots:
        raise ValueError(f"program needs {program.slots} chunk buffers, got {len(chunks)}")
    for i, c in enumerate(chunks[: program.slots]):
        if c.dtype != torch.uint8 or not c.is_contiguous() or c.numel() < program.chunk_bytes:
            raise ValueError(
                f"chunk {i} must be a contiguous uint8 tensor of at least {program.chunk_bytes} bytes; "
                f"got dtype={c.dtype}, shape={tuple(c.shape)}"
            )
        if c.device != program.device:
            raise ValueError(f"chunk {i} is on {c.device}, the program on {program.device}")
    if program.checksum:
        n = len(program.checksum_regions)
        _check_checksums(checksums, "checksums", n, program.device)
        _check_checksums(host_checksums, "host_checksums", n, torch.device("cpu"))
    tables = []
    steps: list[tuple[int, Any, Any]] = []
    for op in program.ops:
        if isinstance(op, PackOp):
            src = [sources[i] for i in op.regions]
            for s, n, i in zip(src, op.sizes, op.regions):
                _check_source(s, n, i, program.device)
            table = table_from_triples(zip((s.data_ptr() for s in src), op.offsets, op.sizes))
            tables.append(prepare_table(table, program.device))
            chunk = chunks[op.slot][: program.chunk_bytes]
            if op.checksum_at >= 0 and checksums is not None:
                out = checksums.narrow(0, op.checksum_at, len(op.regions))
                steps.append((PACK_SUM, (prepare_checksum_table(tables[-1]), out), chunk))
            else:
                steps.append((PACK, tables[-1], chunk))
        elif isinstance(op, ChunkCopyOp):
            steps.append((COPY, _arena_slice(arena, op.arena_offset, op.nbytes), chunks[op.slot][: op.nbytes]))
        elif isinstance(op, DirectCopyOp):
            src = sources[op.region]
            _check_source(src, op.nbytes, op.region, program.device)
            steps.append((COPY, _arena_slice(arena, op.arena_offset, op.nbytes), src))
        elif isinstance(op, ChecksumOp):
            assert checksums is not None  # checked above for checksum programs
            table = table_from_triples((sources[i].data_ptr(), 0, sources[i].numel()) for i in op.regions)
            steps.append((
                SUM,
                prepare_checksum_table(table, program.device),
                checksums.narrow(0, op.first, len(op.regions)),
            ))
        elif isinstance(op, ChecksumCopyOp):
            assert checksums is not None and host_checksums is not None
            steps.append((COPY, host_checksums[: op.count], checksums[: op.count]))
        else:
            steps.append((RECORD, op.name, None))
    return Bindings(
        program=program,
        sources=sources,
        arena=arena,
        chunks=tuple(chunks),
        tables=tuple(tables),
        steps=tuple(steps),
        checksums=checksums if program.checksum else None,
        host_checksums=host_checksums if program.checksum else None,
        use_triton=use_triton,
        non_blocking=non_blocking,
    )


def _check_checksums(buf: torch.Tensor | None, name: str, n: int, device: torch.device) -> None:
    if (
        not isinstance(buf, torch.Tensor)
        or buf.dtype != torch.int64
        or buf.dim() != 1
        or buf.numel() != n
        or not buf.is_contiguous()
        or buf.device != device
    ):
        got = (
            f"dtype={buf.dtype}, shape={tuple(buf.shape)}, device={buf.device}"
            if isinstance(buf, torch.Tensor)
            else type(buf).__name__
        )
        raise ValueError(
            f"a checksum program needs {name}: a contiguous int64 tensor of {n} elements (one per "
            f"region it stages) on {device}; got {got}"
        )


def _check_source(src: torch.Tensor, nbytes: int, region: int, device: torch.device) -> None:
    if src.dtype != torch.uint8 or src.dim() != 1 or src.numel() != nbytes or src.device != device:
        raise ValueError(
            f"source of region {region} must be a 1-D uint8 view of {nbytes} bytes on {device}; "
            f"got dtype={src.dtype}, shape={tuple(src.shape)}, device={src.device}"
        )


def _arena_slice(arena: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    if offset + nbytes > arena.numel():
        raise ValueError(f"arena of {arena.numel()} bytes is too small for bytes [{offset}, {offset + nbytes})")
    return arena.narrow(0, offset, nbytes)
