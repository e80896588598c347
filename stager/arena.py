"""Host arenas (one block of host memory per staged copy) and the staged sets leased from them.

An arena is an exact-size anonymous mapping (or a ``/dev/shm`` file for shared memory), touched in
parallel and, when pinning, registered with CUDA once (``cudaHostRegister``), never through
PyTorch's caching host allocator, which rounds a block up to a power of two.

Shared memory and process-based writers. ``dcp.async_save(...,
async_checkpointer_type=AsyncCheckpointerType.PROCESS)`` sends the staged dict to a spawned writer
process through ``multiprocessing`` pickling, where torch's reduction of a CPU storage calls
``_share_fd_cpu_()``: a storage torch did not allocate in shared memory (ours, made by
``torch.frombuffer``) is *copied* into a new shared segment, one file descriptor per storage, and
the staged tensor is silently moved there. A shared arena is instead one ``/dev/shm`` file (one
segment per arena, however many regions it holds), and :func:`install_shared_reduction` chains a
reducer in front of torch's for ``UntypedStorage``: a storage that lies inside a live shared arena
is sent as ``(path, inode, offset, nbytes)`` and mapped by the receiving process (copy-on-write, so
the writer can never scribble on the trainer's copy); every other storage goes to torch's reducer
unchanged. Each staged storage keeps exactly its region's bytes, so DCP's writer does not clone it
either. :data:`SHARE_COUNTS` counts what was sent by reference and what was handed to torch, which
is how the tests prove that no byte is copied on the way to the writer.

A :class:`StagedSet` is the set of staged tensors of one plan over one arena. Each region gets its
own storage of exactly its bytes (``torch.frombuffer`` over the arena), each leaf a tensor over that
storage. The set is created once and handed out again on later stages, as long as it is not
*leased*: a staged set is leased while anything outside the stager still references one of its
tensors or storages (its staged dict, a view, a writer's reference). The check compares Python
reference counts of the staged tensors and the use counts of the staged storages with the values
they had when the set was built, so it costs two C-level passes over the leaves and no
allocation.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
import weakref
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from stager import shm
from stager.errors import StagerError, StagingMemoryError

if TYPE_CHECKING:
    from stager.plan import Leaf, Plan

__all__ = [
    "HostArena",
    "StagedSet",
    "Segment",
    "find_segment",
    "install_shared_reduction",
    "ShareCounts",
    "SHARE_COUNTS",
    "mapped_segments",
    "SHM_DIR",
]

log = logging.getLogger("stager")

_PAGE = mmap.PAGESIZE
_TOUCH_CHUNK = 64 << 20
_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
SHM_DIR = "/dev/shm"
"""Where shared arenas are created (a tmpfs; often only 64 MB inside a container)."""


def _touch(view: np.ndarray) -> None:
    view.fill(0)


_HOST_REGISTER_PORTABLE = 1
"""``cudaHostRegisterPortable``: pinned for every device's context (the arena of a state dict
spread over several GPUs is copied into from each of them). Under unified addressing the default
flags imply it; torch's own ``_pin_memory_utils`` passes it explicitly too."""


def _context_device() -> int:
    """The device whose context ``cudaHostRegister``/``Unregister`` should run in.

    They run in the current device's primary context and create it when it does not exist yet:
    a process that works on ``cuda:3`` but never called ``set_device`` would get a context (some
    hundreds of MiB) on ``cuda:0``. Prefer the current device when it has a context, else any
    device that has one (the one the state dict lives on), else the current device.
    """
    current = torch.cuda.current_device()
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        return current
    try:
        if has_context(current):
            return current
        for index in range(torch.cuda.device_count()):
            if has_context(index):
                return index
    except Exception:  # pragma: no cover - a torch without the probe's usual signature
        pass
    return current


_KEPT_MAPPINGS: list[mmap.mmap] = []
"""Arenas whose unregistration failed: never unmapped (see :func:`_release`)."""
_CUDART_UNLOADING = 4
"""``cudaErrorCudartUnloading``: the runtime is shutting down (a finalizer at exit)."""


def _consume_cuda_error(device: int) -> None:
    """Clear the CUDA runtime's per-thread "last error" after a failed (un)registration.

    torch's ``cudart()`` bindings return the error code without clearing it (torch itself follows
    a handled failure with ``(void)cudaGetLastError()``); left set, the next kernel launch check
    on this thread would raise it as that kernel's error (a spurious "out of memory" in the
    training loop after a pinning failure). One tiny kernel launch reads, clears and raises it.
    """
    try:
        if torch.cuda.is_current_stream_capturing():
            return  # that capture is invalidated anyway, and ending it clears the error
        torch.zeros(1, device=torch.device("cuda", device))
    except Exception:  # the stale error itself, raised (and cleared) by the launch check
        pass


def _cuda_register(ptr: int, nbytes: int) -> int:
    """Pin ``[ptr, ptr + nbytes)`` with ``cudaHostRegister``; returns the device whose context
    registered it (unregister there too). Raises ``RuntimeError`` naming the CUDA error."""
    cudart = torch.cuda.cudart()
    device = _context_device()
    with torch.cuda.device(device):
        err = cudart.cudaHostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE)
        code = int(getattr(err, "value", err))
        if code != 0:
            _consume_cuda_error(device)
    if code != 0:
        try:
            what = cudart.cudaGetErrorString(cudart.cudaError(code))
        except Exception:  # pragma: no cover - an unknown code the binding cannot name
            what = "unknown error"
        raise RuntimeError(
            f"cudaHostRegister({nbytes} bytes) failed with CUDA error {code} ({what}); "
            "set STAGER_PINNED=off to stage into pageable memory (eager copies, no CUDA graph)"
        )
    return device


def _release(
    mm: mmap.mmap | None,
    ptr: int,
    nbytes: int,
    pinned: bool,
    path: str | None,
    device: int | None = None,
    owner_pid: int | None = None,
) -> None:
    _unregister(ptr)
    if owner_pid is not None and owner_pid != os.getpid():
        # A forked child dropping (or exiting with) its parent's arena. The parent still uses it:
        # its /dev/shm file stays (see stager.shm), and CUDA, unusable in a forked child, is not
        # asked to unregister it. The child's own copy of a pageable mapping is closed; a pinned
        # range may not even be mapped here (the driver can exclude it from the fork), and
        # unmapping that address could hit a later mapping of the child's: left to the exit.
        if mm is not None and not pinned:
            try:
                mm.close()
            except (BufferError, ValueError):  # pragma: no cover - an export still alive
                pass
        return
    if pinned:
        code = 0
        try:
            cudart = torch.cuda.cudart()
            index = _context_device() if device is None else device
            with torch.cuda.device(index):
                err = cudart.cudaHostUnregister(ptr)
                code = int(getattr(err, "value", err))
                if code not in (0, _CUDART_UNLOADING):  # at exit CUDA may already be gone
                    _consume_cuda_error(index)
        except Exception:  # pragma: no cover - CUDA already torn down at exit
            pass
        if code not in (0, _CUDART_UNLOADING):
            # Still registered: unmapping would leave CUDA's record of the range pointing at the
            # old pages (a later mapping at this address fails to register with error 712, or is
            # taken for pinned). Keep the mapping for the life of the process instead.
            if mm is not None:
                _KEPT_MAPPINGS.append(mm)
            log.warning(
                "stager: cudaHostUnregister of a %d-byte arena failed with CUDA error %d; "
                "its memory stays mapped and pinned until the process exits", nbytes, code
            )
            mm = None
    if mm is not None:
        try:
            mm.close()
        except (BufferError, ValueError):  # pragma: no cover - an export still alive; GC frees it later
            pass
    if path is not None and not shm.release_owned(path):
        try:  # a file this process did not register (not made by stager.shm): remove it all the same
            os.unlink(path)
        except FileNotFoundError:
            pass


class HostArena:
    """``nbytes`` of host memory, optionally pinned and/or in shared memory.

    The memory lives until the arena object and every storage created over it are gone. Only the
    process that created it releases it (a forked child that inherits it leaves it alone), and a
    shared arena's file is locked by its creator and removed by it, or after it died by the next
    process that creates a shared arena (see :mod:`stager.shm`).
    """

    def __init__(
        self, nbytes: int, *, pinned: bool = False, shared: bool = False, shm_dir: str | None = None
    ) -> None:
        if nbytes < 1:
            raise ValueError(f"arena size must be positive, got {nbytes}")
        t0 = time.perf_counter()
        self.nbytes = nbytes
        self.pinned = pinned
        self.shared = shared
        self.mapped_bytes = (nbytes + _PAGE - 1) // _PAGE * _PAGE
        self.owner_pid = os.getpid()
        """The process that created the arena: the only one that unregisters, unmaps, unlinks it."""
        self.path: str | None = None
        ident: tuple[int, int] | None = None
        try:
            if shared:
                mm, self.path, ident = _map_shared(self.mapped_bytes, shm_dir or SHM_DIR)
            else:
                mm = mmap.mmap(-1, self.mapped_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            where = f"shared memory ({shm_dir or SHM_DIR})" if shared else "anonymous memory"
            raise StagingMemoryError(
                f"could not map a {nbytes}-byte host arena in {where}: {exc}; "
                "lower STAGER_MAX_ARENAS, set STAGER_CACHE_POLICY=fresh, or free host memory"
            ) from None
        self.array = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
        self._populate()
        self.alloc_s = time.perf_counter() - t0
        self.pin_s = 0.0
        self.ptr = int(self.array.ctypes.data)
        self.device: int | None = None
        """The CUDA device whose context registered (pinned) the arena; None when not pinned."""
        if pinned:
            t1 = time.perf_counter()
            try:
                self.device = _cuda_register(self.ptr, self.mapped_bytes)
            except BaseException:
                # Nothing else holds the mapping yet: unmap it now and remove a /dev/shm file,
                # which would otherwise outlive the process.
                del self.array
                _release(mm, self.ptr, self.mapped_bytes, False, self.path)
                raise
            self.pin_s = time.perf_counter() - t1
        self.tensor = torch.from_numpy(self.array)
        _register(Segment(self.ptr, nbytes, self.path, ident, weakref.ref(self.array)))
        if shared:
            install_shared_reduction()
        weakref.finalize(
            self.array, _release, mm, self.ptr, self.mapped_bytes, pinned, self.path, self.device, self.owner_pid
        )

    def _populate(self) -> None:
        # Touch every page now (in parallel for large arenas) so the first stage does not fault.
        n = self.nbytes
        if n <= _TOUCH_CHUNK:
            _touch(self.array)
            return
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(_touch, [self.array[i : i + _TOUCH_CHUNK] for i in range(0, n, _TOUCH_CHUNK)]))

    def __repr__(self) -> str:
        return f"HostArena(nbytes={self.nbytes}, pinned={self.pinned}, shared={self.shared})"


def _map_shared(nbytes: int, shm_dir: str) -> tuple[mmap.mmap, str, tuple[int, int]]:
    """Create, reserve and map one ``nbytes`` file in ``shm_dir``; raises ``StagingMemoryError``.

    Stale arena files (their owner died without removing them) are reclaimed the first time this
    process uses ``shm_dir`` and again before giving up for lack of space. The free space is
    checked first (``statvfs``) for a clear message, then the blocks are reserved with
    ``posix_fallocate``: touching an unreserved page of a full tmpfs kills the process with
    ``SIGBUS`` instead of raising. The file is locked by this process for its lifetime.
    """
    reclaimed = shm.reclaim_once(shm_dir) or shm.Reclaimed()
    try:
        st = os.statvfs(shm_dir)
    except OSError as exc:
        raise StagingMemoryError(
            f"shared memory directory {shm_dir} is not usable ({exc}); "
            "set STAGER_SHARED_MEMORY=0 or mount a tmpfs there"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        more = shm.reclaim_stale(shm_dir)
        reclaimed = shm.Reclaimed(
            reclaimed.files + more.files, reclaimed.nbytes + more.nbytes, more.live_files, more.live_bytes
        )
        if more.files:
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise StagingMemoryError(
            f"shared-memory arena of {nbytes} bytes ({nbytes / 2**20:.1f} MiB) does not fit in {shm_dir}: "
            f"{free} bytes ({free / 2**20:.1f} MiB) free of {st.f_blocks * st.f_frsize} (statvfs); "
            f"{reclaimed.describe()}; "
            "containers often mount a 64 MB /dev/shm: enlarge it (docker --shm-size, a Kubernetes "
            "emptyDir with medium: Memory) or set STAGER_SHARED_MEMORY=0 and use a thread-based writer"
        )
    fd, path = shm.create_owned(shm_dir)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as first:
            more = shm.reclaim_stale(shm_dir)
            try:
                if not more.files:
                    raise first
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                raise StagingMemoryError(
                    f"could not reserve {nbytes} bytes in {shm_dir} ({exc}); it holds {free} free bytes "
                    f"by statvfs but another process may have taken them ({more.describe()}): "
                    "enlarge it or set STAGER_SHARED_MEMORY=0"
                ) from None
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        info = os.fstat(fd)
    except BaseException:
        shm.release_owned(path)
        raise
    finally:
        os.close(fd)
    return mm, path, (info.st_dev, info.st_ino)


# --------------------------------------------------------------------------------------------
# Arena registry: which live arena holds an address
# --------------------------------------------------------------------------------------------


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


def _register(seg: Segment) -> None:
    with _registry_lock:
        i = bisect_right(_bases, seg.base)
        _bases.insert(i, seg.base)
        _segments[seg.base] = seg


def _unregister(base: int) -> None:
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


# --------------------------------------------------------------------------------------------
# Sending staged storages to another process by reference
# --------------------------------------------------------------------------------------------


@dataclass
class ShareCounts:
    """What the multiprocessing reducer did with CPU storages in this process (cumulative)."""

    by_reference: int = 0
    """Storages inside a shared arena, sent as (segment, offset, nbytes): no byte copied."""
    bytes_by_reference: int = 0
    delegated: int = 0
    """Storages handed to torch's reducer (which copies any storage it did not allocate shared)."""
    bytes_delegated: int = 0
    mapped: int = 0
    """Storages rebuilt here over a mapped segment (counted in the receiving process)."""
    bytes_mapped: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


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
    shared :class:`HostArena` are affected; every other storage is reduced by torch as before.
    Called when the first shared arena is created.
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


def _make_leaf(leaf: "Leaf", storages: list[torch.UntypedStorage]) -> torch.Tensor:
    if leaf.region < 0:
        return torch.empty_strided(leaf.size, leaf.stride, dtype=leaf.dtype)
    return torch.empty(0, dtype=leaf.dtype).set_(storages[leaf.region], leaf.offset, leaf.size, leaf.stride)


class StagedSet:
    """The staged tensors of ``plan`` over ``arena``, built once and leased per ``stage()``.

    The set's own tensors are never handed out: each ``stage()`` gets new tensor objects over the
    same storages (:meth:`handout`), so nothing a holder does to its tensors (``resize_``, ``t_``,
    ``set_``, ``requires_grad_``, ``.grad``, attributes) reaches a later staged dict, and every
    handed-out tensor counts as a use of its storage for as long as it lives (the lease).
    """

    def __init__(self, plan: "Plan", arena: HostArena, *, cached: bool) -> None:
        if arena.nbytes < plan.arena_bytes:
            raise ValueError(f"arena of {arena.nbytes} bytes is too small for a plan of {plan.arena_bytes}")
        self.plan = plan
        self.arena = arena
        self.cached = cached
        self.in_flight = False
        self.handed_out = False
        self.pending: Any = None
        """Device copies into this set that may still be running (``stage_nowait``), or ``None``."""
        self._lock = threading.Lock()
        self.bases: list[torch.Tensor] = []
        """One uint8 tensor per region, over the region's own storage (copy destinations)."""
        for r in plan.regions:
            self.bases.append(
                torch.frombuffer(arena.array, dtype=torch.uint8, count=r.nbytes, offset=r.arena_offset)
            )
        self.cpu_dst = [self.bases[i] for i in plan.cpu_index]
        self._cpu_parts: dict[int, list[tuple[int, int, list[torch.Tensor]]]] = {}
        storages = [b.untyped_storage() for b in self.bases]
        self.tensors: list[torch.Tensor] = [_make_leaf(leaf, storages) for leaf in plan.leaves]
        self._storages = storages
        self._cdata = [s._cdata for s in storages]
        self._baseline = self._counts()

    def handout(self) -> list[torch.Tensor]:
        """New tensors over the staged storages, one per leaf, with the planned metadata."""
        return list(map(torch.Tensor.detach, self.tensors))

    def cpu_parts(self, parts: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The CPU regions' ``(destinations, sources)`` split into ``parts`` consecutive slices.

        The destinations' slices are made once; the sources are sliced from the plan's current
        ``cpu_src`` on every call (a plan that is demoted and adopted again gets new source views,
        and a cache of the old ones would keep the old storages alive and copy from them).
        """
        cached = self._cpu_parts.get(parts)
        if cached is None:
            n = len(self.cpu_dst)
            bounds = [n * i // parts for i in range(parts + 1)]
            cached = [(a, b, self.cpu_dst[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
            self._cpu_parts[parts] = cached
        src = self.plan.cpu_src
        return [(dst, src[a:b]) for a, b, dst in cached]

    def _counts(self) -> tuple[list[int], list[int]]:
        # Python references to the (unique) Python storage objects, and C++ uses of the storages:
        # every handed-out tensor, view, detached tensor or writer's handle is one. The set's own
        # tensors are never handed out (see handout), so their references need no count.
        srefs = list(map(sys.getrefcount, self._storages))
        uses = list(map(_storage_use_count, self._cdata)) if _storage_use_count is not None else []
        return srefs, uses

    def leased(self) -> bool:
        """Whether anything outside the stager still holds a staged tensor or storage of this set.

        Without torch's storage use count (``torch._C._storage_Use_Count``) a view or storage
        held elsewhere cannot be seen, so a set that was handed out once counts as leased for
        good: later stages take other arenas (or wait) rather than risk overwriting a held copy.
        """
        if self.in_flight:
            return True
        if self.pending is not None:
            if not self.pending.query():
                return True  # a device copy may still write into the arena
            self.pending = None
        if _storage_use_count is None and self.handed_out:
            return True
        return self._counts() != self._baseline

    def try_acquire(self) -> bool:
        """Mark the set in flight if it is free; ``False`` if it is leased."""
        with self._lock:
            if self.leased():
                return False
            self.in_flight = True
            return True

    def done(self) -> None:
        """End the in-flight mark once the staged dict that holds the tensors exists."""
        self.handed_out = True
        self.in_flight = False
