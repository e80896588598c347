"""Verifying a written checkpoint: the tensors ``dcp.load`` filled, or every tensor of a checkpoint.

:func:`verify_state_dict` checks a state dict that ``dcp.load`` has just filled;
:func:`verify_checkpoint` loads a checkpoint on the CPU the way DCP's metadata describes it and
checks every tensor (``python -m stager verify``). Each is compared with the checksums in the
checkpoint's sidecars (:mod:`stager.integrity.sidecar`). A stored chunk that the loaded tensors do
not hold whole on this rank (resharded loads), or that was loaded into another dtype, is reported
as unverifiable, never as a mismatch.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from stager.errors import IntegrityError
from stager.integrity.checksums import tensor_checksums
from stager.integrity.sidecar import CheckpointChecksums, SavedChecksum, dtype_name, read_checksums
from stager.kernels import lanes64
from stager.kernels.lanes64 import ALGORITHM, VERSION, format_checksum

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["IntegrityReport", "Mismatch", "verify_checkpoint", "verify_state_dict"]

log = logging.getLogger("stager")


@dataclass
class Mismatch:
    """A loaded tensor chunk whose bytes differ from its saved checksum."""

    key: str
    """The key path in the loaded state dict (or DCP's fqn for :func:`verify_checkpoint`)."""
    fqn: str
    offsets: tuple[int, ...]
    file: str
    """The data file the chunk was read from, relative to the checkpoint."""
    rank: int | None
    """The rank that saved it."""
    expected: str
    found: str


@dataclass
class IntegrityReport:
    """The result of verifying a loaded checkpoint."""

    checkpoint: str
    has_checksums: bool = False
    """Whether the checkpoint carries checksums for its current save."""
    verified: int = 0
    """Saved chunks whose loaded bytes matched their checksum."""
    verified_bytes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    unverifiable: list[tuple[str, str]] = field(default_factory=list)
    """``(fqn, why)`` of saved chunks that could not be checked here (resharded, another dtype)."""
    not_loaded: int = 0
    """Saved chunks of tensors that were not loaded (not asked for)."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No mismatch (unverifiable chunks are not mismatches)."""
        return not self.mismatches


def _local_chunk(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """(the tensor this rank holds, the global offsets of its first element) or None."""
    local = getattr(t, "_local_tensor", None)
    if local is not None and hasattr(t, "__create_chunk_list__"):
        chunks = t.__create_chunk_list__()
        if len(chunks) != 1:
            return None
        return local, tuple(int(o) for o in chunks[0].offsets)
    if type(t).__name__ == "ShardedTensor":  # pragma: no cover - deprecated; say unverifiable
        return None
    return t, (0,) * t.dim()


def _check_loaded(
    report: IntegrityReport,
    sums: CheckpointChecksums,
    flat: dict[str, Any],
    paths: dict[str, tuple[Any, ...]],
) -> None:
    """Compare every saved chunk held whole by a loaded tensor of ``flat``; fill ``report``."""
    todo: list[tuple[SavedChecksum, torch.Tensor, str]] = []
    for (fqn, offsets), e in sums.entries.items():
        t = flat.get(fqn)
        if not isinstance(t, torch.Tensor):
            report.not_loaded += 1
            continue
        if dtype_name(t.dtype) != e.dtype:
            report.unverifiable.append((fqn, f"loaded as {dtype_name(t.dtype)}, saved as {e.dtype}"))
            continue
        held = _local_chunk(t)
        if held is None:
            report.unverifiable.append((fqn, "the loaded tensor's layout on this rank is not one chunk"))
            continue
        local, base = held
        if len(base) != len(offsets) or local.dim() != len(offsets):
            why = f"saved with {len(offsets)} dimensions, loaded with {local.dim()}"
            report.unverifiable.append((fqn, why))
            continue
        inside = all(b <= o and o + s <= b + n for b, o, s, n in zip(base, offsets, e.sizes, local.shape))
        if not inside:
            report.unverifiable.append(
                (fqn, f"the chunk at offsets {list(offsets)} is not held whole on this rank (resharded load)")
            )
            continue
        view = local
        for d, (b, o, s) in enumerate(zip(base, offsets, e.sizes)):
            view = view.narrow(d, o - b, s)
        path = paths.get(fqn)
        todo.append((e, view, "state_dict" + "".join(f"[{k!r}]" for k in path) if path else fqn))
    if not todo:
        return
    found = tensor_checksums([v for _, v, _ in todo], reuse_staged=False)
    for (e, view, key), f in zip(todo, found):
        if lanes64.to_unsigned(f) == e.checksum:
            report.verified += 1
            report.verified_bytes += view.numel() * view.element_size()
        else:
            report.mismatches.append(
                Mismatch(
                    key=key, fqn=e.fqn, offsets=e.offsets, file=e.file, rank=e.rank,
                    expected=format_checksum(e.checksum), found=format_checksum(f),
                )
            )


def _mismatch_error(checkpoint: str, report: IntegrityReport) -> IntegrityError:
    m = report.mismatches[0]
    more = f" ({len(report.mismatches) - 1} more tensor(s) differ too)" if len(report.mismatches) > 1 else ""
    where = f"offsets {list(m.offsets)} of " if any(m.offsets) else ""
    return IntegrityError(
        f"checkpoint {checkpoint!r}: {m.key} ({where}DCP key {m.fqn!r}, in file {m.file!r} written by rank "
        f"{m.rank}) does not match the checksum saved with it: expected {m.expected}, found {m.found} "
        f"({ALGORITHM} v{VERSION}){more}; the file was changed or corrupted after it was written. Load an "
        f"earlier checkpoint or a replica; `python -m stager verify {checkpoint}` lists every bad tensor",
        path=m.key,
        file=m.file,
        expected=m.expected,
        found=m.found,
    )


def verify_state_dict(
    path: str | os.PathLike[str],
    state_dict: Any,
    *,
    raise_on_mismatch: bool = True,
    metadata: Metadata | None = None,
) -> IntegrityReport:
    """Check a state dict that ``dcp.load`` has just filled from ``path`` against the saved checksums.

    Each saved chunk held whole by a loaded tensor on this rank (in the dtype it was saved with)
    is hashed and compared; the others are reported as unverifiable. A checkpoint written without
    checksums gives a report with ``has_checksums`` false.

    Raises:
        IntegrityError: (a ``ValueError``) a chunk differs; names its key path, its data file and
            the rank that wrote it, the expected and the found checksum. The loaded tensors hold
            the bytes read.
    """
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    t0 = time.perf_counter()
    path = os.fspath(path)
    report = IntegrityReport(checkpoint=path)
    sums = read_checksums(path, metadata)
    report.notes.extend(sums.notes)
    report.has_checksums = bool(sums.entries)
    if sums.entries:
        flat, mapping = flatten_state_dict(state_dict)
        _check_loaded(report, sums, flat, mapping)
    report.seconds = time.perf_counter() - t0
    if report.unverifiable:
        log.info(
            "stager: %d saved tensor chunk(s) of %s could not be verified here (%s: %s)",
            len(report.unverifiable), path, report.unverifiable[0][0], report.unverifiable[0][1],
        )
    if report.mismatches and raise_on_mismatch:
        raise _mismatch_error(path, report)
    return report


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    batch_bytes: int = 256 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> IntegrityReport:
    """Load every tensor of the checkpoint at ``path`` on the CPU, as DCP's metadata describes it
    (no model needed), and check each saved chunk against its checksum; never raises for a
    mismatch (they are in the report).

    Tensors are loaded in batches of about ``batch_bytes`` (one tensor larger than that alone), so
    the memory needed is one batch. ``progress(done_bytes, total_bytes)`` is called after each.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    t0 = time.perf_counter()
    path = os.fspath(path)
    metadata = FileSystemReader(path).read_metadata()
    report = IntegrityReport(checkpoint=path)
    sums = read_checksums(path, metadata)
    report.notes.extend(sums.notes)
    report.has_checksums = bool(sums.entries)
    if not sums.entries:
        report.seconds = time.perf_counter() - t0
        return report
    wanted = {fqn for fqn, _ in sums.entries}
    tensors = [
        (fqn, md) for fqn, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and fqn in wanted
    ]
    missing = wanted - {fqn for fqn, _ in tensors}
    for fqn in sorted(missing):
        report.unverifiable.append((fqn, "saved with a checksum but absent from DCP's metadata"))
    sizes = {
        fqn: int(np.prod(md.size, dtype=np.int64)) * torch.empty(0, dtype=md.properties.dtype).element_size()
        for fqn, md in tensors
    }
    total = sum(sizes.values())
    done = 0
    batch: list[tuple[str, Any]] = []
    batch_size = 0

    def flush() -> None:
        nonlocal done, batch, batch_size
        if not batch:
            return
        sd = {fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype) for fqn, md in batch}
        with warnings.catch_warnings():  # "torch.distributed is disabled...": single-process by design
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(sd, checkpoint_id=path, no_dist=True)
        part = CheckpointChecksums(entries={k: e for k, e in sums.entries.items() if k[0] in sd})
        _check_loaded(report, part, sd, {})
        done += batch_size
        batch, batch_size = [], 0
        if progress is not None:
            progress(done, total)

    for fqn, md in tensors:
        if batch and batch_size + sizes[fqn] > batch_bytes:
            flush()
        batch.append((fqn, md))
        batch_size += sizes[fqn]
    flush()
    report.seconds = time.perf_counter() - t0
    return report
