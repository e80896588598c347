"""Which live host arena holds an address, and sending shared arenas' storages to other processes.

Every :class:`~stager.arena.HostArena` registers itself here as a :class:`Segment` while it lives;
:func:`find_segment` answers whether a storage lies in a staged copy. For process-based DCP
writers (README.md, "Many ranks"), torch's pickling would copy every CPU storage into a new shared
segment; :func:`install_shared_reduction` chains a reducer in front of torch's for
``UntypedStorage`` that sends a storage inside a live shared arena (:mod:`stager.shm`) as
``(path, inode, offset, nbytes)``, mapped copy-on-write by the receiver; every other storage goes
to torch's reducer unchanged. :data:`SHARE_COUNTS` counts both, so tests can prove no byte is copied.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from stager.errors import StagerError

__all__ = [
    "SHARE_COUNTS", "Segment", "ShareCounts", "find_segment", "install_shared_reduction", "mapped_segments",
    "register", "unregister",
]


@dataclass(frozen=True)
class Segment:
    """One live host arena, as the registry knows it."""

    base: int
    """Address of its first byte."""
    nbytes: int
    path: str | None
    """Its ``/dev/shm`` file when shared, else ``None``."""
    ident: tuple[int, int] | None
    """``(st_dev, st_ino)`` of the file: a reused path is never mistaken for this segment."""
    array: "weakref.ref[np.ndarray]"
    """The arena's uint8 array; storages over it keep it alive."""

    def tensor(self) -> torch.Tensor | None:
        """A uint8 tensor over the whole arena, or ``None`` if it is gone."""
        arr = self.array()
        return None if arr is None else torch.from_numpy(arr)


_registry_lock = threading.Lock()
_bases: list[int] = []
_segments: dict[int, Segment] = {}


def register(seg: Segment) -> None:
    """Record a new live arena."""
    with _registry_lock:
        i = bisect_right(_bases, seg.base)
        _bases.insert(i, seg.base)
        _segments[seg.base] = seg


def unregister(base: int) -> None:
    """Forget the arena at ``base`` (its memory is being released)."""
    with _registry_lock:
        if _segments.pop(base, None) is not None:
            _bases.remove(base)


def find_segment(ptr: int, nbytes: int) -> Segment | None:
    """The live arena that holds ``[ptr, ptr + nbytes)`` entirely, or ``None``."""
    with _registry_lock:
        i = bisect_right(_bases, ptr) - 1
        if i < 0:
            return None
        seg = _segments[_bases[i]]
    return seg if ptr + nbytes <= seg.base + seg.nbytes else None


class ShareCounts:
    """What the multiprocessing reducer did with CPU storages in this process (cumulative).

    Each count has its ``bytes_`` twin. ``by_reference``: storages inside a shared arena, sent as
    (segment, offset, nbytes), no byte copied; ``delegated``: storages handed to torch's reducer
    (which copies any storage it did not allocate shared); ``mapped``: storages rebuilt here over
    a mapped segment (counted in the receiving process).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Set every count back to 0."""
        self.by_reference = self.bytes_by_reference = 0
        self.delegated = self.bytes_delegated = 0
        self.mapped = self.bytes_mapped = 0


SHARE_COUNTS = ShareCounts()
"""Cumulative counts for this process; see :class:`ShareCounts`."""

_previous_reducer: Callable[[Any], Any] | None = None
_install_lock = threading.Lock()


def _reduce_storage(storage: torch.UntypedStorage) -> Any:
    if storage.device.type == "cpu":
        nbytes = storage.nbytes()
        ptr = storage.data_ptr()
        seg = find_segment(ptr, nbytes) if nbytes else None
        if seg is not None and seg.path is not None:
            SHARE_COUNTS.by_reference += 1
            SHARE_COUNTS.bytes_by_reference += nbytes
            return (_rebuild_storage, (seg.path, seg.ident, seg.nbytes, ptr - seg.base, nbytes))
        SHARE_COUNTS.delegated += 1
        SHARE_COUNTS.bytes_delegated += nbytes
    previous = _previous_reducer
    if previous is None:  # pragma: no cover - installed before this reducer can run
        from torch.multiprocessing.reductions import reduce_storage as previous
    return previous(storage)


_reduce_storage._stager = True  # type: ignore[attr-defined]


def install_shared_reduction() -> None:
    """Send storages inside shared arenas to other processes by reference (idempotent).

    Chains a reducer for ``torch.UntypedStorage`` in front of the one ``torch.multiprocessing``
    registered with ``multiprocessing``'s ``ForkingPickler``. Only storages that lie inside a live
    shared :class:`~stager.arena.HostArena` are affected; every other storage is reduced by torch
    as before. Called when the first shared arena is created.
    """
    global _previous_reducer
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reducers first)

    with _install_lock:
        current = ForkingPickler._extra_reducers.get(torch.UntypedStorage)
        if getattr(current, "_stager", False):
            return
        if current is None:
            from torch.multiprocessing.reductions import reduce_storage as current
        _previous_reducer = current
        ForkingPickler.register(torch.UntypedStorage, _reduce_storage)


_child_lock = threading.Lock()
_child_maps: "weakref.WeakValueDictionary[tuple, np.ndarray]" = weakref.WeakValueDictionary()


def _rebuild_storage(
    path: str, ident: tuple[int, int] | None, size: int, offset: int, nbytes: int
) -> torch.UntypedStorage:
    """Map (once per process) the shared arena at ``path`` and return a storage over a slice."""
    key = (path, ident)
    with _child_lock:
        arr = _child_maps.get(key)
        if arr is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise StagerError(
                    f"shared arena segment {path} is gone ({exc}): the staging process released the "
                    "staged dict before this process read it, or exited; keep the staged dict (and "
                    "the staging process) alive until the write completes"
                ) from None
            try:
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) != tuple(ident or ()) or info.st_size < size:
                    raise StagerError(
                        f"shared arena segment {path} was replaced after the staged dict was sent; "
                        "keep the staged dict alive until the write completes"
                    )
                # Copy-on-write: reads share the trainer's pages, a write stays in this process.
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
            arr = np.frombuffer(mm, dtype=np.uint8, count=size)
            _child_maps[key] = arr
    SHARE_COUNTS.mapped += 1
    SHARE_COUNTS.bytes_mapped += nbytes
    return torch.frombuffer(arr, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()


def mapped_segments() -> list[tuple[int, int]]:
    """``(address, nbytes)`` of every shared arena this process has mapped from another one."""
    with _child_lock:
        return [(int(a.ctypes.data), a.nbytes) for a in _child_maps.values()]

