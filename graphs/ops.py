"""The ops of a staging program, in the order they run, and the step codes they are bound to.

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

Ops name regions by index and bytes by offset, never by address. Each says what it does in one
line (``text``), given a byte formatter, for :meth:`stager.graphs.program.Program.describe`.
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
