"""The ``/dev/shm`` files that hold shared arenas: creating, owning and reclaiming stale ones.

README's "Failure modes" tells a file's life: its creator holds an ``flock`` on it while the arena
lives and alone removes it (the arena's finalizer, or the SIGTERM handler); a file whose lock is
free has lost its owner and is reclaimed. A new file is created under a ``stager-new-`` name,
locked, and only then linked under its arena name, so a reclaimer never sees an unlocked arena
file. ``python -m stager doctor`` lists these files (:func:`scan`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from stager.envs import format_size
from stager.errors import StagingMemoryError

__all__ = [
    "ARENA_PREFIX", "ShmFile", "Reclaimed", "create_owned", "release_owned", "owned_paths",
    "scan", "reclaim_stale", "reclaim_once", "install_sigterm_cleanup", "map_new",
]

ARENA_PREFIX = "stager-arena-"
"""Name prefix of a shared arena's file (then ``<pid>-<random>``)."""
_NEW_PREFIX = "stager-new-"
"""Name prefix of a file being created (not locked yet, or not linked under its arena name)."""
_NEW_GRACE_S = 60.0
"""An unlocked ``stager-new-`` file younger than this may still be on its way: left alone."""
_NAME_RE = re.compile(rf"^(?:{ARENA_PREFIX}|{_NEW_PREFIX})(\d+)-")

_owned_lock = threading.Lock()
_owned: dict[str, tuple[int, int]] = {}
"""Arena files this process created and still owns: path -> (lock descriptor, creating pid)."""


def create_owned(shm_dir: str) -> tuple[int, str]:
    """Create an empty arena file in ``shm_dir``, locked and owned by this process.

    Returns ``(fd, path)``; ``fd`` is the caller's to use (size, map) and close; the lock is held
    through a descriptor of its own until :func:`release_owned`. Raises ``OSError``.
    """
    pid = os.getpid()
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f"{_NEW_PREFIX}{pid}-", dir=shm_dir)
        path = os.path.join(shm_dir, ARENA_PREFIX + os.path.basename(tmp)[len(_NEW_PREFIX):])
        lock_fd = -1
        try:
            lock_fd = os.open(tmp, os.O_RDONLY)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            os.link(tmp, path)  # never replaces a file (a leftover of an earlier process)
        except BaseException as exc:
            os.close(fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            os.unlink(tmp)
            if isinstance(exc, FileExistsError):
                continue
            raise
        os.unlink(tmp)
        with _owned_lock:
            _owned[path] = (lock_fd, pid)
        install_sigterm_cleanup()
        return fd, path


def release_owned(path: str) -> bool:
    """Unlink an arena file and drop its lock, if this process owns it; ``False`` if it does not
    (a forked child holding its parent's arenas): then the file is left alone."""
    with _owned_lock:
        entry = _owned.get(path)
        if entry is None or entry[1] != os.getpid():
            return False
        del _owned[path]
    try:
        os.unlink(path)  # before the lock goes, so no reclaimer races for it
    except FileNotFoundError:
        pass
    finally:
        os.close(entry[0])
    return True


def owned_paths() -> list[str]:
    """The arena files this process owns now."""
    with _owned_lock:
        return [p for p, (_, pid) in _owned.items() if pid == os.getpid()]


def _forget_in_child() -> None:
    # The parent's files are not ours: close the inherited lock descriptors (never LOCK_UN, which
    # would unlock the parent's open file description) and forget them. No lock is taken here:
    # another thread of the parent may have held it at the fork.
    global _owned_lock
    _owned_lock = threading.Lock()
    for fd, _ in list(_owned.values()):
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass
    _owned.clear()


os.register_at_fork(after_in_child=_forget_in_child)

_sigterm_installed = False


def _on_sigterm(signum: int, frame: Any) -> None:
    pid = os.getpid()
    for path, (_, owner) in list(_owned.items()):  # no lock: the interrupted code may hold it
        if owner == pid:
            try:
                os.unlink(path)
            except OSError:
                pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(pid, signal.SIGTERM)


def install_sigterm_cleanup() -> bool:
    """Remove this process's arena files on SIGTERM, then die of it as before.

    Installs a handler only where SIGTERM has the default disposition and only from the main
    thread (it runs once the main thread next executes Python code); a handler already there (the
    user's, or ignoring the signal) is left in place. Returns whether the handler is in place.
    Called with every new shared arena.
    """
    global _sigterm_installed
    if threading.current_thread() is not threading.main_thread():
        return _sigterm_installed and signal.getsignal(signal.SIGTERM) is _on_sigterm
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        return True
    if current is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True
    return True


@dataclass(frozen=True)
class ShmFile:
    """One stager file in the shared-memory directory."""

    path: str
    pid: int | None
    """The creating process's PID, from the name (in its own PID namespace)."""
    nbytes: int
    """Its size."""
    state: str
    """``live`` (its owner holds the lock), ``stale`` (no owner: reclaimable), ``new`` (being
    created, or a stale one under a minute old), or ``unreadable`` (another user's)."""
    mine: bool
    """Created and owned by this process."""

    @property
    def reclaimable(self) -> bool:
        """Whether its owner is provably gone."""
        return self.state == "stale"


def _candidates(shm_dir: str) -> list[str]:
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith((ARENA_PREFIX, _NEW_PREFIX)))


def _probe(path: str, *, remove: bool) -> tuple[str, int]:
    """``(state, size)`` of one file; with ``remove``, unlink it when it is stale."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "gone", 0
    except OSError:
        try:
            return "unreadable", os.stat(path).st_size
        except OSError:
            return "gone", 0
    try:
        info = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return "live", info.st_size
            raise
        new = os.path.basename(path).startswith(_NEW_PREFIX)
        if new and time.time() - info.st_mtime < _NEW_GRACE_S:
            return "new", info.st_size
        if remove:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return "gone", 0
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return "gone", 0  # replaced under this name since: not the file that was probed
            os.unlink(path)  # while holding its lock: no owner can be using it
        return "stale", info.st_size
    finally:
        os.close(fd)  # drops the probe's lock


def scan(shm_dir: str) -> list[ShmFile]:
    """Every stager file in ``shm_dir`` with its owner, size and whether it is reclaimable.

    Probes each file's lock (taken and dropped at once); removes nothing.
    """
    mine = set(owned_paths())
    out = []
    for name in _candidates(shm_dir):
        path = os.path.join(shm_dir, name)
        state, size = ("live", _size(path)) if path in mine else _probe(path, remove=False)
        if state == "gone":
            continue
        m = _NAME_RE.match(name)
        out.append(ShmFile(path, int(m.group(1)) if m else None, size, state, path in mine))
    return out


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


@dataclass
class Reclaimed:
    """What one pass over the shared-memory directory found: ``files`` stale files removed, of
    ``nbytes`` in all, and ``live_files`` of ``live_bytes`` whose owner is still alive (this
    process's own included), left alone."""

    files: int = 0
    nbytes: int = 0
    live_files: int = 0
    live_bytes: int = 0

    def describe(self) -> str:
        """One clause for an error message."""
        found = (
            f"{self.files} stale stager arena file(s) of {format_size(self.nbytes)}, whose owners "
            "are gone, were found and reclaimed first"
            if self.files
            else "no stale stager arena files were found to reclaim"
        )
        if self.live_files:
            found += (
                f"; {self.live_files} stager arena file(s) of {format_size(self.live_bytes)} belong to "
                "live processes (python -m stager doctor lists them)"
            )
        return found


def reclaim_stale(shm_dir: str) -> Reclaimed:
    """Remove every stager file in ``shm_dir`` whose owner is gone (its lock is free).

    Files of live processes, this one's included, are left alone, as are other users' files.
    """
    mine = set(owned_paths())
    result = Reclaimed()
    for name in _candidates(shm_dir):
        path = os.path.join(shm_dir, name)
        if path in mine:
            result.live_files += 1
            result.live_bytes += _size(path)
            continue
        try:
            state, size = _probe(path, remove=True)
        except OSError:
            continue
        if state == "stale":
            result.files += 1
            result.nbytes += size
        elif state in ("live", "new"):
            result.live_files += 1
            result.live_bytes += size
    return result


_reclaimed_dirs: set[str] = set()


def reclaim_once(shm_dir: str) -> Reclaimed | None:
    """:func:`reclaim_stale` the first time this process uses ``shm_dir``; ``None`` afterwards."""
    key = os.path.realpath(shm_dir)
    with _owned_lock:
        if key in _reclaimed_dirs:
            return None
        _reclaimed_dirs.add(key)
    return reclaim_stale(shm_dir)


def map_new(nbytes: int, shm_dir: str) -> tuple[mmap.mmap, str, tuple[int, int]]:
    """Create, reserve and map one ``nbytes`` file in ``shm_dir``; raises ``StagingMemoryError``.

    Stale arena files (their owner died without removing them) are reclaimed the first time this
    process uses ``shm_dir`` and again before giving up for lack of space. The free space is
    checked first (``statvfs``) for a clear message, then the blocks are reserved with
    ``posix_fallocate``: touching an unreserved page of a full tmpfs kills the process with
    ``SIGBUS`` instead of raising. The file is locked by this process for its lifetime.
    """
    reclaimed = reclaim_once(shm_dir) or Reclaimed()
    try:
        st = os.statvfs(shm_dir)
    except OSError as exc:
        raise StagingMemoryError(
            f"shared memory directory {shm_dir} is not usable ({exc}); "
            "set STAGER_SHARED_MEMORY=0 or mount a tmpfs there"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        more = reclaim_stale(shm_dir)
        reclaimed = Reclaimed(
            reclaimed.files + more.files, reclaimed.nbytes + more.nbytes, more.live_files, more.live_bytes
        )
        if more.files:
            st = os.statvfs(shm_dir)
            free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise StagingMemoryError(
            f"shared-memory arena of {nbytes} bytes ({format_size(nbytes)}) does not fit in {shm_dir}: "
            f"{free} bytes ({format_size(free)}) free of {st.f_blocks * st.f_frsize} (statvfs); "
            f"{reclaimed.describe()}; "
            "containers often mount a 64 MB /dev/shm: enlarge it (docker --shm-size, a Kubernetes "
            "emptyDir with medium: Memory) or set STAGER_SHARED_MEMORY=0 and use a thread-based writer"
        )
    fd, path = create_owned(shm_dir)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as first:
            more = reclaim_stale(shm_dir)
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
        release_owned(path)
        raise
    finally:
        os.close(fd)
    return mm, path, (info.st_dev, info.st_ino)
