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
:func:`decide_host` (when no cached arena is free: add a cached arena, stage into a fresh arena,
wait for a lease, or raise :class:`~stager.errors.StagingMemoryError`) and :func:`decide_device`
(pack with the configured chunk size, pack with a shrunk chunk, or copy each region directly).

Importing this module initialises neither CUDA nor NVML. NVML is initialised on first use, once,
under a lock; a failure (``NVMLError_LibraryNotFound`` on a machine without a driver) is
remembered and reported as ``"NVML unavailable: <reason>"``, never retried. Static facts (the
cgroup directories, NVML handles, the link's maximum generation) are cached; each reading
re-reads only the numbers that change, so one :func:`read_headroom` costs tens of microseconds.
"""

from __future__ import annotations

from stager.headroom.decide import MIN_CHUNK_BYTES, decide_device, decide_host
from stager.headroom.device import pcie_bytes_per_s, read_device, read_headroom, read_link
from stager.headroom.host import local_world_size, read_host
from stager.headroom.nvml import nvml_device_handle, nvml_status, parse_visible_devices
from stager.headroom.readings import (
    DeviceDecision,
    DeviceMode,
    DeviceReading,
    Headroom,
    HostDecision,
    HostReading,
    LinkInfo,
)

__all__ = [
    "HostReading", "DeviceReading", "LinkInfo", "Headroom", "HostDecision", "DeviceMode", "DeviceDecision",
    "MIN_CHUNK_BYTES", "read_host", "read_device", "read_link", "read_headroom", "decide_host",
    "decide_device", "local_world_size", "parse_visible_devices", "nvml_device_handle", "nvml_status",
    "pcie_bytes_per_s",
]
