"""The device path: the copier's packed/direct and chunk-size decisions, the CPU path, and
``GraphStager``'s orchestration of device copies (launched on the staging thread, waited on before
the staged dict is handed out or its arena reused), with CUDA faked on the CPU."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from _helpers import assert_same
from _staging import (
    GPU0,
    install_fake_cuda,
    mixed_state_dict,
    plans_on_gpu0,
    regions,
)

from stager import GraphStager, StagerConfig, StageStats
from stager.device import DeviceCopier, combine_executor, use_triton
from stager.envs import Mode
from stager.plan import Plan
from stager.staged_set import StagedSet


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_cuda(monkeypatch)



def _host_chunks(slots: int, nbytes: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(nbytes, dtype=torch.uint8) for _ in range(slots))


def _fake_plan(sizes: list[int]) -> Any:
    class P:
        pass

    p = P()
    p.regions = regions(sizes, GPU0)  # type: ignore[attr-defined]
    return p


def test_copier_decides_packed_and_falls_back_to_direct_on_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StagerConfig.resolve(pack_threshold=1000, chunk_size=4096)
    copier = DeviceCopier(GPU0, cfg)
    allocated: list[tuple[int, int]] = []

    def alloc(slots: int, nbytes: int) -> tuple[torch.Tensor, ...]:
        allocated.append((slots, nbytes))
        return tuple(torch.empty(nbytes, dtype=torch.uint8) for _ in range(slots))

    monkeypatch.setattr(copier, "_allocate_chunks", alloc)
    stats = StageStats()
    plan = _fake_plan([100, 100, 100, 50_000])
    program = copier._program_for(plan, stats)
    assert copier.path == "packed" and program.packed_regions == (0, 1, 2)
    assert allocated == [(1, 612)]
    assert copier._program_for(plan, stats) is program  # once per plan
    assert allocated == [(1, 612)]  # chunks created once

    def oom(slots: int, nbytes: int) -> tuple[torch.Tensor, ...]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 KiB")

    monkeypatch.setattr(copier, "_allocate_chunks", oom)
    copier.close()
    stats = StageStats()
    program = copier._program_for(_fake_plan([100, 100, 100, 50_000]), stats)
    assert copier.path == "direct" and not program.packed and program.direct_regions == (0, 1, 2, 3)
    assert any("out of device memory" in n for n in stats.notes)


def test_copier_decision_hook_can_choose_direct_or_a_smaller_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StagerConfig.resolve(pack_threshold=1000, chunk_size=1 << 20)
    copier = DeviceCopier(GPU0, cfg)
    monkeypatch.setattr(copier, "_allocate_chunks", _host_chunks)
    monkeypatch.setattr(copier, "_decide_packing", lambda program: (False, 0, "no device headroom"))
    stats = StageStats()
    assert not copier._program_for(_fake_plan([100] * 8), stats).packed
    assert stats.notes == ["cuda:0: direct copies (no device headroom)"]
    copier.close()
    monkeypatch.setattr(copier, "_decide_packing", lambda program: (True, 512, "shrunk"))
    program = copier._program_for(_fake_plan([100] * 8), StageStats())
    assert program.chunk_size == 512 and len(program.packs) == 4


def test_copier_needs_an_indexed_cuda_device() -> None:
    with pytest.raises(ValueError, match="indexed CUDA device"):
        DeviceCopier(torch.device("cpu"), StagerConfig.resolve())


def test_executor_and_triton_labels() -> None:
    assert combine_executor("cpu", "eager") == "eager"
    assert combine_executor("graph-replay", "graph-capture") == "graph-capture"
    assert combine_executor("graph-replay", "eager") == "graph-replay"
    assert (use_triton(Mode.ON), use_triton(Mode.OFF), use_triton(Mode.AUTO)) == (True, False, None)




@pytest.fixture
def gated_device(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Plans whose regions count as on ``cuda:0``, and a device launch whose copy completes only
    when the test opens the gate (as if the caller's stream were still busy)."""
    import threading

    plans_on_gpu0(monkeypatch)

    class Gate:
        def __init__(self) -> None:
            self.open = threading.Event()
            self.launch_threads: list[threading.Thread] = []
            self.copied = 0

        def install(self, stager: GraphStager) -> None:
            gate = self

            class GatedEvent:
                def __init__(self, plan: Plan, staged_set: StagedSet, idx: list[int]) -> None:
                    self.args = (plan.src_views, staged_set, idx)  # as the copier keeps them

                def query(self) -> bool:
                    return gate.open.is_set()

                def synchronize(self) -> None:
                    if self.args is None:
                        return
                    assert gate.open.wait(10), "the gate was never opened"
                    src_views, staged_set, idx = self.args
                    for i in idx:
                        staged_set.bases[i].copy_(src_views[i])
                    gate.copied += 1
                    self.args = None

            def launch_devices(
                plan: Plan, staged_set: StagedSet, stats: StageStats, pending: Any, marks: Any
            ) -> None:
                gate.launch_threads.append(threading.current_thread())
                for idx in plan.device_regions.values():
                    pending.add(GatedEvent(plan, staged_set, idx), plan.src_views)
                stats.executor, stats.device_path = "graph-replay", "packed"

            stager._launch_devices = launch_devices  # type: ignore[method-assign]

    return Gate()


def test_async_device_stage_launches_on_the_staging_thread_and_resolves_after_the_copy(
    gated_device: Any,
) -> None:
    import threading
    import time

    sd = mixed_state_dict(5)
    with GraphStager(async_staging=True, cache_policy="cached", max_arenas=1) as stager:
        gated_device.install(stager)
        fut = stager.stage(sd)
        deadline = time.monotonic() + 10
        while not gated_device.launch_threads and time.monotonic() < deadline:
            time.sleep(0.001)
        threads = gated_device.launch_threads
        assert threads and threads[0] is not threading.current_thread()
        time.sleep(0.05)
        assert not fut.done()  # the copy has not completed: no result yet
        gated_device.open.set()
        out = fut.result(timeout=10)
        assert_same(sd, out)
        assert gated_device.copied == 1
        stats = stager.last_stats
        assert stats is not None and stats.executor == "graph-replay" and stats.device_path == "packed"
        assert stats.blocked_s < stats.complete_s
        del out, fut
        out = stager.stage(sd).result(timeout=10)  # the same arena again (lease released)
        assert stager.last_stats.arena == "cached"
        assert_same(sd, out)


def test_sync_device_stage_returns_after_the_copy(gated_device: Any) -> None:
    sd = mixed_state_dict(6)
    with GraphStager(cache_policy="cached") as stager:
        gated_device.install(stager)
        gated_device.open.set()
        out = stager.stage(sd)
        assert gated_device.copied == 1
        assert_same(sd, out)


def test_stage_nowait_returns_the_dict_with_the_device_copies_in_flight(gated_device: Any) -> None:
    sd = mixed_state_dict(7)
    with GraphStager(cache_policy="cached") as stager:
        gated_device.install(stager)
        staged, pending = stager.stage_nowait(sd)
        assert pending is not None and len(pending.events) == 1
        assert not pending.query() and gated_device.copied == 0
        gated_device.open.set()
        pending.wait()
        assert pending.query() and gated_device.copied == 1
        assert_same(sd, staged)


def test_an_arena_with_copies_in_flight_is_not_reused_even_once_its_dict_is_dropped(
    gated_device: Any,
) -> None:
    sd = mixed_state_dict(9)
    with GraphStager(cache_policy="cached", lease_policy="allocate", max_arenas=4) as stager:
        gated_device.install(stager)
        staged, pending = stager.stage_nowait(sd)
        first = stager._sets[0]
        del staged  # dropped before its device copies completed
        assert first.leased()  # the queued copies may still write into its arena
        sd["extra"] = torch.ones(3)  # a new plan, which would take free arenas as spares
        gated_device.open.set()
        out, pending2 = stager.stage_nowait(sd)
        assert first.arena not in [s.arena for s in stager._slots[0].sets]  # the new plan's
        pending.wait()
        pending2.wait()
        assert_same(sd, out)
        assert not first.leased()  # the copies completed: free again


def test_stage_nowait_on_the_cpu_has_nothing_in_flight() -> None:
    sd = mixed_state_dict(8)
    with GraphStager(cache_policy="cached") as stager:
        staged, pending = stager.stage_nowait(sd)
        assert pending is None
        assert_same(sd, staged)


def _device_reading(free: int) -> Any:
    from stager.headroom import DeviceReading

    return DeviceReading(index=0, free_bytes=free, source="test reading (injected)", nvml_free=free,
                         allocator_slack=0, total_bytes=None, physical="test")


@pytest.mark.parametrize(
    "free, path, chunk",
    [
        pytest.param(1 << 30, "packed", 1 << 22, id="room-configured-chunks"),
        pytest.param((2 << 20) + 4096, "packed", 1 << 20, id="tight-shrunk-chunks"),
        pytest.param(4096, "direct", None, id="full-gpu-direct"),
    ],
)
def test_device_headroom_chooses_packed_shrunk_or_direct(
    monkeypatch: pytest.MonkeyPatch, free: int, path: str, chunk: int | None
) -> None:
    import stager.headroom as headroom

    monkeypatch.setattr(headroom, "read_device", lambda device: _device_reading(free))
    cfg = StagerConfig.resolve(pack_threshold=1 << 20, chunk_size=1 << 22, device_reserve=0)
    copier = DeviceCopier(GPU0, cfg)
    monkeypatch.setattr(copier, "_allocate_chunks", _host_chunks)
    stats = StageStats()
    program = copier._program_for(_fake_plan([512 << 10] * 16), stats)
    assert copier.path == path
    if chunk is not None:
        assert program.chunk_size == chunk
    if path == "direct":
        assert any("test reading (injected)" in n for n in stats.notes)
