"""Tests of ``stager.headroom.device``: device and link readings through a fake NVML, the PCIe
link arithmetic, one whole reading, and (under the ``cuda`` marker) NVML against
``torch.cuda.mem_get_info``."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from _headroom import FIXTURES, MIGS, UUIDS, FakeNvmlFull, MiB, clear_rank_env

from stager import headroom as hr
from stager.headroom import LinkInfo, nvml_device_handle, pcie_bytes_per_s, read_device, read_headroom
from stager.headroom import nvml as hr_nvml


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_rank_env(monkeypatch)


@pytest.fixture
def fresh_nvml_state() -> Any:
    hr_nvml._NVML.reset()
    yield hr_nvml._NVML
    hr_nvml._NVML.reset()


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


def test_read_headroom_discovers_the_cgroup_layout_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from stager.headroom import host

    read_headroom()  # discover and cache the layout
    calls: list[str] = []
    monkeypatch.setattr(host, "_discover_cgroup", lambda root: calls.append(root))
    for _ in range(3):
        assert read_headroom() is not None
    assert calls == []  # later readings only read the memory files of the cached layout


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
