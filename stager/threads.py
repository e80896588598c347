"""The stager's own threads run torch's CPU kernels on one OpenMP thread each.

With torch's OpenMP backend, every thread that runs a parallel CPU kernel gets a team of OpenMP
workers of its own, kept for as long as the thread lives. Once a process holds more OpenMP
threads than CPUs, libgomp stops letting idle workers spin between parallel regions and puts
them to sleep instead, so every small kernel of the training thread pays a wake-up: on a 2-core
CPU the demo's training step took 48 ms instead of 27 ms while an idle staging thread was alive.
The stager's threads (the staging thread, the copy pool, the training handle's threads) already
split their work themselves, so each runs its kernels on itself alone; the caller's threads keep
their own thread count. Nothing changes where torch uses no OpenMP runtime.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["one_torch_thread", "worker_pool"]

_lock = threading.Lock()
_set_threads: Callable[[int], object] | None = None
_looked_up = False


def _omp_set_num_threads() -> Callable[[int], object] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded, or ``None`` (none, or not Linux)."""
    global _set_threads, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                with open("/proc/self/maps") as f:
                    paths = re.findall(r"\S*/lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*", f.read())
                if paths:  # torch's own copy first, when another library loaded a second runtime
                    torch_dir = os.path.dirname(torch.__file__)
                    path = min(paths, key=lambda p: not p.startswith(torch_dir))
                    _set_threads = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                _set_threads = None
    return _set_threads


def one_torch_thread() -> None:
    """Make the calling thread run torch's CPU kernels on itself alone (a thread initializer).

    Torch's per-thread set-up runs first (``torch.get_num_threads`` does it), so it cannot undo
    this later; only the calling thread's OpenMP thread count changes.
    """
    torch.get_num_threads()
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)


def worker_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads named ``name``, each running :func:`one_torch_thread` first."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=one_torch_thread)
