"""Pinning host arenas with ``cudaHostRegister``, with CUDA faked (runs on any machine).

The fake stands in for ``torch.cuda.cudart()`` (whose bindings return a ``cudaError`` code rather
than raising), the current device and the primary-context probe, so the tests check which device's
context registers and unregisters an arena, and what happens when either call fails.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import stager.arena as arena_module
from stager.arena import HostArena


class FakeCudart:
    """``torch.cuda.cudart()``: records every call with the device current at the time."""

    def __init__(self, devices: "FakeDevices", register: int = 0, unregister: int = 0) -> None:
        self.devices = devices
        self.register_code = register
        self.unregister_code = unregister
        self.calls: list[tuple[str, int, int]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.calls.append(("register", self.devices.current, flags))
        return self.register_code

    def cudaHostUnregister(self, ptr: int) -> int:
        self.calls.append(("unregister", self.devices.current, 0))
        return self.unregister_code

    def cudaError(self, code: int) -> int:
        return code

    def cudaGetErrorString(self, code: int) -> str:
        names = {2: "out of memory", 712: "part or all of the requested memory range is already mapped"}
        return names.get(code, "?")


class FakeDevices:
    def __init__(self, count: int, with_context: set[int], current: int = 0) -> None:
        self.count = count
        self.with_context = with_context
        self.current = current

    @contextlib.contextmanager
    def device(self, index: int) -> Iterator[None]:
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(
        count: int = 2, with_context: set[int] | None = None, current: int = 0, **codes: int
    ) -> FakeCudart:
        devices = FakeDevices(count, {current} if with_context is None else with_context, current)
        cudart = FakeCudart(devices, **codes)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
        monkeypatch.setattr(torch.cuda, "device", devices.device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: devices.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices.count)

        def has_context(i: int) -> bool:
            return i in devices.with_context

        monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", has_context, raising=False)
        consumed: list[int] = []
        monkeypatch.setattr(arena_module, "_consume_cuda_error", consumed.append)
        cudart.consumed = consumed  # type: ignore[attr-defined]
        return cudart

    return install


def test_registration_uses_a_device_that_already_has_a_context_and_unregisters_there(fake_cuda: Any) -> None:
    # The process works on cuda:1 and never called set_device: registering in cuda:0's context
    # would create a context there.
    cudart = fake_cuda(count=2, with_context={1}, current=0)
    arena = HostArena(1 << 16, pinned=True)
    assert arena.device == 1
    assert cudart.calls == [("register", 1, 1)]  # flags: cudaHostRegisterPortable
    cudart.devices.current = 0
    del arena
    assert cudart.calls[-1] == ("unregister", 1, 0)
    assert cudart.consumed == []


def test_registration_stays_on_the_current_device_when_it_has_a_context(fake_cuda: Any) -> None:
    cudart = fake_cuda(count=4, with_context={0, 2}, current=2)
    arena = HostArena(4096, pinned=True)
    assert arena.device == 2 and cudart.calls == [("register", 2, 1)]


def test_a_failed_registration_names_the_error_clears_it_and_leaves_nothing_behind(
    fake_cuda: Any, tmp_path: Path
) -> None:
    cudart = fake_cuda(register=2)
    with pytest.raises(RuntimeError, match=r"CUDA error 2 \(out of memory\).*STAGER_PINNED=off"):
        HostArena(1 << 20, pinned=True, shared=True, shm_dir=str(tmp_path))
    assert cudart.consumed == [0]  # the runtime's last error does not leak into the next kernel launch
    assert list(tmp_path.iterdir()) == []  # the /dev/shm-style file is gone
    assert ("unregister", 0, 0) not in cudart.calls


def test_a_failed_unregistration_keeps_the_memory_mapped(
    fake_cuda: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cudart = fake_cuda(unregister=1)
    kept: list[mmap.mmap] = []
    monkeypatch.setattr(arena_module, "_KEPT_MAPPINGS", kept)
    fd = os.open(tmp_path / "segment", os.O_CREAT | os.O_RDWR)
    os.ftruncate(fd, mmap.PAGESIZE)
    mm = mmap.mmap(fd, mmap.PAGESIZE)
    os.close(fd)
    arena_module._release(mm, 12345, mmap.PAGESIZE, True, str(tmp_path / "segment"), 1)
    assert cudart.calls == [("unregister", 1, 0)] and cudart.consumed == [1]
    # Still registered with CUDA: unmapping would let a new mapping reuse the range.
    assert kept == [mm] and not mm.closed
    assert not (tmp_path / "segment").exists()
    mm.close()


def test_consuming_the_cuda_error_never_raises() -> None:
    arena_module._consume_cuda_error(0)  # no GPU here: the launch raises and is swallowed
