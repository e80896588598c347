"""The staging program: an immutable, ordered list of the ops that stage one device's regions.

A program is built once per plan and device from the plan's regions and three knobs (pack
threshold, chunk size, chunk slots). It names regions by index and bytes by offset, never by
address, so it can be built, compared and described without a GPU; addresses come in when it is
bound (:class:`~stager.graphs.bindings.Bindings`) and run, eagerly (:mod:`stager.graphs.eager`) or
as CUDA graphs (:mod:`stager.graphs.cuda_graph`). The ops are in :mod:`stager.graphs.ops`.

Runs. The plan fixes the arena layout, so a chunk copy may only cover arena bytes of packed
regions of its run (or padding): a run is a maximal sequence of regions adjacent in arena order,
on this device, each under the pack threshold, spanning at most one chunk; a run shorter than
:data:`MIN_RUN` goes direct. Small tensors that alternate with large ones in the arena (weight,
bias, weight, bias...) therefore go direct; a plan that lays each device's small regions side by
side packs them all.

Slots. Run ``k`` packs into chunk slot ``k % slots``; every op runs on one stream, so a slot is
never refilled before its previous copy was issued, and the device memory stays
``slots * chunk_bytes`` whatever the number of runs.

Checksums (``checksum=True``, a different :attr:`Program.key`): each pack hashes its regions in its
own launch, one :class:`ChecksumOp` hashes the direct ones and a :class:`ChecksumCopyOp` brings the
values to the host before the done marker. They land in one ``int64`` buffer, one slot per region
(packed ones in pack order, then the direct ones), so that every launch writes one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from stager.graphs.ops import ChecksumCopyOp, ChecksumOp, ChunkCopyOp, DirectCopyOp, Op, PackOp, RecordEventOp

if TYPE_CHECKING:
    from stager.graphs.ops import SizeText
    from stager.plan import Region

__all__ = ["MIN_RUN", "Program", "build_program"]

MIN_RUN = 2
"""Fewest small regions worth one pack launch; shorter runs are copied directly."""


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
        key = (str(self.device), self.slots, self.chunk_bytes, self.ops, self.checksum)
        object.__setattr__(self, "key", key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

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

    def describe(self, size: SizeText) -> str:
        """A readable listing of the program, one op per line, for logs; ``size`` formats a byte
        count (the stager passes ``stager.envs.format_size``)."""
        packs, directs = self.packs, self.directs
        lines = [
            f"staging program on {self.device}: {len(self.ops)} ops; "
            f"{len(self.packed_regions)} regions ({size(sum(p.nbytes for p in packs))}) packed in "
            f"{len(packs)} runs over {self.slots} chunk slot(s) of {size(self.chunk_bytes)}; "
            f"{len(directs)} regions ({size(sum(d.nbytes for d in directs))}) copied directly "
            f"(pack threshold {size(self.pack_threshold)}, chunk size {size(self.chunk_size)})"
            + ("; checksums on the device" if self.checksum else "")
        ]
        lines += [f"  {i:4d} {op.kind:<11} {op.text(size)}" for i, op in enumerate(self.ops)]
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
    ``checksum=True`` also computes every region's checksum on the device (see the module docstring).
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
            hashed = tuple(d.region for d in directs)
            ops.append(ChecksumOp(hashed, len(summed), sum(d.nbytes for d in directs)))
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
