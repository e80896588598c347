"""Tests of ``stager.headroom.readings``: what each reading tells ``doctor``, and that readings
are frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from _headroom import FIXTURES, clear_rank_env, host_reading

from stager.headroom import LinkInfo, pcie_bytes_per_s, read_headroom, read_host


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_rank_env(monkeypatch)


def test_host_describe_lists_every_input(tmp_path: Path) -> None:
    lines = read_host(root=FIXTURES / "v2_pod", shared_memory=True, shm_path=tmp_path).describe()
    text = "\n".join(lines)
    assert lines[0].startswith("host: ") and "available to this rank (bound by " in lines[0]
    for word in ("meminfo:", "cgroup:", "ranks per host:", "STAGER_HOST_RESERVE", "shared memory:"):
        assert word in text


def test_link_fraction_and_describe() -> None:
    link = LinkInfo(gen=5, width=16, bytes_per_s=pcie_bytes_per_s(5, 16), curr_gen=1, curr_width=16)
    assert link.fraction(link.bytes_per_s / 2) == pytest.approx(0.5)
    assert link.curr_bytes_per_s == pytest.approx(pcie_bytes_per_s(1, 16))
    assert link.describe() == ["link: PCIe gen5 x16, 63.02 GB/s per direction (running now at gen1 x16)"]


def test_readings_are_frozen() -> None:
    r = host_reading(100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.available_bytes = 0  # type: ignore[misc]


def test_headroom_describe_host_only() -> None:
    lines = read_headroom(root=FIXTURES / "v1_docker").describe()
    assert lines[0].startswith("host: 2.50 GiB available to this rank")
