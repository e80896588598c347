"""Headroom: one reading of the memory the stager may use, and where each figure came from.

A reading has three parts: **host** (README.md, "Memory headroom"), **device** (NVML free memory
plus what PyTorch's caching allocator holds reserved but unallocated; ``torch.cuda.mem_get_info``
without NVML) and **link** (the PCIe generation and width, as a theoretical one-direction
bandwidth). :func:`decide_host` and :func:`decide_device` are pure decisions over injected readings.

Importing this module initialises neither CUDA nor NVML. NVML is initialised on first use, once,
under a lock; a failure is remembered and reported as ``"NVML unavailable: <reason>"``, never
retried. Static facts (cgroup directories, NVML handles, the link's maximum generation) are
cached, so one :func:`read_headroom` costs tens of microseconds.
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
    "HostReading",
    "DeviceReading",
    "LinkInfo",
    "Headroom",
    "HostDecision",
    "DeviceMode",
    "DeviceDecision",
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
]
