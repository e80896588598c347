"""Capture once, replay every checkpoint: the capture decision (keys, re-capture) and the copier's
launch path through the graph executor, with CUDA faked on the CPU (see ``tests/_staging.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _helpers import POISON, assert_same
from _staging import (
    CPU,
    GPU0,
    FakeGraph,
    FakeStream,
    KiB,
    chunks_for,
    cpu_copier,
    install_fake_cuda,
    issue_or_capture,
    mixed_state_dict,
    pinned_set,
    plan_of,
    plans_on_gpu0,
    raw,
)

from stager import GraphStager, StageStats
from stager.arena import HostArena
from stager.device import DeviceCopier, PendingCopy
from stager.graphs import (
    Action,
    CaptureKey,
    CaptureTracker,
    GraphState,
    bind_program,
    build_program,
    capture_key,
)
from stager.graphs import cuda_graph as _cuda_graph_module
from stager.plan import Plan
from stager.staged_set import StagedSet
from stager.tree import rebuild


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_cuda(monkeypatch)



def _key(**kw: Any) -> CaptureKey:
    base = dict(program=("cuda:0", 2, 1024, ()), arena=0x1000, chunks=(0x2000, 0x3000))
    base.update(kw)
    return CaptureKey(**base)  # type: ignore[arg-type]


def test_tracker_captures_once_then_replays() -> None:
    t = CaptureTracker()
    assert t.state is GraphState.EMPTY
    k = _key()
    assert t.decide(k) is Action.CAPTURE
    t.captured(k)
    for _ in range(5):
        assert t.decide(_key()) is Action.REPLAY  # an equal key, not the same object
        t.replayed()
    assert (t.captures, t.replays, t.state) == (1, 5, GraphState.CAPTURED)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"arena": 0x9000}, id="another-arena"),
        pytest.param({"chunks": (0x2000, 0x4000)}, id="new-chunks"),
        pytest.param({"program": ("cuda:0", 2, 2048, ())}, id="another-program"),
    ],
)
def test_tracker_refuses_to_replay_graphs_captured_for_other_memory(change: dict[str, Any]) -> None:
    # An executor serves one binding: new memory gets a new executor, never a replay of old graphs.
    t = CaptureTracker()
    t.captured(_key())
    with pytest.raises(RuntimeError, match="cannot be replayed"):
        t.decide(_key(**change))
    assert t.decide(_key()) is Action.REPLAY


def test_tracker_runs_eagerly_after_a_failed_capture() -> None:
    t = CaptureTracker()
    t.failed("RuntimeError: operation not permitted when stream is capturing")
    assert t.state is GraphState.FAILED and "not permitted" in (t.failure or "")
    for k in (_key(), _key(arena=1)):
        assert t.decide(k) is Action.EAGER
        t.ran_eager()
    assert (t.captures, t.replays, t.eager_runs) == (0, 0, 2)


def test_capture_key_names_program_arena_andchunks_for() -> None:
    plan, _, _ = plan_of({"a": raw(10, 0), "b": raw(10, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    arenas = [HostArena(plan.arena_bytes).tensor for _ in range(2)]
    chunks = chunks_for(program)
    keys = [capture_key(bind_program(program, plan.src_views, a, chunks, use_triton=False)) for a in arenas]
    assert keys[0].program == program.key
    assert keys[0].chunks == (chunks[0].data_ptr(),)
    assert keys[0].arena != keys[1].arena and keys[0] != keys[1]  # each arena has its own graph


def _move_source(plan: Plan, i: int, view: torch.Tensor) -> None:
    """Region ``i``'s source now lives in ``view``, as a plan built after a move would record it
    (the stager's plan check is what finds a move; the copier keys graphs by ``plan.src_ptrs``)."""
    plan.src_views[i] = view
    plan.src_ptrs[i] = view.data_ptr()


def _launch(copier: DeviceCopier, plan: Plan, staged_set: StagedSet) -> StageStats:
    stats = StageStats()
    caller = FakeStream()
    copier.launch(plan, staged_set, caller, stats).wait()
    assert copier.stream.waited[-1] is caller  # the side stream waited for the caller's stream
    return stats


def test_launch_captures_once_then_replays_and_stays_bit_exact(fake_cuda: None) -> None:
    sd = mixed_state_dict(4)
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier()
    staged_set = pinned_set(plan)
    stats = _launch(copier, plan, staged_set)
    assert (stats.executor, stats.device_path) == ("graph-capture", "packed")
    assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))  # the warm-up copied
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].replays == 0
    for step in range(3):
        for t in sd.values():
            t.add_(1)  # in place: the graph stays valid and sees the new values
        stats = _launch(copier, plan, staged_set)
        assert stats.executor == "graph-replay"
        assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
    assert (copier.captures, copier.replays) == (1, 3)
    assert FakeGraph.made[0].replays == 3


def test_a_source_freed_and_replaced_is_replanned_and_recaptured_through_the_stager(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP-style: the storage behind t3 is freed (resize_(0)) and a new tensor for t3 may take
    # its old address (tests/test_pipeline.py covers that case on its own). The stager plans again
    # and the copier captures a graph over the new sources, then replays it.
    import stager.pipeline as stager_module

    class Registered(HostArena):  # as if registered with CUDA: graphs are allowed
        def __init__(self, nbytes: int, **kw: Any) -> None:
            super().__init__(nbytes, **{**kw, "pinned": False})
            self.pinned = True

    plans_on_gpu0(monkeypatch)
    monkeypatch.setattr(stager_module, "HostArena", Registered)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    sd: dict[str, torch.Tensor] = {f"t{i}": raw(300 + i, i) for i in range(8)}
    sd["t3"] = torch.randn(4096)
    config = dict(cache_policy="cached", max_arenas=1, pack_threshold=8 * KiB, chunk_size=1 << 20)
    with GraphStager(**config) as stager:
        copier = stager._copiers[GPU0] = cpu_copier()
        for _ in range(2):
            assert_same(sd, stager.stage(sd))
        assert (copier.captures, copier.replays, stager.plans_built) == (1, 1, 1)
        old_address = sd["t3"].data_ptr()
        sd["t3"].untyped_storage().resize_(0)
        sd["t3"] = torch.randn(4096)  # may be at the old address
        out = stager.stage(sd)
        assert_same(sd, out)
        assert stager.plans_built == 2 and copier.captures == 2
        assert stager.last_stats.executor == "graph-capture"
        if sd["t3"].data_ptr() == old_address:
            # Same signature as planned: only the check of the planned storages caught it.
            assert stager.last_stats.replanned
        del out
        sd["t3"].add_(1)
        assert_same(sd, stager.stage(sd))
        assert stager.last_stats.executor == "graph-replay"


def test_each_cached_arena_gets_its_own_graph_and_fresh_ones_run_eagerly(fake_cuda: None) -> None:
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier()
    a, b = pinned_set(plan), pinned_set(plan)
    assert _launch(copier, plan, a).executor == "graph-capture"
    assert _launch(copier, plan, b).executor == "graph-capture"
    assert _launch(copier, plan, a).executor == "graph-replay"
    assert _launch(copier, plan, b).executor == "graph-replay"
    assert (copier.captures, copier.replays) == (2, 2)
    fresh = pinned_set(plan, cached=False)
    assert _launch(copier, plan, fresh).executor == "eager"
    assert_same(sd, rebuild(plan.tokens, fresh.tensors, tensors, others))
    unpinned = pinned_set(plan)
    unpinned.arena.pinned = False
    assert _launch(copier, plan, unpinned).executor == "eager"
    assert_same(sd, rebuild(plan.tokens, unpinned.tensors, tensors, others))


@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_launch_in_pieces_replays_one_graph_per_piece(fake_cuda: None, pieces: int) -> None:
    sd = {f"s{i}": raw(100 + i, i) for i in range(12)}
    sd.update({f"big{i}": raw(20 * KiB, 50 + i) for i in range(3)})
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier(replay_pieces=pieces)
    staged_set = pinned_set(plan)
    _launch(copier, plan, staged_set)
    for t in sd.values():
        t.add_(3)
    _launch(copier, plan, staged_set)
    assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
    assert len(FakeGraph.made) == len(copier.program.pieces(pieces))  # type: ignore[union-attr]
    assert all(g.replays == 1 for g in FakeGraph.made)


def test_a_failed_capture_runs_eagerly_and_warns_once(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    def refuse(self: FakeGraph) -> None:
        FakeGraph.capturing = None
        raise RuntimeError("operation not permitted when stream is capturing (fake)")

    monkeypatch.setattr(FakeGraph, "capture_end", refuse)
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier()
    staged_set = pinned_set(plan)
    with caplog.at_level(logging.WARNING, logger="stager"):
        for _ in range(3):
            stats = _launch(copier, plan, staged_set)
            assert stats.executor == "eager" and any("capture failed" in n for n in stats.notes)
            assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
            for t in sd.values():
                t.add_(1)
    assert copier.captures == 0
    assert len([r for r in caplog.records if "(fake)" in r.getMessage()]) == 1


def test_a_launch_that_fails_midway_still_hands_back_an_event_covering_what_was_queued(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stager.kernels.pack as pack_module

    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    sd["big"] = raw(20 * KiB, 99)
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier()
    fresh = pinned_set(plan, cached=False)  # eager path

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("pack launch failed (injected)")

    monkeypatch.setattr(pack_module, "pack_gather", broken)
    pending = PendingCopy()
    with pytest.raises(RuntimeError, match="injected"):
        copier.launch(plan, fresh, FakeStream(), StageStats(), pending)
    # The caller waits on this before releasing the arena; it holds the sources until then.
    (event,) = pending.events
    assert event.recorded
    assert any(k is plan.src_views for keep in pending._keep for k in keep)
    pending.wait()
    assert not pending._keep


def test_a_warm_up_that_fails_leaves_no_stale_capture_to_replay(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, tensors, others = plan_of(sd)
    copier = cpu_copier()
    staged_set = pinned_set(plan)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("warm-up failed (injected)")

    monkeypatch.setattr(_cuda_graph_module, "issue_ops", fail)
    with pytest.raises(RuntimeError, match="injected"):
        copier.launch(plan, staged_set, FakeStream(), StageStats()).wait()
    monkeypatch.setattr(_cuda_graph_module, "issue_ops", issue_or_capture)
    for t in sd.values():
        t.add_(1)
    staged_set.arena.tensor.fill_(POISON)
    # Nothing was captured: this run warms up and captures (a replay would copy nothing).
    assert _launch(copier, plan, staged_set).executor == "graph-capture"
    assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))


def test_capture_runs_with_the_garbage_collector_paused(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    seen: list[bool] = []
    real_begin = FakeGraph.capture_begin

    def begin(self: FakeGraph, capture_error_mode: str = "global") -> None:
        seen.append(gc.isenabled())
        real_begin(self, capture_error_mode)

    monkeypatch.setattr(FakeGraph, "capture_begin", begin)
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, _, _ = plan_of(sd)
    assert gc.isenabled()
    _launch(cpu_copier(), plan, pinned_set(plan))
    assert seen == [False]
    assert gc.isenabled()
