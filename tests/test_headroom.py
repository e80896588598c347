"""Tests of ``stager.headroom``: host figures from fixture trees of real cgroup v1/v2 and meminfo
contents, the ``CUDA_VISIBLE_DEVICES`` mapping against a fake NVML, the host and device decision
tables driven by injected readings, the real readings of the machine the tests run on, and (under
the ``cuda`` marker) NVML against ``torch.cuda.mem_get_info``.

Each fixture under ``tests/fixtures/headroom/<case>/`` is a filesystem root: ``proc/self/cgroup``,
``proc/self/mountinfo``, ``proc/meminfo`` and the cgroup files under ``sys/fs/cgroup``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stager import headroom as hr
from stager.errors import StagerConfigError, StagingMemoryError
from stager.headroom import (
    DeviceDecision,
    DeviceMode,
    DeviceReading,
    HostDecision,
    HostReading,
    LinkInfo,
    decide_device,
    decide_host,
    local_world_size,
    nvml_device_handle,
    parse_visible_devices,
    pcie_bytes_per_s,
    read_device,
    read_headroom,
    read_host,
)
from stager.headroom import host as hr_host
from stager.headroom import nvml as hr_nvml

FIXTURES = Path(__file__).parent / "fixtures" / "headroom"
GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start with no launcher variable that would divide the host figure."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# Host: fixture trees
# ---------------------------------------------------------------------------------------------

# case, expected per-rank bytes (1 rank, no reserve), binding file (relative to the case root),
# binding cgroup limit (None: unlimited)
HOST_CASES = [
    pytest.param(
        "v2_pod", 16 * GiB - (12 * GiB - 1 * GiB), "sys/fs/cgroup/memory.max", 16 * GiB,
        id="v2-k8s-pod-limit-minus-usage-plus-inactive-file",
    ),
    pytest.param(
        "v2_nested", 7 * GiB - (3 * GiB + GiB // 2 - GiB // 2),
        "sys/fs/cgroup/user.slice/user-1000.slice/memory.high", 7 * GiB,
        id="v2-ancestor-limit-memory-high-binds",
    ),
    pytest.param(
        "v1_docker", 8 * GiB - (6 * GiB - GiB // 2),
        "sys/fs/cgroup/memory/memory.limit_in_bytes", 8 * GiB,
        id="v1-docker-hybrid-host",
    ),
    pytest.param("v1_unlimited", 6 * GiB, "proc/meminfo", None, id="v1-unlimited-sentinel"),
    pytest.param("v2_unlimited", 6 * GiB, "proc/meminfo", None, id="v2-unlimited-max"),
    pytest.param(
        "no_mountinfo", 4 * GiB - 1 * GiB, "sys/fs/cgroup/memory.max", 4 * GiB,
        id="no-mountinfo-falls-back-to-sys-fs-cgroup",
    ),
]


@pytest.mark.parametrize(("case", "expected", "binding", "limit"), HOST_CASES)
def test_host_from_fixture(case: str, expected: int, binding: str, limit: int | None) -> None:
    root = FIXTURES / case
    r = read_host(root=root)
    assert r.available_bytes == expected
    assert r.limit_bytes == expected
    assert r.source_path == str(root / binding)
    assert str(root / binding) in r.source
    assert r.cgroup_limit_bytes == limit
    assert r.ranks_per_host == 1
    assert r.shm_free_bytes is None
    assert r.meminfo_available_bytes is not None and r.meminfo_available_bytes > 0
    if limit is None:
        assert r.cgroup_available_bytes is None
        assert r.cgroup_source.endswith("unlimited")
        assert r.source.endswith("MemAvailable")


def test_meminfo_value_is_kib() -> None:
    r = read_host(root=FIXTURES / "v2_pod")
    assert r.meminfo_available_bytes == 1987654321 * 1024


def test_v1_hybrid_host_uses_v1_memory_controller() -> None:
    # the unified hierarchy is mounted but has no controllers: the v1 memory mount decides
    r = read_host(root=FIXTURES / "v1_docker")
    assert r.source.startswith("cgroup v1 memory.limit_in_bytes at ")


def test_unlimited_cgroup_names_where_it_looked() -> None:
    r = read_host(root=FIXTURES / "v1_unlimited")
    leaf = FIXTURES / "v1_unlimited/sys/fs/cgroup/memory/process_api/23de0ef256a56b2137ec3a20737e2d39"
    assert r.cgroup_source == f"cgroup v1 memory.limit_in_bytes at {leaf}: unlimited"


def test_ranks_divide_via_local_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    r = read_host(root=FIXTURES / "v2_pod", reserve_bytes=256 * MiB)
    assert r.ranks_per_host == 4
    assert r.ranks_source == "LOCAL_WORLD_SIZE"
    assert r.limit_bytes == 5 * GiB
    assert r.available_bytes == 5 * GiB // 4 - 256 * MiB


def test_ranks_argument_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    r = read_host(root=FIXTURES / "v2_pod", ranks_per_host=2)
    assert (r.ranks_per_host, r.ranks_source) == (2, "argument ranks_per_host")
    assert r.available_bytes == 5 * GiB // 2


def test_mpi_local_size_when_no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    assert local_world_size() == (8, "OMPI_COMM_WORLD_LOCAL_SIZE")


def test_default_one_rank() -> None:
    n, source = local_world_size({})
    assert n == 1 and source.startswith("default")


@pytest.mark.parametrize("bad", ["abc", "0", "-2"])
def test_bad_local_world_size_names_variable(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", bad)
    with pytest.raises(StagerConfigError, match=rf"LOCAL_WORLD_SIZE='{bad}' is not a positive integer"):
        read_host(root=FIXTURES / "v2_pod")


def test_reserve_larger_than_share_gives_zero() -> None:
    r = read_host(root=FIXTURES / "v1_docker", reserve_bytes=100 * GiB)
    assert r.available_bytes == 0
    assert r.reserve_bytes == 100 * GiB


def test_negative_reserve_rejected() -> None:
    with pytest.raises(ValueError, match="reserve_bytes must be >= 0, got -1"):
        read_host(root=FIXTURES / "v2_pod", reserve_bytes=-1)


def test_shared_memory_adds_statvfs_bound(tmp_path: Path) -> None:
    r = read_host(root=FIXTURES / "v2_pod", shared_memory=True, shm_path=tmp_path)
    st = os.statvfs(tmp_path)
    assert r.shm_free_bytes is not None
    # free space moves while the test runs; one block of slack each way is plenty for tmpfs/ext4
    assert abs(r.shm_free_bytes - st.f_bavail * st.f_frsize) <= 64 * MiB
    assert r.shm_source is not None and str(tmp_path) in r.shm_source
    assert r.limit_bytes == min(5 * GiB, r.shm_free_bytes)


def test_shared_memory_missing_binds_at_zero(tmp_path: Path) -> None:
    missing = tmp_path / "no-shm"
    r = read_host(root=FIXTURES / "v2_pod", shared_memory=True, shm_path=missing)
    assert r.shm_free_bytes == 0
    assert r.available_bytes == 0
    assert r.source.startswith(f"{missing} statvfs failed")
    assert r.source_path == str(missing)


def test_shm_default_path_is_under_root() -> None:
    r = read_host(root=FIXTURES / "v2_pod", shared_memory=True)
    assert r.shm_source is not None
    assert r.shm_source.startswith(str(FIXTURES / "v2_pod" / "dev" / "shm"))


def test_changing_numbers_are_reread_with_cached_layout(tmp_path: Path) -> None:
    root = tmp_path / "pod"
    shutil.copytree(FIXTURES / "v2_pod", root)
    first = read_host(root=root)
    assert first.available_bytes == 5 * GiB
    (root / "sys/fs/cgroup/memory.current").write_text(f"{14 * GiB}\n")
    second = read_host(root=root)
    assert second.available_bytes == 16 * GiB - (14 * GiB - 1 * GiB)
    (root / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert read_host(root=root).source.endswith("MemAvailable")


def test_meminfo_without_memavailable(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:        8048576 kB\nMemFree:          100000 kB\nBuffers:            2000 kB\n"
        "Cached:            30000 kB\nSwapCached:            0 kB\n"
    )
    r = read_host(root=tmp_path)
    assert r.meminfo_available_bytes == (100000 + 2000 + 30000) * 1024
    assert "MemFree+Buffers+Cached" in r.source
    assert r.cgroup_source.startswith("no cgroup memory controller found")


def test_nothing_readable_is_zero_and_says_so(tmp_path: Path) -> None:
    r = read_host(root=tmp_path)
    assert r.available_bytes == 0
    assert r.source_path is None
    assert r.source.startswith("no host figure readable")


def test_cgroup_path_outside_mount_uses_mount_point(tmp_path: Path) -> None:
    root = tmp_path / "pod"
    shutil.copytree(FIXTURES / "v2_pod", root)
    (root / "proc/self/cgroup").write_text("0::/../../kubepods.slice/other\n")
    r = read_host(root=root)
    assert r.source_path == str(root / "sys/fs/cgroup/memory.max")


def test_root_cgroup_without_limit_file_is_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shutil.copytree(FIXTURES / "v2_nested", root)
    (root / "proc/self/cgroup").write_text("0::/\n")
    r = read_host(root=root)
    assert r.cgroup_source == f"cgroup v2 memory.max at {root / 'sys/fs/cgroup'}: unlimited"
    assert r.source.endswith("MemAvailable")


def test_mountinfo_escapes_and_limits() -> None:
    assert hr_host._unescape_mount(r"/mnt/with\040space") == "/mnt/with space"
    assert hr_host._parse_limit(b"max\n") is None
    assert hr_host._parse_limit(b"9223372036854771712\n") is None
    assert hr_host._parse_limit(b"4096\n") == 4096


def test_host_describe_lists_every_input(tmp_path: Path) -> None:
    lines = read_host(root=FIXTURES / "v2_pod", shared_memory=True, shm_path=tmp_path).describe()
    text = "\n".join(lines)
    assert lines[0].startswith("host: ") and "available to this rank (bound by " in lines[0]
    for word in ("meminfo:", "cgroup:", "ranks per host:", "STAGER_HOST_RESERVE", "shared memory:"):
        assert word in text


# ---------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES and NVML handles, against a fake NVML
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="unset"),
        pytest.param("", [], id="empty-hides-all"),
        pytest.param("0,2", [0, 2], id="ordinals"),
        pytest.param(" 3 , 1 ", [3, 1], id="spaces"),
        pytest.param("1gpu2,2ampere", [1, 2], id="strtoul-prefix"),
        pytest.param("0,-1,3", [0], id="negative-ends-list"),
        pytest.param("2,x,1", [2], id="garbage-ends-list"),
        pytest.param("1,1", [], id="repeat-empties-list"),
        pytest.param("GPU-8a3e,GPU-77", ["GPU-8a3e", "GPU-77"], id="uuids"),
        pytest.param("GPU-8a3e,3", ["GPU-8a3e"], id="uuid-then-ordinal-ends"),
        pytest.param("MIG-5c1d3b1e-0f2a-5e59-8f1c-3a7c2d9b1e44", ["MIG-5c1d3b1e-0f2a-5e59-8f1c-3a7c2d9b1e44"], id="mig"),
        pytest.param("GPU-a,GPU-a", [], id="repeat-uuid"),
    ],
)
def test_parse_visible_devices(value: str | None, expected: list[Any] | None) -> None:
    assert parse_visible_devices(value) == expected


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


@pytest.mark.parametrize(
    ("visible", "index", "handle"),
    [
        pytest.param(None, 3, "gpu3", id="unset-index-is-physical"),
        pytest.param("2,0", 0, "gpu2", id="ordinal-0"),
        pytest.param("2,0", 1, "gpu0", id="ordinal-1"),
        pytest.param(f"{UUIDS[3]},{UUIDS[1]}", 1, "gpu1", id="full-uuid"),
        pytest.param("GPU-b7c6,GPU-8a3e", 0, "gpu2", id="uuid-prefix"),
        pytest.param("GPU-b7c6,GPU-8a3e2", 1, "gpu0", id="uuid-prefix-unique-after-more-digits"),
        pytest.param(MIGS[2][1], 0, "gpu2/mig1", id="mig-uuid"),
        pytest.param("MIG-5c1d", 0, "gpu2/mig0", id="mig-uuid-prefix"),
    ],
)
def test_nvml_handle_mapping(visible: str | None, index: int, handle: str) -> None:
    nvml = FakeNvml(UUIDS, MIGS)
    got, label = nvml_device_handle(index, nvml=nvml, visible_devices=visible)
    assert got == handle
    assert label


def test_nvml_handle_mapping_uses_uuid_lookup_first() -> None:
    nvml = FakeNvml(UUIDS, MIGS)
    nvml_device_handle(0, nvml=nvml, visible_devices=UUIDS[2])
    assert nvml.calls == [("by_uuid", UUIDS[2])]


@pytest.mark.parametrize(
    ("visible", "index", "message"),
    [
        pytest.param("GPU-8a3", 0, r"'GPU-8a3' is ambiguous", id="ambiguous-prefix"),
        pytest.param("GPU-ffff", 0, r"'GPU-ffff' matches no device", id="no-match"),
        pytest.param("1,0", 2, r"cuda:2 is not visible: CUDA_VISIBLE_DEVICES='1,0' makes 2", id="beyond-list"),
        pytest.param("", 0, r"cuda:0 is not visible", id="empty"),
    ],
)
def test_nvml_handle_mapping_errors(visible: str, index: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nvml_device_handle(index, nvml=FakeNvml(UUIDS, MIGS), visible_devices=visible)


def test_negative_index_rejected() -> None:
    with pytest.raises(ValueError, match="device index must be >= 0, got -1"):
        nvml_device_handle(-1, nvml=FakeNvml(UUIDS), visible_devices=None)


# ---------------------------------------------------------------------------------------------
# NVML state: lazy, once, remembered failure
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_nvml_state() -> Any:
    hr_nvml._NVML.reset()
    yield hr_nvml._NVML
    hr_nvml._NVML.reset()


def test_nvml_init_failure_remembered_not_retried(
    monkeypatch: pytest.MonkeyPatch, fresh_nvml_state: Any
) -> None:
    import pynvml

    calls = []

    def failing_init() -> None:
        calls.append(1)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", failing_init)
    status = hr.nvml_status()
    assert status == "NVML unavailable: NVML Shared Library Not Found (NVMLError_LibraryNotFound)"
    for _ in range(5):
        hr.read_link(0)
        hr.nvml_status()
    assert len(calls) == 1
    h = read_headroom(0, root=FIXTURES / "v2_pod")
    assert h.link is None
    assert any("NVML unavailable: NVML Shared Library Not Found" in n for n in h.notes)


def test_import_initialises_neither_cuda_nor_nvml() -> None:
    code = (
        "import sys, torch, stager.headroom\n"
        "pynvml = sys.modules.get('pynvml')\n"
        "assert pynvml is None or pynvml.nvmlLib is None, 'NVML initialised on import'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


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


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, fresh_nvml_state: Any) -> FakeNvmlFull:
    fake = FakeNvmlFull(UUIDS, MIGS)
    monkeypatch.setattr(fresh_nvml_state, "module", fake)
    monkeypatch.setattr(fresh_nvml_state, "done", True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b7c6,GPU-8a3e2")
    return fake


def test_read_device_and_link_through_nvml(
    fake_nvml: FakeNvmlFull, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = read_device(0)
    second = read_device("cuda:1")
    assert first is not None and second is not None
    assert first.physical == UUIDS[2] and first.nvml_free == fake_nvml.free["gpu2"]
    assert second.physical == UUIDS[0] and second.nvml_free == fake_nvml.free["gpu0"]
    if not torch.cuda.is_initialized():
        assert first.allocator_slack == 0 and first.free_bytes == first.nvml_free
    assert first.source.startswith(f"NVML nvmlDeviceGetMemoryInfo on {UUIDS[2]}")
    assert hr.read_link(0) == LinkInfo(
        gen=5, width=16, bytes_per_s=pcie_bytes_per_s(5, 16), curr_gen=1, curr_width=16
    )

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-9e8d")  # a new value maps afresh
    mig = read_device(0)
    assert mig is not None
    assert mig.physical == MIGS[2][1] and mig.nvml_free == fake_nvml.free["gpu2/mig1"]
    link = hr.read_link(0)  # a MIG instance reports its parent's link
    assert link is not None and (link.gen, link.width) == (5, 16)

    before = len(fake_nvml.calls)
    for _ in range(3):
        read_device(0)
        hr.read_link(0)
    # handles and the link's maximum are cached: only the memory query repeats
    assert fake_nvml.calls[before:] == [("memory", "gpu2/mig1")] * 3

    h = read_headroom(0, root=FIXTURES / "v2_pod")
    assert h.notes == ()
    text = "\n".join(h.describe())
    assert f"physical device: {MIGS[2][1]}" in text
    assert "link: PCIe gen5 x16, 63.02 GB/s per direction (running now at gen1 x16)" in text


def test_read_device_invisible_index_raises(fake_nvml: FakeNvmlFull) -> None:
    with pytest.raises(ValueError, match="cuda:2 is not visible"):
        read_device(2)


def test_read_device_rejects_cpu_device() -> None:
    with pytest.raises(ValueError, match="expected a CUDA device, got cpu"):
        read_device("cpu")


# ---------------------------------------------------------------------------------------------
# The host decision table
# ---------------------------------------------------------------------------------------------


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


N = 100
# id: (cache policy, lease policy, cached arena free, cached arenas, max cached, fresh leased,
#      available) -> decision. Every row of decide_host's docstring table, from both sides.
HOST_TABLE = [
    # a free cached arena is reused, with or without room
    pytest.param("auto", "wait", True, 1, 2, 0, 0, HostDecision.REUSE, id="auto-reuse-without-room"),
    pytest.param("cached", "allocate", True, 2, 2, 0, 0, HostDecision.REUSE, id="cached-reuse"),
    pytest.param("fresh", "wait", True, 1, 1, 0, N, HostDecision.FRESH, id="fresh-ignores-free-cached-arena"),
    # held cached arena, lease policy wait: wait even with room for another
    pytest.param("cached", "wait", False, 1, 2, 0, 10 * N, HostDecision.WAIT, id="cached-held-wait-despite-room"),
    pytest.param("auto", "wait", False, 1, 2, 0, 10 * N, HostDecision.WAIT, id="auto-held-wait-despite-room"),
    # new cached arena: cached needs room, auto needs a margin of one more arena
    pytest.param("cached", "wait", False, 0, 1, 0, N, HostDecision.NEW_CACHED, id="cached-first-arena"),
    pytest.param("cached", "allocate", False, 1, 2, 0, N, HostDecision.NEW_CACHED, id="cached-held-allocate-second"),
    pytest.param("auto", "wait", False, 0, 1, 0, 2 * N, HostDecision.NEW_CACHED, id="auto-first-arena-with-margin"),
    pytest.param("auto", "allocate", False, 1, 2, 0, 2 * N, HostDecision.NEW_CACHED, id="auto-held-allocate-second"),
    # fresh arenas: auto without margin or at the maximum; fresh policy with room
    pytest.param("auto", "wait", False, 0, 1, 0, 2 * N - 1, HostDecision.FRESH, id="auto-no-margin-fresh"),
    pytest.param("auto", "allocate", False, 2, 2, 0, N, HostDecision.FRESH, id="auto-at-max-allocate-fresh"),
    pytest.param("auto", "allocate", False, 0, 0, 0, N, HostDecision.FRESH, id="auto-max-zero-fresh"),
    pytest.param("fresh", "allocate", False, 0, 0, 3, N, HostDecision.FRESH, id="fresh-with-room"),
    # no room: wait for whatever is leased, when waiting is allowed
    pytest.param("cached", "wait", False, 1, 1, 0, N - 1, HostDecision.WAIT, id="cached-no-room-wait"),
    pytest.param("auto", "wait", False, 0, 1, 2, N - 1, HostDecision.WAIT, id="auto-no-room-wait-for-fresh-lease"),
    pytest.param("fresh", "wait", False, 0, 0, 1, N - 1, HostDecision.WAIT, id="fresh-no-room-wait-for-fresh-lease"),
]


@pytest.mark.parametrize(
    ("cache", "lease", "free", "arenas", "max_arenas", "fresh_leased", "available", "expected"),
    HOST_TABLE,
)
def test_decide_host_table(
    cache: str,
    lease: str,
    free: bool,
    arenas: int,
    max_arenas: int,
    fresh_leased: int,
    available: int,
    expected: HostDecision,
) -> None:
    got = decide_host(
        N,
        cached_arena_free=free,
        cached_arenas=arenas,
        max_cached_arenas=max_arenas,
        host=host_reading(available),
        cache_policy=cache,
        lease_policy=lease,
        fresh_leased=fresh_leased,
    )
    assert got is expected
    assert got.value == expected.value  # str-valued


class _Policy(str, enum.Enum):
    """Stands in for the str-valued policy enums of ``stager.envs``."""

    CACHED = "cached"
    WAIT = "wait"


def test_decide_host_accepts_str_enums() -> None:
    got = decide_host(
        N, cached_arena_free=False, cached_arenas=1, max_cached_arenas=1, host=host_reading(0),
        cache_policy=_Policy.CACHED, lease_policy=_Policy.WAIT,
    )
    assert got is HostDecision.WAIT


@pytest.mark.parametrize(
    ("cache", "lease", "free", "arenas", "max_arenas", "fresh_leased", "available", "knob"),
    [
        pytest.param("cached", "allocate", False, 1, 1, 0, N - 1, "STAGER_LEASE_POLICY=wait", id="allocate-never-waits"),
        pytest.param("cached", "allocate", False, 2, 2, 0, N, "raise STAGER_MAX_ARENAS (now 2)", id="cached-at-max-with-room"),
        pytest.param("cached", "wait", False, 0, 0, 0, N, "STAGER_CACHE_POLICY=auto", id="cached-max-zero"),
        pytest.param("fresh", "allocate", False, 0, 0, 1, N - 1, "STAGER_LEASE_TIMEOUT", id="fresh-leased-allocate"),
        pytest.param("fresh", "wait", False, 0, 0, 0, N - 1, "more memory", id="nothing-to-wait-for"),
        pytest.param("auto", "wait", False, 0, 1, 0, N - 1, "more memory", id="first-arena-no-room"),
        pytest.param("auto", "allocate", False, 2, 2, 1, N - 1, "STAGER_CACHE_POLICY=fresh", id="pinned-arenas-held"),
    ],
)
def test_decide_host_raises(
    cache: str,
    lease: str,
    free: bool,
    arenas: int,
    max_arenas: int,
    fresh_leased: int,
    available: int,
    knob: str,
) -> None:
    with pytest.raises(StagingMemoryError, match=re.escape(knob)) as info:
        decide_host(
            N,
            cached_arena_free=free,
            cached_arenas=arenas,
            max_cached_arenas=max_arenas,
            host=host_reading(available),
            cache_policy=cache,
            lease_policy=lease,
            fresh_leased=fresh_leased,
        )
    assert isinstance(info.value, MemoryError)
    msg = str(info.value)
    assert msg.startswith("staging needs 100 B of host memory ")
    assert f" {available} B is available to this rank" in msg
    if available < N:
        assert f"but only {available} B is available" in msg
    else:
        assert "but the policies allow no arena for it" in msg
    assert "cgroup v2 memory.max at /sys/fs/cgroup/kubepods.slice/pod1/memory.max" in msg


def test_decide_host_error_message_from_real_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    host = read_host(root=FIXTURES / "v2_pod", reserve_bytes=512 * MiB)
    assert host.available_bytes == 2 * GiB  # 5 GiB / 2 - 512 MiB
    with pytest.raises(StagingMemoryError) as info:
        decide_host(
            8 * GiB,
            cached_arena_free=False,
            cached_arenas=1,
            max_cached_arenas=1,
            host=host,
            cache_policy="cached",
            lease_policy="allocate",
        )
    msg = str(info.value)
    assert "needs 8.00 GiB of host memory" in msg
    assert "only 2.00 GiB is available to this rank" in msg
    assert f"cgroup v2 memory.max at {FIXTURES / 'v2_pod/sys/fs/cgroup/memory.max'}" in msg
    assert "2 rank(s) per host (LOCAL_WORLD_SIZE)" in msg
    for knob in (
        "STAGER_HOST_RESERVE",
        "STAGER_LEASE_POLICY=wait",
        "STAGER_LEASE_TIMEOUT",
        "STAGER_CACHE_POLICY=fresh",
    ):
        assert knob in msg


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"cached_arenas": 0, "cached_arena_free": True}, ValueError, "no cached arena exists", id="free-without-arena"),
        pytest.param({"max_cached_arenas": -1}, ValueError, "max_cached_arenas=-1", id="negative-max"),
    ],
)
def test_decide_host_bad_inputs(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    args: dict[str, Any] = dict(
        cached_arena_free=False, cached_arenas=1, max_cached_arenas=1, host=host_reading(N)
    )
    args.update(kwargs)
    with pytest.raises(error, match=message):
        decide_host(N, **args)


# ---------------------------------------------------------------------------------------------
# The device decision
# ---------------------------------------------------------------------------------------------


def device_reading(free: int, slack: int = 0) -> DeviceReading:
    return DeviceReading(
        index=0,
        free_bytes=free + slack,
        source="NVML nvmlDeviceGetMemoryInfo on NVML index 0 + allocator slack",
        nvml_free=free,
        allocator_slack=slack,
        total_bytes=80 * GiB,
        physical="NVML index 0",
    )


@pytest.mark.parametrize(
    ("needed", "chunk", "free", "slack", "reserve", "in_flight", "mode", "chunk_out", "device_bytes"),
    [
        pytest.param(1 * GiB, 64 * MiB, 10 * GiB, 0, 0, 1, DeviceMode.PACKED, 64 * MiB, 64 * MiB, id="packed"),
        pytest.param(3 * MiB, 64 * MiB, 4 * MiB, 0, 0, 1, DeviceMode.PACKED, 64 * MiB, 3 * MiB, id="packed-small-total"),
        pytest.param(1 * GiB, 64 * MiB, 100 * MiB, 0, 0, 2, DeviceMode.PACKED_SHRUNK, 32 * MiB, 64 * MiB, id="shrunk-two-in-flight"),
        pytest.param(1 * GiB, 64 * MiB, 40 * MiB, 30 * MiB, 0, 1, DeviceMode.PACKED, 64 * MiB, 64 * MiB, id="slack-counts"),
        pytest.param(1 * GiB, 64 * MiB, 64 * MiB, 0, 1, 1, DeviceMode.PACKED_SHRUNK, 32 * MiB, 32 * MiB, id="reserve-forces-shrink"),
        pytest.param(1 * GiB, 64 * MiB, 3 * MiB + 5, 0, 0, 1, DeviceMode.PACKED_SHRUNK, 2 * MiB, 2 * MiB, id="shrunk-to-power-of-two"),
        pytest.param(1 * GiB, 64 * MiB, MiB - 1, 0, 0, 1, DeviceMode.DIRECT, 0, 0, id="below-minimum-direct"),
        pytest.param(1 * GiB, 64 * MiB, 3 * MiB, 0, 0, 4, DeviceMode.DIRECT, 0, 0, id="in-flight-below-minimum-direct"),
        pytest.param(0, 64 * MiB, 10 * GiB, 0, 0, 1, DeviceMode.DIRECT, 0, 0, id="nothing-to-pack"),
    ],
)
def test_decide_device(
    needed: int,
    chunk: int,
    free: int,
    slack: int,
    reserve: int,
    in_flight: int,
    mode: DeviceMode,
    chunk_out: int,
    device_bytes: int,
) -> None:
    d = decide_device(needed, chunk, device_reading(free, slack), reserve, chunks_in_flight=in_flight)
    assert isinstance(d, DeviceDecision)
    assert (d.mode, d.chunk_bytes, d.device_bytes) == (mode, chunk_out, device_bytes)
    assert d.budget_bytes == max(0, free + slack - reserve)
    assert d.device_bytes <= d.budget_bytes or d.mode is DeviceMode.DIRECT
    if d.mode is DeviceMode.PACKED_SHRUNK:
        assert d.chunk_bytes & (d.chunk_bytes - 1) == 0
        assert hr.MIN_CHUNK_BYTES <= d.chunk_bytes < chunk


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        pytest.param((-1, MiB), {}, "needed_chunk_bytes must be >= 0", id="negative-needed"),
        pytest.param((1, 0), {}, "chunk_bytes must be >= 1", id="zero-chunk"),
        pytest.param((1, MiB), {"reserve_bytes": -5}, "reserve_bytes must be >= 0", id="negative-reserve"),
        pytest.param((1, MiB), {"chunks_in_flight": 0}, "chunks_in_flight must be >= 1", id="zero-in-flight"),
        pytest.param((1, MiB), {"min_chunk_bytes": 3 * MiB}, "power of two", id="min-not-power-of-two"),
    ],
)
def test_decide_device_bad_inputs(args: tuple[int, int], kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide_device(*args, device_reading(GiB), **kwargs)


# ---------------------------------------------------------------------------------------------
# PCIe link arithmetic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gen", "width", "expected"),
    [
        pytest.param(1, 1, 250e6, id="gen1-x1"),
        pytest.param(2, 16, 8e9, id="gen2-x16"),
        pytest.param(3, 16, 8e9 * 16 * 128 / 130 / 8, id="gen3-x16"),
        pytest.param(4, 16, 16e9 * 16 * 128 / 130 / 8, id="gen4-x16"),
        pytest.param(5, 16, 32e9 * 16 * 128 / 130 / 8, id="gen5-x16"),
        pytest.param(6, 16, 128e9, id="gen6-x16"),
    ],
)
def test_pcie_bandwidth(gen: int, width: int, expected: float) -> None:
    assert pcie_bytes_per_s(gen, width) == pytest.approx(expected, rel=1e-12)


def test_pcie_gen5_x16_is_63_gb_per_s() -> None:
    assert round(pcie_bytes_per_s(5, 16) / 1e9, 1) == 63.0


@pytest.mark.parametrize(("gen", "width"), [(0, 16), (7, 16), (4, 0)])
def test_pcie_bandwidth_rejects(gen: int, width: int) -> None:
    with pytest.raises(ValueError):
        pcie_bytes_per_s(gen, width)


def test_link_fraction_and_describe() -> None:
    link = LinkInfo(gen=5, width=16, bytes_per_s=pcie_bytes_per_s(5, 16), curr_gen=1, curr_width=16)
    assert link.fraction(link.bytes_per_s / 2) == pytest.approx(0.5)
    assert link.curr_bytes_per_s == pytest.approx(pcie_bytes_per_s(1, 16))
    assert link.describe() == ["link: PCIe gen5 x16, 63.02 GB/s per direction (running now at gen1 x16)"]


def test_readings_are_frozen() -> None:
    r = host_reading(N)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.available_bytes = 0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# This machine, for real
# ---------------------------------------------------------------------------------------------


def test_real_host_reading() -> None:
    r = read_host()
    assert r.available_bytes > 0
    assert r.source_path is not None and os.path.exists(r.source_path)
    assert r.source_path in r.source
    assert r.source_path == "/proc/meminfo" or r.source_path.startswith("/sys/fs/cgroup/")


def test_real_nvml_reports_itself() -> None:
    """Without a usable NVML (no GPU driver) the reading says so and the device part is empty."""
    status = hr.nvml_status()
    h = read_headroom(0)
    assert h.host.available_bytes > 0
    if status.startswith("NVML unavailable: "):
        assert len(status) > len("NVML unavailable: ")
        assert h.link is None
        assert any(status in n for n in h.notes)
        if not torch.cuda.is_available():
            assert read_device(0) is None
            assert h.device is None
    else:
        assert status == "NVML available"
        assert h.device is not None and h.device.nvml_free is not None


def test_read_headroom_is_fast() -> None:
    read_headroom()  # discover and cache the layout
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        read_headroom()
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 1e-3, f"read_headroom() took {per_call * 1e6:.0f} us per call"


def test_headroom_describe_host_only() -> None:
    lines = read_headroom(root=FIXTURES / "v1_docker").describe()
    assert lines[0].startswith("host: 2.50 GiB available to this rank")


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_nvml_agrees_with_mem_get_info_within_allocator_slack() -> None:
    import pynvml

    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda:0")
    del x  # stays reserved by the caching allocator: slack of at least 256 MiB
    torch.cuda.synchronize(0)
    r = read_device(0)
    mem_free, mem_total = torch.cuda.mem_get_info(0)
    reserved, allocated = torch.cuda.memory_reserved(0), torch.cuda.memory_allocated(0)
    assert r is not None and r.nvml_free is not None, hr.nvml_status()
    assert r.allocator_slack == reserved - allocated
    assert r.allocator_slack >= 256 * MiB
    assert r.free_bytes == r.nvml_free + r.allocator_slack
    # NVML and cudaMemGetInfo read the same driver figure; other processes may move it a little
    assert abs(r.nvml_free - mem_free) <= 64 * MiB
    assert abs((r.free_bytes - mem_free) - r.allocator_slack) <= 64 * MiB
    assert r.total_bytes is not None and abs(r.total_bytes - mem_total) <= mem_total // 50

    # the handle is the device torch calls cuda:0, whatever CUDA_VISIBLE_DEVICES says
    handle, _ = nvml_device_handle(0, nvml=pynvml, visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if int(getattr(pynvml.nvmlDeviceIsMigDeviceHandle(handle), "value", 0)):
        handle = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    pci = pynvml.nvmlDeviceGetPciInfo(handle)
    props = torch.cuda.get_device_properties(0)
    assert (pci.domain, pci.bus, pci.device) == (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)


@pytest.mark.cuda
def test_real_link_and_headroom_on_gpu() -> None:
    h = read_headroom(0)
    assert h.device is not None and h.device.free_bytes > 0
    assert h.link is not None, h.notes
    assert 3 <= h.link.gen <= 6 and h.link.width >= 1
    assert h.link.bytes_per_s == pcie_bytes_per_s(h.link.gen, h.link.width)
    text = "\n".join(h.describe())
    assert "device cuda:0:" in text and "link: PCIe gen" in text
