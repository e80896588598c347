"""Binding a staging program to memory: every address resolved once, reused by every run.

:func:`bind_program` checks the buffers against the program, slices the arena, prepares every
pack and checksum table (their launch tables go to the device here, not during a run or a
capture) and turns each op into a step of :attr:`Bindings.steps` that the executors
(:mod:`stager.graphs.eager`, :mod:`stager.graphs.cuda_graph`) issue as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from stager.graphs.ops import (
    COPY,
    PACK,
    PACK_SUM,
    RECORD,
    SUM,
    ChecksumCopyOp,
    ChecksumOp,
    ChunkCopyOp,
    DirectCopyOp,
    PackOp,
)
from stager.graphs.program import Program
from stager.kernels.table import tensor_text

if TYPE_CHECKING:
    from stager.kernels import PackTable

__all__ = ["Bindings", "bind_program"]


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
    tables: tuple[PackTable, ...]
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
        raise ValueError(
            f"arena must be a 1-D uint8 tensor; got dtype={arena.dtype}, shape={tuple(arena.shape)}"
        )
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
            target = _arena_slice(arena, op.arena_offset, op.nbytes)
            steps.append((COPY, target, chunks[op.slot][: op.nbytes]))
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
        raise ValueError(
            f"a checksum program needs {name}: a contiguous int64 tensor of {n} elements (one per "
            f"region it stages) on {device}; got {tensor_text(buf)}"
        )


def _check_source(src: torch.Tensor, nbytes: int, region: int, device: torch.device) -> None:
    if src.dtype != torch.uint8 or src.dim() != 1 or src.numel() != nbytes or src.device != device:
        raise ValueError(
            f"source of region {region} must be a 1-D uint8 view of {nbytes} bytes on {device}; "
            f"got dtype={src.dtype}, shape={tuple(src.shape)}, device={src.device}"
        )


def _arena_slice(arena: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    if offset + nbytes > arena.numel():
        raise ValueError(
            f"arena of {arena.numel()} bytes is too small for bytes [{offset}, {offset + nbytes})"
        )
    return arena.narrow(0, offset, nbytes)

