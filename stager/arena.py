"""Host arenas: one block of host memory per staged copy, mapped, touched and pinned exactly.

An arena is an exact-size anonymous mapping (or a ``/dev/shm`` file for shared memory, see
:mod:`stager.shm`), touched in parallel and, when pinning, registered with CUDA once
(``cudaHostRegister``), never through PyTorch's caching host allocator, which rounds a block up to
a power of two. Every live arena is known to :mod:`stager.segments` (which address belongs to a
staged copy; shared arenas are sent to other processes by reference). The staged tensors over an
arena are a :class:`~stager.staged_set.StagedSet`.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from stager import segments, shm
from stager.errors import StagingMemoryError

__all__ = ["HostArena", "SHM_DIR"]

log = logging.getLogger("stager")

_PAGE = mmap.PAGESIZE
_TOUCH_CHUNK = 64 << 20
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
    segments.unregister(ptr)
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
                mm, self.path, ident = shm.map_new(self.mapped_bytes, shm_dir or SHM_DIR)
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
        segments.register(segments.Segment(self.ptr, nbytes, self.path, ident, weakref.ref(self.array)))
        if shared:
            segments.install_shared_reduction()
        weakref.finalize(
            self.array, _release, mm, self.ptr, self.mapped_bytes, pinned, self.path, self.device,
            self.owner_pid,
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

