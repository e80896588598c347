"""The readings and decisions of :mod:`stager.headroom` as data: host, device and link readings,
one whole reading (:class:`Headroom`), and the outcomes of the two decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from stager.envs import format_size


def _lines(head: str, facts: Iterable[tuple[str, object]]) -> list[str]:
    """``head``, then an indented ``label: value`` line for every fact whose value is not None."""
    return [head] + [f"  {label}: {value}" for label, value in facts if value is not None]


def _size(nbytes: int | None) -> str | None:
    return None if nbytes is None else format_size(nbytes)


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
        return _lines(
            f"host: {format_size(self.available_bytes)} available to this rank (bound by {self.source})",
            [
                ("host-wide limit", format_size(self.limit_bytes)),
                ("meminfo", self.meminfo_source),
                ("cgroup", self.cgroup_source),
                ("ranks per host", f"{self.ranks_per_host} ({self.ranks_source})"),
                ("reserve per rank", f"{format_size(self.reserve_bytes)} (STAGER_HOST_RESERVE)"),
                ("shared memory", self.shm_source),
            ],
        )


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
        return _lines(
            f"device cuda:{self.index}: {format_size(self.free_bytes)} free for staging ({self.source})",
            [
                ("physical device", self.physical),
                ("NVML free", _size(self.nvml_free)),
                ("allocator slack (reserved - allocated)", format_size(self.allocator_slack)),
                ("total", _size(self.total_bytes)),
                ("note", self.note or None),
            ],
        )


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
        # imported here: stager.headroom.device imports this module
        from stager.headroom.device import pcie_bytes_per_s

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
    """Reuse a free cached arena (its last staged dict was released). The stager takes a free one
    before it decides, so :func:`decide_host` never returns this."""
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
