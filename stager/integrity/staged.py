"""Checksums of staged sets: computed once a copy is complete, stored on the set, verified again.

Storing them (:func:`checksum_staged_set`, :func:`store_checksums`) registers the set, so that code
holding only a staged tensor (a handed-out one, a view of it, a replica's) finds its region's
checksum by storage (:func:`region_of`). The values stay valid until the set is staged into again,
which the lease rules forbid while anything holds one of its tensors.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from stager.errors import IntegrityError
from stager.kernels import lanes64
from stager.kernels.lanes64 import ALGORITHM, VERSION, format_checksum

if TYPE_CHECKING:
    from stager.staged_set import StagedSet
    from stager.stats import StageStats

__all__ = [
    "StagedVerification", "checksum_staged_set", "clear_checksums", "compute_set_checksums", "region_of",
    "staged_checksum", "store_checksums", "verify_staged_tensors",
]


_registry_lock = threading.Lock()
_by_storage: dict[int, tuple[weakref.ref[StagedSet], int]] = {}


def _register(staged_set: StagedSet) -> None:
    if getattr(staged_set, "_integrity_keys", None) is not None:
        return
    keys = [b.untyped_storage()._cdata for b in staged_set.bases]

    def forget(ref: weakref.ref[StagedSet], keys: list[int] = keys) -> None:
        with _registry_lock:
            for k in keys:
                if _by_storage.get(k, (None, 0))[0] is ref:
                    del _by_storage[k]

    ref = weakref.ref(staged_set, forget)
    with _registry_lock:
        for i, k in enumerate(keys):
            _by_storage[k] = (ref, i)
    staged_set._integrity_keys = keys  # type: ignore[attr-defined]


def store_checksums(
    staged_set: StagedSet, values: torch.Tensor | Sequence[int], *, seconds: float = 0.0
) -> None:
    """Store one checksum per region on ``staged_set`` (``checksums``, ``checksum_s``) and make
    its tensors findable by :func:`region_of`.

    For the staging pipeline: call it with the values the device kernels computed (the fused pack
    and the checksum op, copied to the host), once the copy they describe is complete. Values
    are ``int64`` with the bits of the ``uint64`` checksums, in region order.
    """
    t = torch.as_tensor(values, dtype=torch.int64).detach().to("cpu").reshape(-1).clone()
    if t.numel() != len(staged_set.plan.regions):
        raise ValueError(
            f"store_checksums: got {t.numel()} checksums for a staged set of "
            f"{len(staged_set.plan.regions)} regions; pass one per region, in region order"
        )
    _register(staged_set)
    staged_set.checksum_s = float(seconds)  # type: ignore[attr-defined]
    staged_set.checksums = t  # type: ignore[attr-defined]


def _layout(staged_set: StagedSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, sorted arena offsets, sorted sizes)`` of the set's regions, cached on the set."""
    cached = getattr(staged_set, "_integrity_layout", None)
    if cached is None:
        regions = staged_set.plan.regions
        starts = np.fromiter((r.arena_offset for r in regions), dtype=np.int64, count=len(regions))
        sizes = np.fromiter((r.nbytes for r in regions), dtype=np.int64, count=len(regions))
        order = np.lexsort((sizes, starts))
        cached = (order, starts[order], sizes[order])
        staged_set._integrity_layout = cached  # type: ignore[attr-defined]
    return cached


def _set_checksums(staged_set: StagedSet, regions: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Checksums (uint64) of the set's regions now, all of them or those in ``regions``."""
    order, starts, sizes = _layout(staged_set)
    if regions is not None:
        pick = np.isin(order, regions)
        order, starts, sizes = order[pick], starts[pick], sizes[pick]
    sums = lanes64.span_checksums(staged_set.arena.array, starts, sizes, threads=threads)
    out = np.zeros(len(staged_set.plan.regions), dtype=np.uint64)
    out[order] = sums
    return out


def compute_set_checksums(staged_set: StagedSet) -> torch.Tensor:
    """The checksum of every region of ``staged_set`` as its bytes are now (``int64``), without
    storing them."""
    return torch.from_numpy(_set_checksums(staged_set).view(np.int64))


def clear_checksums(staged_set: StagedSet) -> None:
    """Forget the checksums stored on ``staged_set`` (its bytes are about to be replaced by a copy
    that has none, e.g. a replica received without checksums)."""
    staged_set.checksums = None  # type: ignore[attr-defined]
    staged_set.checksum_s = 0.0  # type: ignore[attr-defined]


def checksum_staged_set(
    staged_set: StagedSet,
    stats: StageStats | None = None,
    *,
    known: tuple[Sequence[int], torch.Tensor] | None = None,
) -> None:
    """Compute and store the checksum of every region of ``staged_set`` (the staging hook).

    Call it on the staging (or writer) thread once every copy into the set is complete and
    before the staged dict is handed to anyone who verifies it (a restore, a replicator, a
    writer). One vectorised pass over the regions' bytes in the arena, on the calling thread;
    stores ``staged_set.checksums`` (``int64``, one per region), ``staged_set.checksum_s`` and,
    with ``stats``, adds the time to ``stats.checksum_s``.

    ``known``: ``(region indices, int64 checksums)`` computed elsewhere for those regions (by the
    device staging programs, :func:`stager.device.device_checksums`); they are stored as given
    and only the other regions (CPU sources) are hashed here.
    """
    t0 = time.perf_counter()
    if known is None:
        values = _set_checksums(staged_set)
    else:
        idx = np.asarray(list(known[0]), dtype=np.int64)
        have = np.zeros(len(staged_set.plan.regions), dtype=bool)
        have[idx] = True
        rest = np.flatnonzero(~have)
        values = _set_checksums(staged_set, rest) if rest.size else np.zeros(have.size, dtype=np.uint64)
        values[idx] = torch.as_tensor(known[1], dtype=torch.int64).reshape(-1).numpy().view(np.uint64)
    seconds = time.perf_counter() - t0
    store_checksums(staged_set, torch.from_numpy(values.view(np.int64)), seconds=seconds)
    if stats is not None:
        stats.checksum_s += seconds


def region_of(t: torch.Tensor) -> tuple[StagedSet, int] | None:
    """``(staged set, region index)`` of a staged tensor whose set has stored checksums, else None.

    Found by the tensor's storage, which is its region's own storage. A set being staged into
    again (in flight) has no valid checksums and gives None.
    """
    try:
        key = t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
        return None
    with _registry_lock:
        entry = _by_storage.get(key)
    if entry is None:
        return None
    staged_set = entry[0]()
    if staged_set is None or getattr(staged_set, "checksums", None) is None or staged_set.in_flight:
        return None
    return staged_set, entry[1]


def staged_checksum(t: torch.Tensor) -> int | None:
    """The stored checksum of a staged tensor that is exactly its whole region, else None."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0:
        return None
    if t.is_conj() or t.is_neg():
        return None
    hit = region_of(t)
    if hit is None:
        return None
    staged_set, i = hit
    nbytes = t.numel() * t.element_size()
    if nbytes != staged_set.plan.regions[i].nbytes or nbytes != t.untyped_storage().nbytes():
        return None
    return int(staged_set.checksums[i])


@dataclass
class StagedVerification:
    """What :func:`verify_staged_tensors` checked."""

    regions: int = 0
    """Regions whose bytes were hashed again and matched."""
    nbytes: int = 0
    """Bytes hashed."""
    unverified: list[str] = field(default_factory=list)
    """Key paths of tensors with no stored checksum (staged without them, or not staged by us)."""
    seconds: float = 0.0


def verify_staged_tensors(
    items: Iterable[tuple[torch.Tensor, str]], *, what: str = "restore", threads: int = 1
) -> StagedVerification:
    """Hash again the regions under ``(staged tensor, key path)`` pairs and compare with the
    checksums stored when they were staged (or received).

    Raises:
        IntegrityError: a region's bytes changed; names the key path of a tensor over it, the
            expected and the found checksum. Nothing else has been done by then (``what`` names
            the operation refused: restore, send...).
    """
    t0 = time.perf_counter()
    result = StagedVerification()
    wanted: dict[int, tuple[StagedSet, dict[int, str]]] = {}
    if not _by_storage:  # no set has checksums in this process: nothing to look up
        result.unverified = [p for t, p in items if isinstance(t, torch.Tensor) and t.numel() > 0]
        result.seconds = time.perf_counter() - t0
        return result
    for t, path in items:
        hit = region_of(t) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else None
        if hit is None:
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                result.unverified.append(path)
            continue
        staged_set, i = hit
        wanted.setdefault(id(staged_set), (staged_set, {}))[1].setdefault(i, path)
    for staged_set, paths in wanted.values():
        idx = np.fromiter(paths, dtype=np.int64, count=len(paths))
        fresh = _set_checksums(staged_set, idx, threads=threads)
        stored = staged_set.checksums.numpy().view(np.uint64)
        bad = idx[fresh[idx] != stored[idx]]
        if bad.size:
            i = int(bad.min())
            r = staged_set.plan.regions[i]
            raise IntegrityError(
                f"cannot {what} state_dict{paths[i]}: its staged copy no longer matches the checksum taken "
                f"when it was staged (region {i}, {r.nbytes} bytes: expected "
                f"{format_checksum(int(stored[i]))}, found {format_checksum(int(fresh[i]))}, "
                f"{ALGORITHM} v{VERSION}); its host memory changed since"
                + (f", and {bad.size - 1} more region(s) too" if bad.size > 1 else "")
                + "; nothing was written. "
                + ("Restore from a replica or load the last checkpoint instead" if what == "restore"
                   else "Stage again from the live state, or load the last checkpoint"),
                path=f"state_dict{paths[i]}",
                file=None,
                expected=format_checksum(int(stored[i])),
                found=format_checksum(int(fresh[i])),
            )
        result.regions += int(idx.size)
        result.nbytes += int(sum(staged_set.plan.regions[int(i)].nbytes for i in idx))
    result.seconds = time.perf_counter() - t0
    return result
