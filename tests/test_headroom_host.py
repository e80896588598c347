"""Tests of ``stager.headroom.host``: host figures from fixture trees of real cgroup v1/v2 and
meminfo contents (see ``tests/_headroom.py``), rank division, the reserve, shared memory, and the
real reading of the machine the tests run on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from _headroom import FIXTURES, GiB, MiB, clear_rank_env

from stager.errors import StagerConfigError
from stager.headroom import host as hr_host
from stager.headroom import local_world_size, read_host


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_rank_env(monkeypatch)


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


def test_real_host_reading() -> None:
    r = read_host()
    assert r.available_bytes > 0
    assert r.source_path is not None and os.path.exists(r.source_path)
    assert r.source_path in r.source
    assert r.source_path == "/proc/meminfo" or r.source_path.startswith("/sys/fs/cgroup/")
