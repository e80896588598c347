"""Tests of ``stager.headroom.nvml``: the ``CUDA_VISIBLE_DEVICES`` mapping and NVML handles
against a fake NVML, NVML initialised lazily and once with a remembered failure, and the real NVML
of the machine the tests run on."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from _headroom import FIXTURES, MIGS, UUIDS, FakeNvml

from stager import headroom as hr
from stager.headroom import nvml as hr_nvml
from stager.headroom import nvml_device_handle, parse_visible_devices, read_device, read_headroom


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
        pytest.param(
            "MIG-5c1d3b1e-0f2a-5e59-8f1c-3a7c2d9b1e44", ["MIG-5c1d3b1e-0f2a-5e59-8f1c-3a7c2d9b1e44"], id="mig"
        ),
        pytest.param("GPU-a,GPU-a", [], id="repeat-uuid"),
    ],
)
def test_parse_visible_devices(value: str | None, expected: list[Any] | None) -> None:
    assert parse_visible_devices(value) == expected


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
        pytest.param(
            "1,0", 2, r"cuda:2 is not visible: CUDA_VISIBLE_DEVICES='1,0' makes 2", id="beyond-list"
        ),
        pytest.param("", 0, r"cuda:0 is not visible", id="empty"),
    ],
)
def test_nvml_handle_mapping_errors(visible: str, index: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nvml_device_handle(index, nvml=FakeNvml(UUIDS, MIGS), visible_devices=visible)


def test_negative_index_rejected() -> None:
    with pytest.raises(ValueError, match="device index must be >= 0, got -1"):
        nvml_device_handle(-1, nvml=FakeNvml(UUIDS), visible_devices=None)


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
