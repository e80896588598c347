"""Integrity: a checksum for every staged region and every saved tensor, verified where bytes return.

The checksum is ``stager-lanes64`` version 1 (:mod:`stager.kernels.lanes64`: a 64-bit,
non-cryptographic checksum over 8-byte lanes, order-independent in parallel, identical on the CPU,
in plain torch and in the Triton kernels). This module holds everything around it that is not a
kernel:

Staged copies (in-memory restore, replicas)
    :func:`checksum_staged_set` computes the checksum of every region of a
    :class:`~stager.arena.StagedSet` with one vectorised pass over its arena (numpy, a few cached
    lanes at a time) and stores them on the set (``staged_set.checksums``: ``int64``, one per
    region; ``staged_set.checksum_s``: the seconds it took). The staging pipeline calls it after
    the copy is complete (``STAGER_CHECKSUM=on``), passing as ``known`` the values the device
    staging programs computed in their kernels, so that only regions with CPU sources are hashed
    here; :func:`store_checksums` stores values computed elsewhere. Either registers the set, so that code that only holds a staged
    tensor finds its region's checksum: :func:`region_of` (by the tensor's storage, which is the
    region's own storage: a handed-out tensor, a view of it, a replica's tensor). The values stay
    valid until the set is staged into again, which the lease rules forbid while anything holds
    one of its tensors. :func:`verify_staged_tensors` recomputes the checksums of the regions
    under a list of staged tensors and raises :class:`~stager.errors.IntegrityError` naming the
    key path of the first that differs (restore and the replicator call it).

Saved checkpoints
    :class:`ChecksumWriter` is DCP's ``FileSystemWriter`` that also writes, beside DCP's files, a
    small JSON *sidecar* per rank (``__<rank>_stager-checksums.json``) with the checksum of every
    tensor item the rank saved: ``fqn``, chunk offsets and sizes, dtype, the checksum of the
    chunk's bytes as DCP saved it (``tensor.contiguous()``), the data file and the algorithm's
    name and version. A staged tensor that is a whole region reuses the region's stored checksum
    (no pass over its bytes); any other tensor is hashed on the writer thread. Each sidecar
    carries the save's id (the ``save_id`` DCP stores in its metadata), so a sidecar left over
    from an older save in the same directory is never believed. :func:`verify_state_dict`
    checks a state dict that ``dcp.load`` has just filled; :func:`verify_checkpoint` loads a
    checkpoint on the CPU the way DCP's metadata describes it and checks every tensor (``python
    -m stager verify``). A stored chunk that the loaded tensors do not hold whole on this rank
    (resharded loads), or that was loaded into another dtype, is reported as unverifiable, never
    as a mismatch.

Importing this module imports no Triton and no ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

from stager.errors import IntegrityError
from stager.kernels import lanes64
from stager.kernels.lanes64 import ALGORITHM, VERSION, format_checksum

if TYPE_CHECKING:
    from stager.arena import StagedSet
    from stager.stats import StageStats

__all__ = [
    "ALGORITHM",
    "VERSION",
    "SIDECAR_SUFFIX",
    "ChecksumWriter",
    "IntegrityReport",
    "Mismatch",
    "StagedVerification",
    "checksum_staged_set",
    "clear_checksums",
    "compute_set_checksums",
    "read_checksums",
    "region_checksums",
    "region_of",
    "staged_checksum",
    "store_checksums",
    "tensor_checksums",
    "verify_checkpoint",
    "verify_staged_tensors",
    "verify_state_dict",
]

log = logging.getLogger("stager")

SIDECAR_SUFFIX = "stager-checksums.json"
"""A rank's sidecar is ``<DCP's file prefix for the rank><SIDECAR_SUFFIX>``: ``__0_stager-checksums.json``."""
_SIDECAR_FORMAT = "stager-checksums"
_SIDECAR_FORMAT_VERSION = 1
_IN_PLACE_MIN = 64 << 10  # a buffer this large is hashed where it lies; smaller ones are packed first


# ------------------------------------------------------------------------------ checksums of bytes


def _as_flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a contiguous 1-D uint8 CPU tensor (a view when already so)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def region_checksums(buffers: Sequence[torch.Tensor], *, threads: int = 1) -> torch.Tensor:
    """The ``stager-lanes64`` checksum of each 1-D ``uint8`` CPU tensor, as an ``int64`` tensor.

    One vectorised pass: buffers that lie, 8-byte aligned and without overlapping, in one live
    host arena (a staged set's regions) are hashed together in place over the arena; otherwise
    each large aligned buffer is hashed in place and the small or misaligned ones are first
    packed into one aligned scratch buffer. ``threads > 1`` splits the lanes over threads.
    """
    n = len(buffers)
    for i, b in enumerate(buffers):
        if b.device.type != "cpu" or b.dtype != torch.uint8 or b.dim() != 1 or not b.is_contiguous():
            raise ValueError(
                f"region_checksums: buffer {i} must be a contiguous 1-D uint8 CPU tensor; got "
                f"dtype={b.dtype}, shape={tuple(b.shape)}, device={b.device}"
            )
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    ptrs = np.fromiter((b.data_ptr() for b in buffers), dtype=np.int64, count=n)
    sizes = np.fromiter((b.numel() for b in buffers), dtype=np.int64, count=n)
    if not _in_one_arena(ptrs, sizes, out, threads):
        _one_by_one(buffers, ptrs, sizes, out, threads)
    return torch.from_numpy(out.view(np.int64).copy())


def _in_one_arena(ptrs: np.ndarray, sizes: np.ndarray, out: np.ndarray, threads: int) -> bool:
    """Hash every buffer in place over the live arena that holds them all; False if it cannot."""
    from stager.arena import find_segment

    order = np.lexsort((sizes, ptrs))
    p, s = ptrs[order], sizes[order]
    keep = np.ones(p.size, dtype=bool)
    keep[1:] = (p[1:] != p[:-1]) | (s[1:] != s[:-1])  # the same bytes twice: hash them once
    up, us = p[keep], s[keep]
    if np.any(up % 8) or np.any(up[1:] < up[:-1] + us[:-1]):
        return False
    lo, hi = int(up[0]), int((up + us).max())
    seg = find_segment(lo, max(hi - lo, 1))
    arr = seg.array() if seg is not None else None
    if arr is None or seg.base % 8:
        return False
    sums = lanes64.span_checksums(arr, up - seg.base, us, threads=threads)
    group = np.cumsum(keep) - 1  # index into the unique buffers, per sorted buffer
    out[order] = sums[group]
    return True


def _one_by_one(
    buffers: Sequence[torch.Tensor], ptrs: np.ndarray, sizes: np.ndarray, out: np.ndarray, threads: int
) -> None:
    small = [i for i in range(len(buffers)) if sizes[i] < _IN_PLACE_MIN or ptrs[i] % 8]
    for i in range(len(buffers)):
        if sizes[i] >= _IN_PLACE_MIN and ptrs[i] % 8 == 0:
            out[i] = lanes64.span_checksums(buffers[i].numpy(), [0], [int(sizes[i])], threads=threads)[0]
    if not small:
        return
    starts = np.zeros(len(small), dtype=np.int64)
    cursor = 0
    for k, i in enumerate(small):
        starts[k] = cursor
        cursor += (int(sizes[i]) + 7) // 8 * 8
    scratch = np.empty(max(cursor, 8), dtype=np.uint8)
    dst = torch.from_numpy(scratch)
    torch._foreach_copy_(
        [dst[int(starts[k]) : int(starts[k]) + int(sizes[i])] for k, i in enumerate(small)],
        [buffers[i] for i in small],
    )
    out[small] = lanes64.span_checksums(scratch, starts, sizes[small], threads=threads)


def tensor_checksums(tensors: Sequence[torch.Tensor], *, reuse_staged: bool = True) -> list[int]:
    """The checksum of each tensor's elements as a contiguous array (``int64`` bits).

    With ``reuse_staged``, a staged tensor that is exactly its region (contiguous, from the
    region's first byte, all of its bytes) takes the checksum stored for the region, if any;
    the others are hashed now (non-contiguous or device tensors through a contiguous host copy).
    """
    values: list[int | None] = [staged_checksum(t) if reuse_staged else None for t in tensors]
    todo = [i for i, v in enumerate(values) if v is None]
    if todo:
        fresh = region_checksums([_as_flat_bytes(tensors[i]) for i in todo]).tolist()
        for i, v in zip(todo, fresh):
            values[i] = v
    return values  # type: ignore[return-value]


# ------------------------------------------------------------------------------ staged sets


_registry_lock = threading.Lock()
_by_storage: dict[int, tuple["weakref.ref[StagedSet]", int]] = {}


def _register(staged_set: "StagedSet") -> None:
    if getattr(staged_set, "_integrity_keys", None) is not None:
        return
    keys = [b.untyped_storage()._cdata for b in staged_set.bases]

    def forget(ref: "weakref.ref[StagedSet]", keys: list[int] = keys) -> None:
        with _registry_lock:
            for k in keys:
                if _by_storage.get(k, (None, 0))[0] is ref:
                    del _by_storage[k]

    ref = weakref.ref(staged_set, forget)
    with _registry_lock:
        for i, k in enumerate(keys):
            _by_storage[k] = (ref, i)
    staged_set._integrity_keys = keys  # type: ignore[attr-defined]


def store_checksums(staged_set: "StagedSet", values: torch.Tensor | Sequence[int], *, seconds: float = 0.0) -> None:
    """Store one checksum per region on ``staged_set`` (``checksums``, ``checksum_s``) and make
    its tensors findable by :func:`region_of`.

    For the staging pipeline: call it with the values the device kernels computed (the fused pack
    and the checksum op, copied to the host), once the copy they describe is complete. Values
    are ``int64`` with the bits of the ``uint64`` checksums, in region order.
    """
    t = torch.as_tensor(values, dtype=torch.int64).detach().to("cpu").reshape(-1).clone()
    if t.numel() != len(staged_set.plan.regions):
        raise ValueError(
            f"store_checksums: got {t.numel()} checksums for a staged set of {len(staged_set.plan.regions)} regions; "
            "pass one per region, in region order"
        )
    _register(staged_set)
    staged_set.checksum_s = float(seconds)  # type: ignore[attr-defined]
    staged_set.checksums = t  # type: ignore[attr-defined]


def _layout(staged_set: "StagedSet") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _set_checksums(staged_set: "StagedSet", regions: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Checksums (uint64) of the set's regions now, all of them or those in ``regions``."""
    order, starts, sizes = _layout(staged_set)
    if regions is not None:
        pick = np.isin(order, regions)
        order, starts, sizes = order[pick], starts[pick], sizes[pick]
    sums = lanes64.span_checksums(staged_set.arena.array, starts, sizes, threads=threads)
    out = np.zeros(len(staged_set.plan.regions), dtype=np.uint64)
    out[order] = sums
    return out


def compute_set_checksums(staged_set: "StagedSet") -> torch.Tensor:
    """The checksum of every region of ``staged_set`` as its bytes are now (``int64``), without
    storing them."""
    return torch.from_numpy(_set_checksums(staged_set).view(np.int64))


def clear_checksums(staged_set: "StagedSet") -> None:
    """Forget the checksums stored on ``staged_set`` (its bytes are about to be replaced by a copy
    that has none, e.g. a replica received without checksums)."""
    staged_set.checksums = None  # type: ignore[attr-defined]
    staged_set.checksum_s = 0.0  # type: ignore[attr-defined]


def checksum_staged_set(
    staged_set: "StagedSet",
    stats: "StageStats | None" = None,
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


def region_of(t: torch.Tensor) -> tuple["StagedSet", int] | None:
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
    if t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0 or t.is_conj() or t.is_neg():
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
    wanted: dict[int, tuple["StagedSet", dict[int, str]]] = {}
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
                f"cannot {what} state_dict{paths[i]}: its staged copy no longer matches the checksum taken when it "
                f"was staged (region {i}, {r.nbytes} bytes: expected {format_checksum(int(stored[i]))}, found "
                f"{format_checksum(int(fresh[i]))}, {ALGORITHM} v{VERSION}); its host memory changed since"
                + (f", and {bad.size - 1} more region(s) too" if bad.size > 1 else "")
                + f"; nothing was written. {_staged_advice(what)}",
                path=f"state_dict{paths[i]}",
                file=None,
                expected=format_checksum(int(stored[i])),
                found=format_checksum(int(fresh[i])),
            )
        result.regions += int(idx.size)
        result.nbytes += int(sum(staged_set.plan.regions[int(i)].nbytes for i in idx))
    result.seconds = time.perf_counter() - t0
    return result


def _staged_advice(what: str) -> str:
    if what == "restore":
        return "Restore from a replica or load the last checkpoint instead"
    return "Stage again from the live state, or load the last checkpoint"


# ------------------------------------------------------------------------------ the sidecar


def _sidecar_entries(path: str) -> list[str]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(SIDECAR_SUFFIX) and not n.endswith(".tmp"))


@dataclass(frozen=True)
class SavedChecksum:
    """One saved tensor chunk's checksum, as a sidecar records it."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str
    checksum: int
    """``uint64`` value."""
    file: str
    """The data file DCP wrote the chunk to (relative to the checkpoint)."""
    rank: int | None
    sidecar: str


@dataclass
class CheckpointChecksums:
    """Every checksum the sidecars of a checkpoint hold for its current save."""

    entries: dict[tuple[str, tuple[int, ...]], SavedChecksum] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Sidecars ignored, and why (another save's, another algorithm version, unreadable)."""


def _save_id(metadata: Any) -> str | None:
    meta = getattr(metadata, "storage_meta", None)
    return getattr(meta, "save_id", None) if meta is not None else None


def read_checksums(path: str | os.PathLike[str], metadata: Any = None) -> CheckpointChecksums:
    """The checksums stored beside the checkpoint at ``path`` (empty when written without them).

    Only sidecars written by the save that DCP's metadata describes are used (their save id
    matches); others, and sidecars of an algorithm or version this stager does not know, are
    listed in ``notes`` and ignored.
    """
    path = os.fspath(path)
    if metadata is None:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(path).read_metadata()
    save_id = _save_id(metadata)
    out = CheckpointChecksums()
    for name in _sidecar_entries(path):
        full = os.path.join(path, name)
        try:
            with open(full, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            out.notes.append(f"{name}: unreadable ({exc}); its tensors are unverifiable")
            continue
        if doc.get("format") != _SIDECAR_FORMAT:
            out.notes.append(f"{name}: not a stager checksum file; ignored")
            continue
        if doc.get("algorithm") != ALGORITHM or doc.get("version") != VERSION:
            out.notes.append(
                f"{name}: written with {doc.get('algorithm')} v{doc.get('version')}, this stager checks "
                f"{ALGORITHM} v{VERSION}; its tensors are unverifiable"
            )
            continue
        if save_id is None or doc.get("save_id") != save_id:
            out.notes.append(f"{name}: from another save into this directory (save id differs); ignored")
            continue
        for e in doc.get("entries", ()):
            key = (e["fqn"], tuple(e["offsets"]))
            out.entries[key] = SavedChecksum(
                fqn=e["fqn"],
                offsets=tuple(e["offsets"]),
                sizes=tuple(e["sizes"]),
                dtype=e["dtype"],
                checksum=int(e["checksum"], 16),
                file=e.get("file", ""),
                rank=doc.get("rank"),
                sidecar=name,
            )
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def __getattr__(name: str) -> Any:
    # ChecksumWriter subclasses DCP's FileSystemWriter: importing it imports DCP, so it lives in
    # stager.integrity_writer and is loaded on first use.
    if name in ("ChecksumWriter", "WriteChecksumStats"):
        from stager import integrity_writer

        return getattr(integrity_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ verifying loads


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


def _key_path(path: tuple[Any, ...] | None, fqn: str) -> str:
    if not path:
        return fqn
    return "state_dict" + "".join(f"[{k!r}]" for k in path)


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
        if _dtype_name(t.dtype) != e.dtype:
            report.unverifiable.append((fqn, f"loaded as {_dtype_name(t.dtype)}, saved as {e.dtype}"))
            continue
        held = _local_chunk(t)
        if held is None:
            report.unverifiable.append((fqn, "the loaded tensor's layout on this rank is not one chunk"))
            continue
        local, base = held
        if len(base) != len(offsets) or local.dim() != len(offsets):
            report.unverifiable.append((fqn, f"saved with {len(offsets)} dimensions, loaded with {local.dim()}"))
            continue
        inside = all(
            b <= o and o + s <= b + n for b, o, s, n in zip(base, offsets, e.sizes, local.shape)
        )
        if not inside:
            report.unverifiable.append(
                (fqn, f"the chunk at offsets {list(offsets)} is not held whole on this rank (resharded load)")
            )
            continue
        view = local
        for d, (b, o, s) in enumerate(zip(base, offsets, e.sizes)):
            view = view.narrow(d, o - b, s)
        todo.append((e, view, _key_path(paths.get(fqn), fqn)))
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
    path: str | os.PathLike[str], state_dict: Any, *, raise_on_mismatch: bool = True, metadata: Any = None
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
    sizes = {fqn: int(np.prod(md.size, dtype=np.int64)) * torch.empty(0, dtype=md.properties.dtype).element_size()
             for fqn, md in tensors}
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
