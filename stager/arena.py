"""Host arenas (one block of host memory per staged copy) and the staged sets leased from them.

An arena is an exact-size anonymous mapping (or a ``/dev/shm`` file for shared memory), touched in
parallel and, when pinning, registered with CUDA once (``cudaHostRegister``), never through
PyTorch's caching host allocator, which rounds a block up to a power of two.

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

import mmap
import os
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from stager.errors import StagingMemoryError

if TYPE_CHECKING:
    from stager.plan import Leaf, Plan

__all__ = ["HostArena", "StagedSet"]

_PAGE = mmap.PAGESIZE
_TOUCH_CHUNK = 64 << 20
_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _touch(view: np.ndarray) -> None:
    view.fill(0)


def _cuda_register(ptr: int, nbytes: int) -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister({nbytes} bytes) failed with CUDA error {code}")


def _release(mm: mmap.mmap, ptr: int, nbytes: int, pinned: bool, path: str | None) -> None:
    if pinned:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # pragma: no cover - CUDA already torn down at exit
            pass
    try:
        mm.close()
    except (BufferError, ValueError):  # pragma: no cover - an export still alive; GC frees it later
        pass
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class HostArena:
    """``nbytes`` of host memory, optionally pinned and/or in shared memory.

    The memory lives until the arena object and every storage created over it are gone.
    """

    def __init__(self, nbytes: int, *, pinned: bool = False, shared: bool = False) -> None:
        if nbytes < 1:
            raise ValueError(f"arena size must be positive, got {nbytes}")
        t0 = time.perf_counter()
        self.nbytes = nbytes
        self.pinned = pinned
        self.shared = shared
        self.mapped_bytes = (nbytes + _PAGE - 1) // _PAGE * _PAGE
        self.path: str | None = None
        try:
            if shared:
                fd, self.path = tempfile.mkstemp(prefix="stager-arena-", dir="/dev/shm")
                try:
                    os.ftruncate(fd, self.mapped_bytes)
                    mm = mmap.mmap(fd, self.mapped_bytes, flags=mmap.MAP_SHARED)
                finally:
                    os.close(fd)
            else:
                mm = mmap.mmap(-1, self.mapped_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            if self.path is not None:
                os.unlink(self.path)
            where = "/dev/shm" if shared else "anonymous memory"
            raise StagingMemoryError(
                f"could not map a {nbytes}-byte host arena in {where}: {exc}; "
                "lower STAGER_MAX_ARENAS, set STAGER_CACHE_POLICY=fresh, or free host memory"
            ) from None
        self.array = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
        self._populate()
        self.alloc_s = time.perf_counter() - t0
        self.pin_s = 0.0
        self.ptr = int(self.array.ctypes.data)
        if pinned:
            t1 = time.perf_counter()
            _cuda_register(self.ptr, self.mapped_bytes)
            self.pin_s = time.perf_counter() - t1
        self.tensor = torch.from_numpy(self.array)
        weakref.finalize(self.array, _release, mm, self.ptr, self.mapped_bytes, pinned, self.path)

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


def _make_leaf(leaf: "Leaf", storages: list[torch.UntypedStorage]) -> torch.Tensor:
    if leaf.region < 0:
        return torch.empty_strided(leaf.size, leaf.stride, dtype=leaf.dtype)
    return torch.empty(0, dtype=leaf.dtype).set_(storages[leaf.region], leaf.offset, leaf.size, leaf.stride)


class StagedSet:
    """The staged tensors of ``plan`` over ``arena``, built once and leased per ``stage()``."""

    def __init__(self, plan: "Plan", arena: HostArena, *, cached: bool) -> None:
        if arena.nbytes < plan.arena_bytes:
            raise ValueError(f"arena of {arena.nbytes} bytes is too small for a plan of {plan.arena_bytes}")
        self.plan = plan
        self.arena = arena
        self.cached = cached
        self.in_flight = False
        self._lock = threading.Lock()
        self.bases: list[torch.Tensor] = []
        """One uint8 tensor per region, over the region's own storage (copy destinations)."""
        for r in plan.regions:
            self.bases.append(
                torch.frombuffer(arena.array, dtype=torch.uint8, count=r.nbytes, offset=r.arena_offset)
            )
        self.cpu_dst = [self.bases[i] for i in plan.cpu_index]
        storages = [b.untyped_storage() for b in self.bases]
        self.tensors: list[torch.Tensor] = [_make_leaf(leaf, storages) for leaf in plan.leaves]
        self._storages = storages
        self._cdata = [s._cdata for s in storages]
        self._baseline = self._counts()

    def _counts(self) -> tuple[list[int], list[int], list[int]]:
        # Python references to the staged tensors and to the (unique) Python storage objects, and
        # C++ uses of the storages (views, detached tensors, writers' handles).
        refs = list(map(sys.getrefcount, self.tensors))
        srefs = list(map(sys.getrefcount, self._storages))
        uses = list(map(_storage_use_count, self._cdata)) if _storage_use_count is not None else []
        return refs, srefs, uses

    def leased(self) -> bool:
        """Whether anything outside the stager still holds a staged tensor or storage of this set."""
        return self.in_flight or self._counts() != self._baseline

    def try_acquire(self) -> bool:
        """Mark the set in flight if it is free; ``False`` if it is leased."""
        with self._lock:
            if self.leased():
                return False
            self.in_flight = True
            return True

    def done(self) -> None:
        """End the in-flight mark once the staged dict that holds the tensors exists."""
        self.in_flight = False
