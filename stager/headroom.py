"""Headroom: one reading of the memory the stager may use, and where each figure came from.

A reading has three parts:

* **host** -- the tightest of the cgroup limit (v2 ``memory.max``/``memory.high`` minus
  ``memory.current``; v1 ``memory.limit_in_bytes`` minus ``memory.usage_in_bytes``; checked on the
  process's cgroup and every ancestor up to the mount) and ``/proc/meminfo`` ``MemAvailable``,
  with ``/dev/shm``'s free space as a third bound when shared memory is on. That host-wide figure
  is divided among the ranks on this host and a per-rank reserve is taken off.
* **device** -- NVML free memory of the physical device behind a torch device index, plus what
  PyTorch's caching allocator holds reserved but unallocated (usable by us, invisible to NVML);
  ``torch.cuda.mem_get_info`` stands in when NVML is unavailable.
* **link** -- the PCIe generation and width from NVML, as a theoretical one-direction bandwidth,
  so staging GB/s can be reported as a fraction of the link.

On top of the readings sit two pure decisions, testable with injected readings:
:func:`decide_host` (reuse the cached arena, add a cached arena, stage into a fresh arena, wait
for a lease, or raise :class:`~stager.errors.StagingMemoryError`) and :func:`decide_device`
(pack with the configured chunk size, pack with a shrunk chunk, or copy each region directly).

Importing this module initialises neither CUDA nor NVML. NVML is initialised on first use, once,
under a lock; a failure (``NVMLError_LibraryNotFound`` on a machine without a driver) is
remembered and reported as ``"NVML unavailable: <reason>"``, never retried. Static facts (the
cgroup directories, NVML handles, the link's maximum generation) are cached; each reading
re-reads only the numbers that change, so one :func:`read_headroom` costs tens of microseconds.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from stager.errors import StagerConfigError, StagingMemoryError

__all__ = [
    "HostReading",
    "DeviceReading",
    "LinkInfo",
    "Headroom",
    "HostDecision",
    "DeviceMode",
    "DeviceDecision",
    "CACHE_POLICIES",
    "LEASE_POLICIES",
    "MIN_CHUNK_BYTES",
    "read_host",
    "read_device",
    "read_link",
    "read_headroom",
    "decide_host",
    "decide_device",
    "local_world_size",
    "parse_visible_devices",
    "nvml_device_handle",
    "nvml_status",
    "pcie_bytes_per_s",
    "format_bytes",
]

CACHE_POLICIES = ("auto", "cached", "fresh")
LEASE_POLICIES = ("wait", "allocate")
MIN_CHUNK_BYTES = 1 << 20
"""The smallest device staging chunk :func:`decide_device` shrinks to before it gives up packing."""

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on 4 KiB
# pages); anything this large is no limit on any real machine.
_V1_UNLIMITED = 1 << 62
_READ_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostReading:
    """Host memory this rank may use for staging, with the source of every figure."""

    available_bytes: int
    """Bytes this rank may use: ``limit_bytes // ranks_per_host - reserve_bytes``, at least 0."""
    source: str
    """Which figure bound ``limit_bytes``, naming the file it was read from."""
    source_path: str | None
    """The file (or shared-memory directory) behind ``source``; None when nothing was readable."""
    limit_bytes: int
    """The binding host-wide figure, before division among ranks and the reserve."""
    ranks_per_host: int
    """How many ranks share this host's memory."""
    ranks_source: str
    """Where ``ranks_per_host`` came from (argument, ``LOCAL_WORLD_SIZE``, torch.distributed)."""
    reserve_bytes: int
    """The configured per-rank reserve (``STAGER_HOST_RESERVE``) taken off the share."""
    meminfo_available_bytes: int | None
    """``MemAvailable`` from ``/proc/meminfo``; None when it could not be read."""
    meminfo_source: str
    """The meminfo figure's file and field, or why there is none."""
    cgroup_available_bytes: int | None
    """Tightest ``limit - (usage - reclaimable file cache)`` over the cgroup and its ancestors;
    None when no memory limit applies."""
    cgroup_limit_bytes: int | None
    """The limit of the binding cgroup; None when unlimited or no memory controller was found."""
    cgroup_source: str
    """The binding cgroup file and its figures, ``"... unlimited"``, or why there is none."""
    shm_free_bytes: int | None
    """Free bytes of the shared-memory filesystem; None unless shared memory is on."""
    shm_source: str | None = None
    """The shared-memory path read; None unless shared memory is on."""

    def describe(self) -> list[str]:
        """Lines for ``doctor``: the per-rank figure first, then every input to it."""
        lines = [
            f"host: {format_bytes(self.available_bytes)} available to this rank "
            f"(bound by {self.source})",
            f"  host-wide limit: {format_bytes(self.limit_bytes)}",
            f"  meminfo: {self.meminfo_source}",
            f"  cgroup: {self.cgroup_source}",
            f"  ranks per host: {self.ranks_per_host} ({self.ranks_source})",
            f"  reserve per rank: {format_bytes(self.reserve_bytes)} (STAGER_HOST_RESERVE)",
        ]
        if self.shm_source is not None:
            lines.append(f"  shared memory: {self.shm_source}")
        return lines


@dataclass(frozen=True)
class DeviceReading:
    """Device memory free for staging on one torch device, with its source."""

    index: int
    """The torch device index (after ``CUDA_VISIBLE_DEVICES``)."""
    free_bytes: int
    """What staging may use: driver free memory plus the caching allocator's slack."""
    source: str
    """Where the driver figure came from (NVML with the physical device, or mem_get_info)."""
    nvml_free: int | None
    """NVML's free bytes; None when NVML was not used."""
    allocator_slack: int
    """``memory_reserved - memory_allocated``: held by PyTorch's allocator, unused, ours to use."""
    total_bytes: int | None
    """The device's total memory, when known."""
    physical: str
    """The physical device: NVML index or UUID (MIG instances by their UUID)."""
    note: str | None = None
    """Why a fallback was taken (e.g. ``"NVML unavailable: NVML Shared Library Not Found"``)."""

    def describe(self) -> list[str]:
        """Lines for ``doctor``."""
        lines = [
            f"device cuda:{self.index}: {format_bytes(self.free_bytes)} free for staging "
            f"({self.source})",
            f"  physical device: {self.physical}",
        ]
        if self.nvml_free is not None:
            lines.append(f"  NVML free: {format_bytes(self.nvml_free)}")
        lines.append(
            f"  allocator slack (reserved - allocated): {format_bytes(self.allocator_slack)}"
        )
        if self.total_bytes is not None:
            lines.append(f"  total: {format_bytes(self.total_bytes)}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return lines


@dataclass(frozen=True)
class LinkInfo:
    """The PCIe link of one device and its theoretical one-direction bandwidth.

    ``gen``/``width`` are the link's maximum (what the device and slot negotiate under load);
    ``curr_gen``/``curr_width`` are what it runs at right now, which drops at idle to save power,
    so the maximum is the reference for "fraction of the link".
    """

    gen: int
    width: int
    bytes_per_s: float
    """Theoretical one-direction bandwidth at ``gen`` x ``width``, after line encoding."""
    curr_gen: int | None = None
    curr_width: int | None = None

    @property
    def curr_bytes_per_s(self) -> float | None:
        """Bandwidth at the current generation and width, when NVML reported them."""
        if self.curr_gen is None or self.curr_width is None:
            return None
        try:
            return pcie_bytes_per_s(self.curr_gen, self.curr_width)
        except ValueError:
            return None

    def fraction(self, bytes_per_s: float) -> float:
        """``bytes_per_s`` (a measured staging rate) as a fraction of this link's bandwidth."""
        return bytes_per_s / self.bytes_per_s

    def describe(self) -> list[str]:
        """Lines for ``doctor``."""
        line = (
            f"link: PCIe gen{self.gen} x{self.width}, "
            f"{self.bytes_per_s / 1e9:.2f} GB/s per direction"
        )
        if self.curr_gen is not None:
            line += f" (running now at gen{self.curr_gen} x{self.curr_width})"
        return [line]


@dataclass(frozen=True)
class Headroom:
    """One reading of host, device and link, as ``doctor`` and the stager's decisions use it."""

    host: HostReading
    device: DeviceReading | None
    """None when no device was asked for or none could be read (see ``notes``)."""
    link: LinkInfo | None
    """None when no device was asked for or NVML cannot read the link (see ``notes``)."""
    notes: tuple[str, ...] = ()
    """Why a part is missing, e.g. ``"NVML unavailable: NVML Shared Library Not Found"``."""

    def describe(self) -> list[str]:
        """Lines for ``doctor``: host, device, link and the notes, one fact per line."""
        lines = list(self.host.describe())
        if self.device is not None:
            lines += self.device.describe()
        if self.link is not None:
            lines += self.link.describe()
        lines += [f"note: {n}" for n in self.notes]
        return lines


class HostDecision(str, enum.Enum):
    """Where the next staged copy lives in host memory (see :func:`decide_host`)."""

    REUSE = "reuse"
    """Reuse the cached arena: it is free (its last staged dict was released)."""
    NEW_CACHED = "new_cached"
    """Allocate another cached (persistent, pinned) arena."""
    FRESH = "fresh"
    """Allocate an arena for this checkpoint only, freed when its staged dict is released."""
    WAIT = "wait"
    """Wait for a leased arena to be released (bounded by ``STAGER_LEASE_TIMEOUT``)."""


class DeviceMode(str, enum.Enum):
    """How small tensors reach the host (see :func:`decide_device`)."""

    PACKED = "packed"
    """Packed into device chunks of the configured size."""
    PACKED_SHRUNK = "packed_shrunk"
    """Packed into smaller device chunks (a power of two) that fit the free memory."""
    DIRECT = "direct"
    """Not packed: each region is copied straight into its arena slot."""


@dataclass(frozen=True)
class DeviceDecision:
    """The outcome of :func:`decide_device`."""

    mode: DeviceMode
    chunk_bytes: int
    """The chunk size to pack with; 0 for ``DIRECT``."""
    device_bytes: int
    """Device memory the chosen mode allocates for chunks."""
    budget_bytes: int
    """Device memory staging may use: free bytes less the reserve."""
    reason: str


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def format_bytes(n: int | float) -> str:
    """``n`` bytes with a binary prefix and the exact count: ``"2.00 GiB (2147483648 bytes)"``."""
    n_int = int(n)
    if abs(n_int) < 1024:
        return f"{n_int} bytes"
    value = float(n_int)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if abs(value) < 1024.0 or unit == "PiB":
            return f"{value:.2f} {unit} ({n_int} bytes)"
    raise AssertionError("unreachable")  # pragma: no cover


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


# --------------------------------------------------------------------------------------------
# Host: cgroup discovery (once per root) and reading (every call)
# --------------------------------------------------------------------------------------------


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
                f"(limit {format_bytes(limit)}, in use {format_bytes(usage)} of which "
                f"{format_bytes(reclaimable)} reclaimable file cache)"
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
            shm_source = f"{path} statvfs: {format_bytes(shm_free)} free"
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
        meminfo_source=mi_source if mi_avail is None else f"{mi_source} {format_bytes(mi_avail)}",
        cgroup_available_bytes=cg_avail,
        cgroup_limit_bytes=cg_limit,
        cgroup_source=cg_source,
        shm_free_bytes=shm_free,
        shm_source=shm_source,
    )


# --------------------------------------------------------------------------------------------
# NVML: lazy, once, under a lock
# --------------------------------------------------------------------------------------------


class _NvmlState:
    """NVML's module once initialised, or the reason it is unavailable; decided once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.module: Any | None = None
        self.reason: str | None = None
        self.handles: dict[tuple[int, str | None], tuple[Any, str]] = {}
        # (index, CUDA_VISIBLE_DEVICES) -> (max gen, max width, handle of the PCIe device)
        self.links: dict[tuple[int, str | None], tuple[int, int, Any]] = {}
        self.gpu_count: int | None = None

    def get(self) -> Any | None:
        if self.done:  # hot path: no lock once decided
            return self.module
        with self.lock:
            if not self.done:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self.module = pynvml
                except ImportError as exc:
                    self.reason = f"nvidia-ml-py is not installed ({exc})"
                except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                    self.reason = f"{exc} ({type(exc).__name__})"
                self.done = True
        return self.module

    def reset(self) -> None:
        """Forget everything, shutting NVML down if it was up (tests only)."""
        with self.lock:
            if self.module is not None:
                try:
                    self.module.nvmlShutdown()  # NVML counts inits; this undoes only ours
                except Exception:
                    pass
            self.done = False
            self.module = None
            self.reason = None
            self.handles.clear()
            self.links.clear()
            self.gpu_count = None


_NVML = _NvmlState()


def nvml_status() -> str:
    """``"NVML available"`` or ``"NVML unavailable: <reason>"``; initialises NVML on first call."""
    if _NVML.get() is not None:
        return "NVML available"
    return f"NVML unavailable: {_NVML.reason}"


def _physical_gpu_count() -> int:
    if _NVML.gpu_count is None:
        nvml = _NVML.get()
        count = 0
        if nvml is not None:
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception:
                count = 0
        _NVML.gpu_count = count
    return _NVML.gpu_count


def parse_visible_devices(value: str | None) -> list[int] | list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: ordinals, or UUID strings; None when unset.

    Integer entries are read like ``strtoul`` (``"1gpu"`` is 1); a negative or unparsable entry
    ends the list; a repeated entry makes the whole list empty. A value starting with ``GPU-`` or
    ``MIG-`` is a list of (possibly abbreviated) UUIDs, ending at the first entry without that
    prefix.
    """
    if value is None:
        return None
    value = value.strip()
    for prefix in ("GPU-", "MIG-"):
        if value.startswith(prefix):
            uuids: list[str] = []
            for elem in value.split(","):
                elem = elem.strip()
                if elem in uuids:
                    return []
                if not elem.startswith(prefix):
                    break
                uuids.append(elem)
            return uuids
    ordinals: list[int] = []
    for elem in value.split(","):
        elem = elem.strip()
        digits = ""
        for i, ch in enumerate(elem):
            if ch.isdigit() or (i == 0 and ch in "+-"):
                digits += ch
            else:
                break
        try:
            x = int(digits)
        except ValueError:
            x = -1
        if x < 0:
            break
        if x in ordinals:
            return []
        ordinals.append(x)
    return ordinals


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _uuid_candidates(nvml: Any) -> list[tuple[str, Any]]:
    """(UUID, handle) of every physical GPU and every MIG instance NVML can see."""
    out: list[tuple[str, Any]] = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        out.append((_as_str(nvml.nvmlDeviceGetUUID(handle)), handle))
        get_count = getattr(nvml, "nvmlDeviceGetMaxMigDeviceCount", None)
        get_mig = getattr(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", None)
        if get_count is None or get_mig is None:
            continue
        try:
            n_mig = int(get_count(handle))
        except Exception:  # not MIG-capable
            continue
        for j in range(n_mig):
            try:
                mig = get_mig(handle, j)
                out.append((_as_str(nvml.nvmlDeviceGetUUID(mig)), mig))
            except Exception:  # an empty MIG slot
                continue
    return out


def nvml_device_handle(index: int, *, nvml: Any, visible_devices: str | None) -> tuple[Any, str]:
    """The NVML handle of the physical device (or MIG instance) behind torch device ``index``.

    ``visible_devices`` is the ``CUDA_VISIBLE_DEVICES`` value (None: every device, NVML index =
    torch index). An ordinal entry maps by ``nvmlDeviceGetHandleByIndex``; a ``GPU-``/``MIG-``
    entry by ``nvmlDeviceGetHandleByUUID``, or, for an abbreviated UUID, by the one device whose
    UUID starts with it. Returns (handle, label naming the physical device). ``nvml`` is the
    ``pynvml`` module or any object with the same functions (tests inject a fake). Raises
    ``ValueError`` when ``index`` is not visible or its entry matches no device or several.
    """
    if index < 0:
        raise ValueError(f"device index must be >= 0, got {index}")
    entries = parse_visible_devices(visible_devices)
    if entries is None:
        return nvml.nvmlDeviceGetHandleByIndex(index), f"NVML index {index}"
    if index >= len(entries):
        raise ValueError(
            f"cuda:{index} is not visible: CUDA_VISIBLE_DEVICES={visible_devices!r} makes "
            f"{len(entries)} device(s) visible ({entries})"
        )
    entry = entries[index]
    if isinstance(entry, int):
        return nvml.nvmlDeviceGetHandleByIndex(entry), (
            f"NVML index {entry} (CUDA_VISIBLE_DEVICES={visible_devices})"
        )
    try:
        return nvml.nvmlDeviceGetHandleByUUID(entry), entry
    except nvml.NVMLError:
        pass  # abbreviated UUID, or an old MIG-GPU-.../gi/ci form: match by prefix
    matches = [(u, h) for u, h in _uuid_candidates(nvml) if u.startswith(entry)]
    if len(matches) != 1:
        what = "matches no device" if not matches else f"is ambiguous ({[u for u, _ in matches]})"
        raise ValueError(
            f"cuda:{index}: CUDA_VISIBLE_DEVICES entry {entry!r} {what} among NVML's devices"
        )
    return matches[0][1], matches[0][0]


def _cached_handle(nvml: Any, index: int) -> tuple[Any, str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    key = (index, visible)
    hit = _NVML.handles.get(key)
    if hit is None:
        with _NVML.lock:
            hit = _NVML.handles.get(key)
            if hit is None:
                hit = nvml_device_handle(index, nvml=nvml, visible_devices=visible)
                _NVML.handles[key] = hit
    return hit


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def _allocator_slack(index: int) -> int:
    """Bytes PyTorch's caching allocator holds reserved but unallocated on ``index``."""
    cuda = torch.cuda
    if not cuda.is_initialized():
        return 0  # no allocation yet, and reading must not create a context
    try:
        # the nested stats skip memory_stats()'s Python flattening (the hot path)
        stats = torch._C._cuda_memoryStats(index)
        reserved = stats["reserved_bytes"]["all"]["current"]
        allocated = stats["allocated_bytes"]["all"]["current"]
    except Exception:  # a private API that moved, or a pluggable allocator without stats
        try:
            reserved = cuda.memory_reserved(index)
            allocated = cuda.memory_allocated(index)
        except Exception:  # an index this process cannot see: no slack to count
            return 0
    return max(0, int(reserved) - int(allocated))


def _index_of(device: int | torch.device | str) -> int:
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {dev}")
    return dev.index if dev.index is not None else 0


def read_device(device: int | torch.device | str) -> DeviceReading | None:
    """Read the device memory free for staging on a torch CUDA device.

    ``free_bytes`` = NVML free of the physical device (``CUDA_VISIBLE_DEVICES`` honoured) +
    the caching allocator's slack. Without NVML, ``torch.cuda.mem_get_info`` gives the driver
    figure (this creates the device's context if CUDA was not yet initialised). Returns None
    when neither can read the device (no GPU); :func:`nvml_status` says why.
    """
    index = _index_of(device)
    slack = _allocator_slack(index)
    nvml = _NVML.get()
    note: str | None = None
    if nvml is not None:
        try:
            handle, physical = _cached_handle(nvml, index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            free, total = int(mem.free), int(mem.total)
            return DeviceReading(
                index=index,
                free_bytes=free + slack,
                source=f"NVML nvmlDeviceGetMemoryInfo on {physical} + allocator slack",
                nvml_free=free,
                allocator_slack=slack,
                total_bytes=total,
                physical=physical,
            )
        except ValueError:
            raise
        except Exception as exc:  # NVMLError_GpuIsLost, NoPermission, ...
            note = f"NVML read failed: {exc} ({type(exc).__name__})"
    else:
        note = f"NVML unavailable: {_NVML.reason}"
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(index)
    return DeviceReading(
        index=index,
        free_bytes=int(free) + slack,
        source=f"torch.cuda.mem_get_info({index}) + allocator slack",
        nvml_free=None,
        allocator_slack=slack,
        total_bytes=int(total),
        physical=f"cuda:{index} (no NVML)",
        note=note,
    )


# --------------------------------------------------------------------------------------------
# Link
# --------------------------------------------------------------------------------------------

# generation: (GT/s per lane, payload bits per transferred bit). Gen1-2 use 8b/10b, gen3-5
# 128b/130b; gen6 is PAM4 with FLIT mode and no line code (1b/1b; FEC/CRC are protocol
# overhead, not counted here, like TLP headers for the older generations).
_PCIE_GEN: dict[int, tuple[float, float]] = {
    1: (2.5, 8 / 10),
    2: (5.0, 8 / 10),
    3: (8.0, 128 / 130),
    4: (16.0, 128 / 130),
    5: (32.0, 128 / 130),
    6: (64.0, 1.0),
}


def pcie_bytes_per_s(gen: int, width: int) -> float:
    """Theoretical one-direction bandwidth of a PCIe link, in bytes/s, after line encoding.

    Per lane: gen1 2.5 GT/s and gen2 5 GT/s with 8b/10b; gen3 8, gen4 16, gen5 32 GT/s with
    128b/130b; gen6 64 GT/s (1b/1b). Gen5 x16 is 63.0 GB/s. Raises ``ValueError`` for an unknown
    generation or a width below 1.
    """
    if gen not in _PCIE_GEN:
        raise ValueError(f"unknown PCIe generation {gen}; known: {sorted(_PCIE_GEN)}")
    if width < 1:
        raise ValueError(f"PCIe width must be >= 1, got {width}")
    gts, efficiency = _PCIE_GEN[gen]
    return gts * 1e9 * efficiency / 8.0 * width


def read_link(device: int | torch.device | str) -> LinkInfo | None:
    """The PCIe link of a torch CUDA device from NVML; None when NVML cannot tell.

    The maximum generation and width are read once and cached; the current ones are re-read.
    A MIG instance reports its parent GPU's link.
    """
    index = _index_of(device)
    nvml = _NVML.get()
    if nvml is None:
        return None
    key = (index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        cached = _NVML.links.get(key)
        if cached is None:
            handle, _ = _cached_handle(nvml, index)
            try:
                if int(getattr(nvml.nvmlDeviceIsMigDeviceHandle(handle), "value", 0)):
                    handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            except Exception:  # drivers without MIG support: a plain GPU handle
                pass
            cached = (
                int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
                int(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
                handle,
            )
            _NVML.links[key] = cached
        gen, width, handle = cached
        bandwidth = pcie_bytes_per_s(gen, width)
    except Exception:  # unknown generation, NVMLError_NotSupported (NVLink-C2C parts), ...
        return None
    try:
        curr_gen = int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))
        curr_width = int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))
    except Exception:
        curr_gen = curr_width = None
    return LinkInfo(
        gen=gen, width=width, bytes_per_s=bandwidth, curr_gen=curr_gen, curr_width=curr_width
    )


# --------------------------------------------------------------------------------------------
# One reading
# --------------------------------------------------------------------------------------------


def read_headroom(
    device_index: int | torch.device | str | None = None,
    *,
    shared_memory: bool = False,
    reserve_bytes: int = 0,
    ranks_per_host: int | None = None,
    root: str | os.PathLike[str] = "/",
    shm_path: str | os.PathLike[str] | None = None,
) -> Headroom:
    """Host, device and link in one reading (device and link only when ``device_index`` is given).

    Keywords as in :func:`read_host`. A device that cannot be read leaves ``device``/``link`` None
    with the reason in ``notes``; staging then relies on the host figures alone.
    """
    host = read_host(
        reserve_bytes=reserve_bytes,
        shared_memory=shared_memory,
        ranks_per_host=ranks_per_host,
        root=root,
        shm_path=shm_path,
    )
    if device_index is None:
        return Headroom(host=host, device=None, link=None)
    notes: list[str] = []
    device = read_device(device_index)
    if device is None:
        notes.append(f"device: {nvml_status()}; torch.cuda is not available")
    elif device.note:
        notes.append(f"device: {device.note}")
    link = read_link(device_index)
    if link is None:
        notes.append(
            "link: unknown ("
            + (nvml_status() if _NVML.module is None else "NVML cannot read the PCIe link")
            + "); GB/s is not reported as a fraction of the link"
        )
    return Headroom(host=host, device=device, link=link, notes=tuple(notes))


# --------------------------------------------------------------------------------------------
# Decisions (pure)
# --------------------------------------------------------------------------------------------


def _check_policy(name: str, value: str, accepted: tuple[str, ...], env: str) -> None:
    if value not in accepted:
        raise StagerConfigError(
            f"{name} must be one of {', '.join(repr(a) for a in accepted)} ({env}); got {value!r}"
        )


def decide_host(
    needed_bytes: int,
    *,
    cached_arena_free: bool,
    cached_arenas: int,
    max_cached_arenas: int,
    host: HostReading,
    cache_policy: str = "auto",
    lease_policy: str = "allocate",
    fresh_leased: int = 0,
) -> HostDecision:
    """Decide where the next staged copy of ``needed_bytes`` lives in host memory.

    Inputs: whether a cached arena built for this plan is free (its staged dict released), how
    many cached arenas exist (``cached_arenas``) and the most allowed (``STAGER_MAX_ARENAS``),
    the host reading, the policies and how many fresh arenas are still leased (their memory
    returns when released, so waiting for them can make room). ``cache_policy`` and
    ``lease_policy`` take the strings (or the str-valued enums of ``stager.envs``) of
    ``STAGER_CACHE_POLICY`` (``auto``/``cached``/``fresh``) and ``STAGER_LEASE_POLICY``
    (``wait``/``allocate``).

    Terms: *room* is ``host.available_bytes >= needed_bytes``; *margin* is room for two arenas
    (``>= 2 * needed_bytes``); *held* is "cached arenas exist and none is free"; *leased* is
    held, or ``fresh_leased > 0``; *below max* is ``cached_arenas < max_cached_arenas``.
    Rows are tried top to bottom; the first that matches decides:

    ==============  ==========================================  ==========
    cache policy    condition                                   decision
    ==============  ==========================================  ==========
    auto, cached    a cached arena is free                      REUSE
    auto, cached    held, lease policy ``wait``                 WAIT
    cached          below max, room                             NEW_CACHED
    auto            below max, margin                           NEW_CACHED
    auto, fresh     room                                        FRESH
    any             leased, lease policy ``wait``               WAIT
    any             otherwise                                   raise
    ==============  ==========================================  ==========

    Read as policies: ``fresh`` never touches cached arenas. ``cached`` uses persistent arenas
    only: it reuses, adds one up to the maximum, waits (``wait``) or fails. ``auto`` pins an
    arena for good only while the host keeps room for one more after it, and otherwise stages
    into a fresh arena. ``wait`` waits for a held arena rather than allocate another (bounded by
    ``STAGER_LEASE_TIMEOUT``, enforced by the caller); ``allocate`` never waits and fails when
    nothing can be allocated. A REUSE or WAIT needs no new memory (existing arenas are already
    counted in the reading).

    Raises :class:`~stager.errors.StagingMemoryError` naming the bytes needed and available, the
    source of the figure (file and values), and the knobs that would change the outcome.
    """
    cache_policy = str(getattr(cache_policy, "value", cache_policy))
    lease_policy = str(getattr(lease_policy, "value", lease_policy))
    if needed_bytes < 0:
        raise ValueError(f"needed_bytes must be >= 0, got {needed_bytes}")
    if cached_arenas < 0 or max_cached_arenas < 0 or fresh_leased < 0:
        raise ValueError(
            f"arena counts must be >= 0, got cached_arenas={cached_arenas}, "
            f"max_cached_arenas={max_cached_arenas}, fresh_leased={fresh_leased}"
        )
    if cached_arena_free and cached_arenas == 0:
        raise ValueError("cached_arena_free=True but cached_arenas=0: no cached arena exists")
    _check_policy("cache_policy", cache_policy, CACHE_POLICIES, "STAGER_CACHE_POLICY")
    _check_policy("lease_policy", lease_policy, LEASE_POLICIES, "STAGER_LEASE_POLICY")

    available = host.available_bytes
    room = available >= needed_bytes
    margin = available >= 2 * needed_bytes
    below_max = cached_arenas < max_cached_arenas
    wait = lease_policy == "wait"
    uses_cache = cache_policy != "fresh"
    held = uses_cache and cached_arenas > 0 and not cached_arena_free
    leased = held or fresh_leased > 0

    if uses_cache:
        if cached_arena_free:
            return HostDecision.REUSE
        if held and wait:
            return HostDecision.WAIT
        if below_max and (room if cache_policy == "cached" else margin):
            return HostDecision.NEW_CACHED
    if cache_policy != "cached" and room:
        return HostDecision.FRESH
    if leased and wait:
        return HostDecision.WAIT

    knobs = []
    if host.reserve_bytes > 0 and not room:  # with room, the reserve is not what stands in the way
        knobs.append(f"lower STAGER_HOST_RESERVE (now {format_bytes(host.reserve_bytes)} per rank)")
    if leased:
        knobs.append(
            "set STAGER_LEASE_POLICY=wait to wait for a leased arena to be released (for up to "
            "STAGER_LEASE_TIMEOUT seconds)"
        )
    if cache_policy == "cached":
        if room and not below_max:
            knobs.append(
                f"raise STAGER_MAX_ARENAS (now {max_cached_arenas}) or set "
                "STAGER_CACHE_POLICY=auto to stage into a fresh arena when no cached one is free"
            )
        elif room:
            knobs.append("set STAGER_CACHE_POLICY=auto to stage into a fresh arena")
    if not room and uses_cache and cached_arenas > 0:
        knobs.append(
            f"set STAGER_CACHE_POLICY=fresh so no arena stays pinned between checkpoints (now "
            f"{cached_arenas} cached)"
        )
    if not room:
        knobs.append("give the process more memory (container limit, fewer ranks per host)")
    arenas = (
        f"{cached_arenas} cached arena(s) of at most {max_cached_arenas}, "
        + ("one free" if cached_arena_free else "none free")
        + f", {fresh_leased} fresh arena(s) leased; cache policy {cache_policy!r}, "
        f"lease policy {lease_policy!r}"
    )
    figure = (
        f"{format_bytes(available)} is available to this rank (source: {host.source}; host-wide "
        f"{format_bytes(host.limit_bytes)} / {host.ranks_per_host} rank(s) per host "
        f"({host.ranks_source}) - reserve {format_bytes(host.reserve_bytes)})"
    )
    if room:  # only the policies stand in the way
        what = f"and {figure}, but the policies allow no arena for it (every allowed arena is held)"
    else:
        what = f"but only {figure}"
    raise StagingMemoryError(
        f"staging needs {format_bytes(needed_bytes)} of host memory {what}; {arenas}. "
        "To proceed: " + "; or ".join(knobs) + "."
    )


def decide_device(
    needed_chunk_bytes: int,
    chunk_bytes: int,
    device: DeviceReading,
    reserve_bytes: int = 0,
    *,
    chunks_in_flight: int = 1,
    min_chunk_bytes: int = MIN_CHUNK_BYTES,
) -> DeviceDecision:
    """Decide how small tensors are staged given the device's free memory.

    ``needed_chunk_bytes`` is the total of the packed (small-tensor) regions; packing allocates
    ``chunks_in_flight`` chunks of ``chunk_bytes`` (fewer bytes when everything fits in less):
    ``min(needed_chunk_bytes, chunks_in_flight * chunk_bytes)``. The budget is
    ``device.free_bytes - reserve_bytes``.

    * nothing to pack -> ``DIRECT`` (chunk 0);
    * the configured chunks fit the budget -> ``PACKED`` with ``chunk_bytes``;
    * else the largest power of two ``c >= min_chunk_bytes`` with ``chunks_in_flight * c`` within
      the budget -> ``PACKED_SHRUNK`` with ``c``;
    * else -> ``DIRECT``: each region is copied straight to its arena slot (no device memory).
    """
    if needed_chunk_bytes < 0:
        raise ValueError(f"needed_chunk_bytes must be >= 0, got {needed_chunk_bytes}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
    if chunks_in_flight < 1:
        raise ValueError(f"chunks_in_flight must be >= 1, got {chunks_in_flight}")
    if min_chunk_bytes < 1 or min_chunk_bytes & (min_chunk_bytes - 1):
        raise ValueError(f"min_chunk_bytes must be a power of two >= 1, got {min_chunk_bytes}")

    budget = max(0, device.free_bytes - reserve_bytes)
    if needed_chunk_bytes == 0:
        return DeviceDecision(DeviceMode.DIRECT, 0, 0, budget, "nothing to pack")
    want = min(needed_chunk_bytes, chunks_in_flight * chunk_bytes)
    if want <= budget:
        return DeviceDecision(
            DeviceMode.PACKED,
            chunk_bytes,
            want,
            budget,
            f"{format_bytes(want)} of chunks fit the {format_bytes(budget)} budget",
        )
    per_chunk = budget // chunks_in_flight
    if per_chunk >= min_chunk_bytes:
        # largest power of two <= per_chunk; below chunk_bytes, else PACKED would have fit
        shrunk = 1 << (per_chunk.bit_length() - 1)
        used = min(needed_chunk_bytes, chunks_in_flight * shrunk)
        return DeviceDecision(
            DeviceMode.PACKED_SHRUNK,
            shrunk,
            used,
            budget,
            f"{format_bytes(want)} of chunks exceed the {format_bytes(budget)} budget "
            f"({device.source}, reserve {format_bytes(reserve_bytes)}); chunk shrunk to "
            f"{format_bytes(shrunk)}",
        )
    return DeviceDecision(
        DeviceMode.DIRECT,
        0,
        0,
        budget,
        f"budget {format_bytes(budget)} ({device.source}, reserve {format_bytes(reserve_bytes)}) "
        f"is below {chunks_in_flight} x the {format_bytes(min_chunk_bytes)} minimum chunk; "
        "copying each region directly",
    )


def _clear_caches() -> None:
    """Forget the cached cgroup layouts and NVML state (tests only)."""
    with _LAYOUTS_LOCK:
        _LAYOUTS.clear()
    _NVML.reset()

