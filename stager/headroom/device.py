"""Device memory free for staging (NVML plus the caching allocator's slack, or
``torch.cuda.mem_get_info``), the PCIe link, and one whole reading of host, device and link."""

from __future__ import annotations

import os

import torch

from stager.headroom.host import read_host
from stager.headroom.nvml import _NVML, _cached_handle, nvml_status
from stager.headroom.readings import DeviceReading, Headroom, LinkInfo


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
    return LinkInfo(gen=gen, width=width, bytes_per_s=bandwidth, curr_gen=curr_gen, curr_width=curr_width)


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

