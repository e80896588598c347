"""The ops of a staging program, in the order they run, and the step codes they are bound to.

Per run a :class:`PackOp` and its :class:`ChunkCopyOp`, or a :class:`DirectCopyOp` per region;
then, in checksum programs only, one :class:`ChecksumOp` (the direct regions, from their device
sources) and one :class:`ChecksumCopyOp` (to the host, after every other copy); a
:class:`RecordEventOp` (``done``) closes every program. A pack lays its run out in the chunk
exactly as the arena does, alignment padding included, so that one copy moves it (the padding
bytes it also writes belong to no region). Ops name regions by index and bytes by offset, never by
address; each says what it does in one line (``text``) for :meth:`~stager.graphs.program.Program.describe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

__all__ = ["ChecksumCopyOp", "ChecksumOp", "ChunkCopyOp", "DirectCopyOp", "Op", "PackOp", "RecordEventOp"]

SizeText = Callable[[int], str]
"""Formats a byte count for :meth:`Program.describe` (the stager passes its byte formatter)."""

PACK, COPY, RECORD, PACK_SUM, SUM = range(5)
"""Step codes of :attr:`stager.graphs.bindings.Bindings.steps`."""


def _to_arena(offset: int, nbytes: int) -> str:
    return f"arena[{offset}:{offset + nbytes}]"


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

    def text(self, size: SizeText) -> str:
        first, last = self.regions[0], self.regions[-1]
        return f"slot {self.slot} <- {len(self.regions)} regions [{first}..{last}], {size(self.nbytes)}"


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

    def text(self, size: SizeText) -> str:
        where = _to_arena(self.arena_offset, self.nbytes)
        return f"slot {self.slot} -> {where} (regions {self.first}..{self.last}, {size(self.nbytes)})"


@dataclass(frozen=True)
class DirectCopyOp:
    """Copy region ``region`` (``nbytes``) to ``arena[arena_offset : arena_offset + nbytes]``."""

    region: int
    arena_offset: int
    nbytes: int

    kind = "copy-direct"

    def text(self, size: SizeText) -> str:
        return f"region {self.region} -> {_to_arena(self.arena_offset, self.nbytes)} ({size(self.nbytes)})"


@dataclass(frozen=True)
class RecordEventOp:
    """Record the event bound under ``name`` on the program's stream."""

    name: str = "done"

    kind = "record"

    def text(self, size: SizeText) -> str:
        return f"event {self.name!r}"


@dataclass(frozen=True)
class ChecksumOp:
    """Hash ``regions`` (copied directly) from their device sources into checksum slots
    ``first .. first + len(regions) - 1``, in one launch."""

    regions: tuple[int, ...]
    first: int
    nbytes: int
    """Bytes hashed."""

    kind = "checksum"

    def text(self, size: SizeText) -> str:
        slots = f"{self.first}..{self.first + len(self.regions) - 1}"
        return f"{len(self.regions)} direct regions ({size(self.nbytes)}) -> checksum slots {slots}"


@dataclass(frozen=True)
class ChecksumCopyOp:
    """Copy the ``count`` device checksums to the host checksum buffer."""

    count: int

    kind = "copy-sums"

    def text(self, size: SizeText) -> str:
        return f"{self.count} checksums -> host"


Op = Union[PackOp, ChunkCopyOp, DirectCopyOp, ChecksumOp, ChecksumCopyOp, RecordEventOp]
