"""Host memory: ``/proc/meminfo``, the cgroup (v1 and v2) memory controller, ``/dev/shm`` and the
number of ranks sharing this host, combined into one :class:`~stager.headroom.HostReading`.

The cgroup directories are discovered once per filesystem root and cached; each reading re-reads
only the numbers that change.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from stager.envs import format_size
from stager.errors import StagerConfigError
from stager.headroom.nvml import _physical_gpu_count
from stager.headroom.readings import HostReading

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on 4 KiB
# pages); anything this large is no limit on any real machine.
_V1_UNLIMITED = 1 << 62
_READ_CHUNK = 1 << 16


def _read_bytes(path: str) -> bytes:
    """Whole (small) file, with one open and as few reads as it takes; raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) == _READ_CHUNK:  # a long memory.stat: read to the end
            parts = [data]
            while chunk := os.read(fd, _READ_CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def _field(data: bytes, key: bytes) -> int | None:
    """The integer after ``key`` at the start of a line of ``data`` (``key`` ends in ':' or ' ')."""
    if data.startswith(key):
        pos = 0
    else:
        pos = data.find(b"\n" + key)
        if pos < 0:
            return None
        pos += 1
    start = pos + len(key)
    end = data.find(b"\n", start)
    words = data[start : end if end >= 0 else len(data)].split()
    if not words:
        return None
    try:
        return int(words[0])
    except ValueError:
        return None


def _under(root: str, path: str) -> str:
    """``path`` (absolute, as the kernel shows it) inside the filesystem rooted at ``root``."""
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


@dataclass(frozen=True)
class _CgroupLayout:
    """Where the memory controller's files are for this process (static; cached per root)."""

    version: int  # 1 or 2; 0 when no memory controller was found
    leaf: str  # the process's cgroup directory ("" when none was found)
    dirs: tuple[str, ...]  # those of leaf and its ancestors up to the mount with a limit file
    note: str  # how the layout was found, or why there is none


def _unescape_mount(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in path:
        return path
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _parse_mountinfo(text: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(v2 mount, v1 memory mount), each as (root within the hierarchy, mount point) or None."""
    v2: tuple[str, str] | None = None
    v1: tuple[str, str] | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 1:
            continue
        fstype = tail[0]
        mount = (_unescape_mount(fields[3]), _unescape_mount(fields[4]))
        if fstype == "cgroup2" and v2 is None:
            v2 = mount
        elif fstype == "cgroup" and v1 is None and len(tail) >= 3:
            if "memory" in tail[2].split(","):
                v1 = mount
    return v2, v1


def _parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """(v2 path from the ``0::`` line, v1 memory controller's path) from /proc/self/cgroup."""
    v2: str | None = None
    v1: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_dirs(
    mount_root: str, mount_point: str, cg_path: str, limit_file: str
) -> tuple[str, tuple[str, ...]]:
    """The process's cgroup directory, and it and its ancestors up to the mount point that hold
    ``limit_file``."""
    if mount_root == "/":
        rel = cg_path
    elif cg_path == mount_root or cg_path.startswith(mount_root.rstrip("/") + "/"):
        rel = cg_path[len(mount_root) :]
    else:
        # the process's cgroup is outside what is mounted here (e.g. a namespace boundary)
        rel = ""
    mount_point = mount_point.rstrip("/") or "/"
    leaf = os.path.normpath(mount_point + "/" + rel.strip("/")) if rel.strip("/") else mount_point
    inside = leaf == mount_point or leaf.startswith(mount_point.rstrip("/") + "/")
    if not inside or not os.path.isdir(leaf):
        leaf = mount_point  # a path outside the mount ("/../..") or not mounted here
    dirs = []
    d = leaf
    while True:
        if os.path.exists(os.path.join(d, limit_file)):
            dirs.append(d)
        if d == mount_point or len(d) <= len(mount_point):
            break
        d = os.path.dirname(d)
    return leaf, tuple(dirs)


def _discover_cgroup(root: str) -> _CgroupLayout:
    """Find the memory controller's directories for this process under ``root``."""
    try:
        proc_cgroup = _read_bytes(_under(root, "/proc/self/cgroup")).decode()
    except OSError:
        proc_cgroup = ""
    v2_path, v1_path = _parse_proc_cgroup(proc_cgroup)
    try:
        mountinfo = _read_bytes(_under(root, "/proc/self/mountinfo")).decode()
    except OSError:
        mountinfo = ""
    v2_mount, v1_mount = _parse_mountinfo(mountinfo)

    def v2_has_memory(mount_point: str) -> bool:
        try:
            ctl = _read_bytes(os.path.join(mount_point, "cgroup.controllers")).split()
        except OSError:
            return False
        return b"memory" in ctl

    if v2_mount is not None and v2_path is not None:
        point = _under(root, v2_mount[1])
        if v2_has_memory(point):
            leaf, dirs = _cgroup_dirs(v2_mount[0], point, v2_path, "memory.max")
            return _CgroupLayout(2, leaf, dirs, f"cgroup v2 {v2_path} mounted at {point}")
    if v1_mount is not None and v1_path is not None:
        point = _under(root, v1_mount[1])
        leaf, dirs = _cgroup_dirs(v1_mount[0], point, v1_path, "memory.limit_in_bytes")
        return _CgroupLayout(1, leaf, dirs, f"cgroup v1 memory {v1_path} mounted at {point}")
    # no usable mountinfo: the conventional places
    base = _under(root, "/sys/fs/cgroup")
    if v2_has_memory(base):
        leaf, dirs = _cgroup_dirs("/", base, v2_path or "/", "memory.max")
        return _CgroupLayout(2, leaf, dirs, f"cgroup v2 assumed at {base} (no cgroup2 mount found)")
    v1_base = os.path.join(base, "memory")
    if os.path.exists(os.path.join(v1_base, "memory.limit_in_bytes")):
        leaf, dirs = _cgroup_dirs("/", v1_base, v1_path or "/", "memory.limit_in_bytes")
        note = f"cgroup v1 assumed at {v1_base} (no memory mount found)"
        return _CgroupLayout(1, leaf, dirs, note)
    return _CgroupLayout(0, "", (), f"no cgroup memory controller found under {base}")


def _parse_limit(data: bytes) -> int | None:
    """A cgroup limit file's value; None for no limit (``max`` or v1's huge sentinel)."""
    text = data.strip()
    if text == b"max" or not text:
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


def _read_cgroup(layout: _CgroupLayout) -> tuple[int | None, int | None, str, str | None]:
    """(available, limit, source, limit file) of the tightest limited cgroup.

    (None, None, why, None) when no limit applies.
    """
    if layout.version == 0:
        return None, None, layout.note, None
    if layout.version == 2:
        limit_files = ("memory.max", "memory.high")
        usage_file, reclaim_key = "memory.current", b"inactive_file "
    else:
        limit_files = ("memory.limit_in_bytes",)
        usage_file, reclaim_key = "memory.usage_in_bytes", b"total_inactive_file "
    best: tuple[int, int, str, str | None] | None = None
    for d in layout.dirs:
        limit: int | None = None
        limit_path = ""
        for name in limit_files:
            path = os.path.join(d, name)
            try:
                value = _parse_limit(_read_bytes(path))
            except (OSError, ValueError):
                continue
            if value is not None and (limit is None or value < limit):
                limit, limit_path = value, path
        if limit is None:
            continue
        try:
            usage = int(_read_bytes(os.path.join(d, usage_file)).strip())
        except (OSError, ValueError):
            continue
        try:
            reclaimable = _field(_read_bytes(os.path.join(d, "memory.stat")), reclaim_key) or 0
        except OSError:
            reclaimable = 0
        reclaimable = min(reclaimable, usage)
        available = max(0, limit - (usage - reclaimable))
        if best is None or available < best[0]:
            source = (
                f"cgroup v{layout.version} {os.path.basename(limit_path)} at {limit_path} "
                f"(limit {format_size(limit)}, in use {format_size(usage)} of which "
                f"{format_size(reclaimable)} reclaimable file cache)"
            )
            best = (available, limit, source, limit_path)
    if best is None:
        where = f"cgroup v{layout.version} {limit_files[0]} at {layout.leaf}"
        return None, None, f"{where}: unlimited", None
    return best


def _read_meminfo(root: str) -> tuple[int | None, str]:
    """(MemAvailable in bytes, source) from ``root``'s /proc/meminfo."""
    path = _under(root, "/proc/meminfo")
    try:
        data = _read_bytes(path)
    except OSError as exc:
        return None, f"{path} unreadable: {exc}"
    kib = _field(data, b"MemAvailable:")
    if kib is not None:
        return kib * 1024, f"{path} MemAvailable"
    # kernels before 3.14 lack MemAvailable: free plus page cache is the usual estimate
    parts = [_field(data, k) for k in (b"MemFree:", b"Buffers:", b"Cached:")]
    if parts[0] is None:
        return None, f"{path} has neither MemAvailable nor MemFree"
    return sum(p or 0 for p in parts) * 1024, f"{path} MemFree+Buffers+Cached (no MemAvailable)"


_LAYOUTS: dict[str, _CgroupLayout] = {}
_LAYOUTS_LOCK = threading.Lock()


def _layout(root: str) -> _CgroupLayout:
    layout = _LAYOUTS.get(root)
    if layout is None:
        with _LAYOUTS_LOCK:
            layout = _LAYOUTS.get(root)
            if layout is None:
                layout = _discover_cgroup(root)
                _LAYOUTS[root] = layout
    return layout


_LOOPBACK = ("localhost", "127.", "::1", "0:0:0:0:0:0:0:1")


def _positive_env(name: str, env: Any) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise StagerConfigError(
            f"{name}={raw!r} is not a positive integer; it must be the number of ranks on this "
            f"host (torchrun sets it), or unset"
        )
    return value


def local_world_size(env: Any = None) -> tuple[int, str]:
    """How many ranks share this host's memory, and where that number came from.

    Order, first that answers:

    1. ``LOCAL_WORLD_SIZE`` (set by torchrun / torchelastic);
    2. ``OMPI_COMM_WORLD_LOCAL_SIZE`` or ``MPI_LOCALNRANKS`` (Open MPI, MPICH launchers);
    3. an initialised ``torch.distributed``: world size 1 means 1; a loopback ``MASTER_ADDR``
       means every rank is on this host, so the world size; otherwise one rank per physical GPU
       on this host, capped at the world size (the usual layout, and the cautious guess);
    4. 1.

    A set but malformed variable raises :class:`~stager.errors.StagerConfigError`.
    """
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        value = _positive_env(name, env)
        if value is not None:
            return value, name
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return 1, "torch.distributed world size 1"
        master = (env.get("MASTER_ADDR") or "").strip().lower()
        if master.startswith(_LOOPBACK):
            return world, f"torch.distributed world size {world}, MASTER_ADDR={master} is loopback"
        gpus = _physical_gpu_count()
        if gpus > 0:
            n = min(world, gpus)
            return n, (
                f"assumed one rank per GPU: torch.distributed world size {world}, {gpus} GPUs on "
                "this host; set LOCAL_WORLD_SIZE to say otherwise"
            )
        return 1, f"assumed 1: torch.distributed world size {world}, LOCAL_WORLD_SIZE unset"
    return 1, "default: no LOCAL_WORLD_SIZE and torch.distributed not initialised"


def read_host(
    *,
    reserve_bytes: int = 0,
    shared_memory: bool = False,
    ranks_per_host: int | None = None,
    root: str | os.PathLike[str] = "/",
    shm_path: str | os.PathLike[str] | None = None,
) -> HostReading:
    """Read the host memory this rank may use.

    ``min(cgroup available, MemAvailable[, /dev/shm free])`` over the host, ``// ranks_per_host``
    (see :func:`local_world_size` when None), less ``reserve_bytes`` (per rank), at least 0.
    The cgroup figure counts inactive file cache as reclaimable (what a checkpoint writer leaves
    behind in its cgroup), so a container that has just written a checkpoint is not mistaken
    for a full one. ``root`` prefixes every ``/proc`` and ``/sys`` path (tests point it at a
    fixture tree); ``shm_path`` defaults to ``<root>/dev/shm``.
    """
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
    root_s = os.fspath(root)
    if ranks_per_host is None:
        ranks, ranks_source = local_world_size()
    elif ranks_per_host < 1:
        raise ValueError(f"ranks_per_host must be >= 1, got {ranks_per_host}")
    else:
        ranks, ranks_source = ranks_per_host, "argument ranks_per_host"

    cg_avail, cg_limit, cg_source, cg_path = _read_cgroup(_layout(root_s))
    mi_avail, mi_source = _read_meminfo(root_s)

    # (bytes, source, path); the tightest binds
    candidates: list[tuple[int, str, str | None]] = []
    if cg_avail is not None:
        candidates.append((cg_avail, cg_source, cg_path))
    if mi_avail is not None:
        candidates.append((mi_avail, mi_source, _under(root_s, "/proc/meminfo")))

    shm_free: int | None = None
    shm_source: str | None = None
    if shared_memory:
        path = os.fspath(shm_path) if shm_path is not None else _under(root_s, "/dev/shm")
        try:
            st = os.statvfs(path)
            shm_free = st.f_bavail * st.f_frsize
            shm_source = f"{path} statvfs: {format_size(shm_free)} free"
        except OSError as exc:
            shm_free = 0
            shm_source = f"{path} statvfs failed: {exc}"
        candidates.append((shm_free, shm_source, path))

    if candidates:
        limit, source, source_path = min(candidates, key=lambda c: c[0])
    else:
        limit, source, source_path = 0, f"no host figure readable ({mi_source}; {cg_source})", None
    available = max(0, limit // ranks - reserve_bytes)
    return HostReading(
        available_bytes=available,
        source=source,
        source_path=source_path,
        limit_bytes=limit,
        ranks_per_host=ranks,
        ranks_source=ranks_source,
        reserve_bytes=reserve_bytes,
        meminfo_available_bytes=mi_avail,
        meminfo_source=mi_source if mi_avail is None else f"{mi_source} {format_size(mi_avail)}",
        cgroup_available_bytes=cg_avail,
        cgroup_limit_bytes=cg_limit,
        cgroup_source=cg_source,
        shm_free_bytes=shm_free,
        shm_source=shm_source,
    )
