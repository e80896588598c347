"""Shared by the headroom tests: the fixture trees, an injected host reading and a fake NVML.

Each fixture under ``tests/fixtures/headroom/<case>/`` is a filesystem root: ``proc/self/cgroup``,
``proc/self/mountinfo``, ``proc/meminfo`` and the cgroup files under ``sys/fs/cgroup``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stager.headroom import HostReading

FIXTURES = Path(__file__).parent / "fixtures" / "headroom"
GiB = 1 << 30
MiB = 1 << 20


def clear_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start with no launcher variable that would divide the host figure."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)


def host_reading(available: int, *, reserve: int = 0, ranks: int = 1) -> HostReading:
    """An injected reading bound by a cgroup v2 limit."""
    path = "/sys/fs/cgroup/kubepods.slice/pod1/memory.max"
    return HostReading(
        available_bytes=available,
        source=f"cgroup v2 memory.max at {path} (limit 64.00 GiB)",
        source_path=path,
        limit_bytes=(available + reserve) * ranks,
        ranks_per_host=ranks,
        ranks_source="LOCAL_WORLD_SIZE",
        reserve_bytes=reserve,
        meminfo_available_bytes=None,
        meminfo_source="not read",
        cgroup_available_bytes=(available + reserve) * ranks,
        cgroup_limit_bytes=64 * GiB,
        cgroup_source=f"cgroup v2 memory.max at {path}",
        shm_free_bytes=None,
    )


class FakeNvmlError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


class FakeNvml:
    """The NVML calls ``nvml_device_handle`` makes, over a table of GPUs and MIG instances.

    Handles are strings: ``"gpu<i>"`` and ``"gpu<i>/mig<j>"``. ``exact_uuid`` mimics the driver's
    ``nvmlDeviceGetHandleByUUID``, which accepts only complete UUIDs.
    """

    NVMLError = FakeNvmlError

    def __init__(self, uuids: list[str], migs: dict[int, list[str]] | None = None) -> None:
        self.uuids = uuids
        self.migs = migs or {}
        self.calls: list[tuple[str, Any]] = []

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        self.calls.append(("by_index", i))
        if not 0 <= i < len(self.uuids):
            raise FakeNvmlError(f"invalid index {i}")
        return f"gpu{i}"

    def _all(self) -> dict[str, str]:
        out = {u: f"gpu{i}" for i, u in enumerate(self.uuids)}
        for i, migs in self.migs.items():
            out.update({u: f"gpu{i}/mig{j}" for j, u in enumerate(migs)})
        return out

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.calls.append(("by_uuid", uuid))
        handle = self._all().get(uuid)
        if handle is None:
            raise FakeNvmlError("not found")
        return handle

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:
        for u, h in self._all().items():
            if h == handle:
                return u.encode()  # old pynvml returns bytes
        raise FakeNvmlError("bad handle")

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:
        i = int(handle[3:])
        if i not in self.migs:
            raise FakeNvmlError("not supported")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, j: int) -> str:
        migs = self.migs[int(handle[3:])]
        if j >= len(migs):
            raise FakeNvmlError("not found")
        return f"{handle}/mig{j}"


UUIDS = [
    "GPU-8a3e2c1b-4d5f-6a7b-8c9d-0e1f2a3b4c5d",
    "GPU-8a3f0000-1111-2222-3333-444455556666",
    "GPU-b7c6d5e4-f3a2-b1c0-d9e8-f7a6b5c4d3e2",
    "GPU-01234567-89ab-cdef-0123-456789abcdef",
]
MIGS = {2: ["MIG-5c1d3b1e-0f2a-5e59-8f1c-3a7c2d9b1e44", "MIG-9e8d7c6b-5a4f-3e2d-1c0b-a9f8e7d6c5b4"]}


class FakeNvmlFull(FakeNvml):
    """``FakeNvml`` plus memory and PCIe queries, to drive ``read_device``/``read_link``."""

    def __init__(self, uuids: list[str], migs: dict[int, list[str]] | None = None) -> None:
        super().__init__(uuids, migs)
        self.free = {h: (i + 1) * GiB for i, h in enumerate(sorted(self._all().values()))}

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        self.calls.append(("memory", handle))
        return type("Memory", (), {"free": self.free[handle], "total": 80 * GiB, "used": 0})()

    def nvmlDeviceIsMigDeviceHandle(self, handle: str) -> Any:
        import ctypes

        return ctypes.c_uint(1 if "/mig" in handle else 0)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: str) -> str:
        return handle.split("/")[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: str) -> int:
        if "/mig" in handle:
            raise FakeNvmlError("not supported on a MIG handle")
        self.calls.append(("max_gen", handle))
        return 5

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: str) -> int:
        return 16

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: str) -> int:
        return 1  # idle

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: str) -> int:
        return 16

    def nvmlShutdown(self) -> None:
        pass
