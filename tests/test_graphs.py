"""Staging programs on the CPU: building, describing, slicing, running eagerly, and the capture
decision (keys, fingerprints, re-capture) without CUDA.

Programs here are built for ``cpu`` from plans of CPU tensors and run by the eager executor,
packing with the plain-torch reference and with the Triton kernel under the interpreter
(``TRITON_INTERPRET=1``, set by conftest). Bytes are compared with ``torch.equal``; the arena is
poisoned first.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from stager import GraphStager, StagerConfig, StageStats
from stager.arena import HostArena, StagedSet
from stager.device import DeviceCopier, PendingCopy, combine_executor, use_triton
from stager.envs import Mode
from stager.graphs import (
    MIN_RUN,
    Action,
    CaptureKey,
    CaptureTracker,
    ChunkCopyOp,
    DirectCopyOp,
    GraphState,
    PackOp,
    RecordEventOp,
    bind_program,
    build_program,
    capture_key,
    run_eager,
)
from stager.plan import Plan, Region, build_plan
from stager.tree import rebuild, walk

KiB = 1 << 10
POISON = 0xA5
CPU = torch.device("cpu")
GPU0 = torch.device("cuda", 0)


def plan_of(sd: Any, alignment: int = 256) -> tuple[Plan, list[torch.Tensor], list[Any]]:
    tokens: list[tuple] = []
    tensors: list[torch.Tensor] = []
    others: list[Any] = []
    paths: list[str] = []
    walk(sd, tokens, tensors, others, paths)
    return build_plan(tokens, tensors, paths, alignment=alignment), tensors, others


def raw(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def regions(sizes: list[int], device: torch.device | list[torch.device] = CPU, align: int = 256) -> list[Region]:
    """Regions back to back as a plan lays them out (each at a multiple of ``align``)."""
    out, offset = [], 0
    devices = device if isinstance(device, list) else [device] * len(sizes)
    for i, (n, d) in enumerate(zip(sizes, devices)):
        out.append(Region(index=i, device=d, nbytes=n, arena_offset=offset, src_offset=0))
        offset = (offset + n + align - 1) // align * align
    return out


def kinds(program: Any) -> list[str]:
    return [op.kind for op in program.ops]


# ------------------------------------------------------------------------------ building


def test_small_regions_pack_into_one_run_large_ones_go_direct() -> None:
    rs = regions([100, 300, 5000, 64 * KiB, 10, 20, 30])
    p = build_program(rs, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20)
    assert kinds(p) == ["pack", "copy-chunk", "copy-direct", "pack", "copy-chunk", "record"]
    first, copy0, direct, second = p.ops[0], p.ops[1], p.ops[2], p.ops[3]
    assert isinstance(first, PackOp) and first.regions == (0, 1, 2)
    # offsets mirror the arena layout inside the run (alignment padding included)
    assert first.offsets == (0, 256, 768) and first.sizes == (100, 300, 5000)
    assert isinstance(copy0, ChunkCopyOp) and copy0.arena_offset == 0 and copy0.nbytes == 768 + 5000
    assert isinstance(direct, DirectCopyOp) and direct.region == 3 and direct.nbytes == 64 * KiB
    assert isinstance(second, PackOp) and second.regions == (4, 5, 6) and second.slot == 1  # the ring
    assert isinstance(p.ops[-1], RecordEventOp) and p.ops[-1].name == "done"
    assert p.packed_regions == (0, 1, 2, 4, 5, 6) and p.direct_regions == (3,)
    assert p.slots == 2 and p.chunk_bytes == 768 + 5000
    assert p.span_bytes == 768 + 5000 + 256 * 2 + 30 and p.device_bytes == 2 * (768 + 5000)
    assert p.nbytes == sum(r.nbytes for r in rs)
    assert p.packed


@pytest.mark.parametrize(
    "threshold, packed",
    [
        pytest.param(0, (), id="threshold-0-nothing-packed"),
        pytest.param(100, (), id="equal-to-threshold-is-direct"),
        pytest.param(101, (0, 1, 2), id="just-above"),
        pytest.param(1 << 30, (0, 1, 2), id="everything-small"),
    ],
)
def test_packed_direct_split_follows_the_threshold(threshold: int, packed: tuple[int, ...]) -> None:
    p = build_program(regions([100, 100, 100]), CPU, pack_threshold=threshold, chunk_size=1 << 20)
    assert p.packed_regions == packed
    assert sorted(p.packed_regions + p.direct_regions) == [0, 1, 2]


def test_a_lone_small_region_is_copied_directly() -> None:
    assert MIN_RUN == 2
    # small, large, small, large: no two small regions are adjacent in the arena
    p = build_program(regions([10, 5000, 10, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert kinds(p) == ["copy-direct"] * 4 + ["record"]
    assert not p.packed and p.slots == 0 and p.chunk_bytes == 0 and p.device_bytes == 0


def test_runs_are_cut_at_the_chunk_size_and_cycle_through_the_slots() -> None:
    rs = regions([200] * 10)  # one every 256 bytes
    p = build_program(rs, CPU, pack_threshold=1000, chunk_size=1024, slots=2)
    packs = [op for op in p.ops if isinstance(op, PackOp)]
    assert [op.regions for op in packs] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [op.slot for op in packs] == [0, 1, 0]
    assert p.chunk_bytes == 3 * 256 + 200 <= 1024
    copies = [op for op in p.ops if isinstance(op, ChunkCopyOp)]
    assert [(c.arena_offset, c.nbytes) for c in copies] == [(0, 968), (1024, 968), (2048, 456)]


def test_a_region_larger_than_a_chunk_is_direct_even_below_the_threshold() -> None:
    p = build_program(regions([100, 4096, 100]), CPU, pack_threshold=1 << 20, chunk_size=1024)
    assert p.direct_regions == (0, 1, 2)


def test_regions_of_other_devices_end_a_run_and_are_skipped() -> None:
    devs = [GPU0, GPU0, CPU, GPU0, GPU0, torch.device("cuda", 1), GPU0]
    rs = regions([10] * 7, devs)
    p = build_program(rs, GPU0, pack_threshold=1000, chunk_size=1 << 20)
    assert p.regions == (0, 1, 3, 4, 6)
    assert [op.regions for op in p.packs] == [(0, 1), (3, 4)]
    assert p.direct_regions == (6,)
    # no chunk copy covers the arena bytes of region 2 (CPU) or 5 (another device)
    for c in (op for op in p.ops if isinstance(op, ChunkCopyOp)):
        for other in (rs[2], rs[5]):
            assert c.arena_offset + c.nbytes <= other.arena_offset or other.arena_offset + other.nbytes <= c.arena_offset


def test_runs_follow_arena_order_not_region_index() -> None:
    # A plan that lays small regions first (index order differs from arena order).
    rs = [
        Region(index=0, device=CPU, nbytes=5000, arena_offset=512, src_offset=0),
        Region(index=1, device=CPU, nbytes=100, arena_offset=0, src_offset=0),
        Region(index=2, device=CPU, nbytes=100, arena_offset=256, src_offset=0),
    ]
    p = build_program(rs, CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert kinds(p) == ["pack", "copy-chunk", "copy-direct", "record"]
    assert p.packs[0].regions == (1, 2) and p.direct_regions == (0,)


def test_pack_false_copies_everything_directly() -> None:
    p = build_program(regions([10, 20, 30]), CPU, pack_threshold=1000, chunk_size=1 << 20, pack=False)
    assert p.direct_regions == (0, 1, 2) and not p.packed


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        build_program(regions([10]), CPU, pack_threshold=1, chunk_size=0)
    with pytest.raises(ValueError, match="slots"):
        build_program(regions([10]), CPU, pack_threshold=1, chunk_size=1, slots=0)


def test_programs_are_immutable_and_compare_by_structure() -> None:
    a = build_program(regions([10, 20, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    b = build_program(regions([10, 20, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    c = build_program(regions([10, 21, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert a != c
    with pytest.raises(AttributeError):
        a.ops = ()  # type: ignore[misc]
    assert isinstance(a.ops, tuple)


def test_describe_lists_every_op() -> None:
    p = build_program(regions([100, 300, 64 * KiB]), CPU, pack_threshold=8 * KiB, chunk_size=1 << 20)
    text = p.describe()
    lines = text.splitlines()
    assert len(lines) == 1 + len(p.ops)
    assert "staging program on cpu" in lines[0]
    assert "2 regions" in lines[0] and "1 runs" in lines[0] and "1 regions (64.00 KiB) copied directly" in lines[0]
    assert "pack" in lines[1] and "regions [0..1]" in lines[1]
    assert "copy-chunk" in lines[2] and "arena[0:556]" in lines[2]
    assert "copy-direct" in lines[3] and "region 2" in lines[3]
    assert "record" in lines[4] and "'done'" in lines[4]
    assert "Program(" in repr(p)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 100])
def test_pieces_cover_the_ops_in_order_and_keep_packs_with_their_copies(n: int) -> None:
    sizes = [100, 100, 4000, 100, 100, 100, 4000, 4000, 100, 100]
    p = build_program(regions(sizes), CPU, pack_threshold=1000, chunk_size=1 << 20)
    pieces = p.pieces(n)
    assert 1 <= len(pieces) <= n
    assert [i for r in pieces for i in r] == list(range(len(p.ops)))
    for r in pieces:
        assert len(r) > 0
        first = p.ops[r.start]
        assert not isinstance(first, (ChunkCopyOp, RecordEventOp)) or r.start == 0
    assert isinstance(p.ops[pieces[-1][-1]], RecordEventOp)
    with pytest.raises(ValueError):
        p.pieces(0)


def test_pieces_balance_bytes() -> None:
    p = build_program(regions([1000] * 8), CPU, pack_threshold=100, chunk_size=1 << 20)  # 8 direct
    pieces = p.pieces(4)
    assert [len(r) for r in pieces] == [2, 2, 2, 3]  # the record op rides with the last copy


# ------------------------------------------------------------------------------ eager runs


def _state_dict(seed: int) -> dict[str, Any]:
    """Small and large tensors, odd sizes and offsets, a view and a tied pair."""
    rng = random.Random(seed)
    sd: dict[str, Any] = {}
    for i in range(24):
        n = rng.choice([1, 3, 17, 64, 255, 1000, 4097])
        sd[f"small{i}"] = raw(n, seed * 100 + i)
        if i % 7 == 3:
            sd[f"large{i}"] = raw(40 * KiB + rng.randint(0, 99), seed * 100 + 50 + i).view(-1)
    base = raw(6000, seed + 7)
    sd["view"] = base[13:2013]  # odd start in its storage
    sd["view2"] = base[3000:3100]
    sd["tied_a"] = sd["small0"]
    sd["f32"] = torch.randn(33, generator=torch.Generator().manual_seed(seed))
    return sd


def _chunks(program: Any, nbytes: int | None = None) -> list[torch.Tensor]:
    n = program.chunk_bytes if nbytes is None else nbytes
    return [torch.full((n,), POISON, dtype=torch.uint8) for _ in range(max(program.slots, 1))]


def _stage_eager(sd: Any, use_triton_: bool | None, *, threshold: int = 8 * KiB, chunk: int = 1 << 20) -> tuple[Any, Any]:
    plan, tensors, others = plan_of(sd)
    program = build_program(plan.regions, CPU, pack_threshold=threshold, chunk_size=chunk)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    staged_set.arena.tensor.fill_(POISON)
    bindings = bind_program(program, plan.src_views, staged_set.arena.tensor, _chunks(program), use_triton=use_triton_)
    run_eager(bindings)
    return rebuild(plan.tokens, staged_set.tensors, tensors, others), program


def _assert_same(src: dict[str, Any], out: dict[str, Any]) -> None:
    assert list(out) == list(src)
    for k, t in src.items():
        o = out[k]
        assert o.device.type == "cpu" and o.dtype == t.dtype and o.shape == t.shape and o.stride() == t.stride(), k
        assert torch.equal(o.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), k


def _interpreter_on() -> bool:
    from stager.kernels import kernel_backend

    return kernel_backend("cpu") == "triton-interpreter"


@pytest.mark.parametrize(
    "use_triton_",
    [pytest.param(False, id="reference"), pytest.param(True, id="triton-interpreter")],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_eager_program_stages_bit_exactly(use_triton_: bool, seed: int) -> None:
    if use_triton_ and not _interpreter_on():
        # conftest sets TRITON_INTERPRET=1 only where there is no GPU
        pytest.skip("TRITON_INTERPRET is off (a GPU is present); the cuda tests run the kernel")
    sd = _state_dict(seed)
    out, program = _stage_eager(sd, use_triton_)
    assert program.packed and program.directs  # both paths exercised
    _assert_same(sd, out)
    assert out["tied_a"].untyped_storage().data_ptr() == out["small0"].untyped_storage().data_ptr()


def test_eager_program_stages_bit_exactly_in_many_small_chunks() -> None:
    sd = {f"t{i}": raw(97 + i, i) for i in range(40)}
    out, program = _stage_eager(sd, False, threshold=1 << 20, chunk=1024)
    assert len(program.packs) > 4 and program.slots == 2
    _assert_same(sd, out)


def test_eager_program_sees_in_place_updates_through_the_same_bindings() -> None:
    sd = {f"t{i}": raw(50, i) for i in range(6)}
    plan, tensors, others = plan_of(sd)
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    bindings = bind_program(program, plan.src_views, staged_set.arena.tensor, _chunks(program), use_triton=False)
    run_eager(bindings)
    for t in sd.values():
        t.add_(1)
    run_eager(bindings)
    _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))


def test_the_done_event_is_recorded_once_after_the_program() -> None:
    class Event:
        recorded = 0

        def record(self) -> None:
            self.recorded += 1

    plan, _, _ = plan_of({"a": raw(10, 0), "b": raw(10, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    bindings = bind_program(program, plan.src_views, staged_set.arena.tensor, _chunks(program), use_triton=False)
    ev = Event()
    run_eager(bindings, done=ev)
    run_eager(bindings)  # no event given: none recorded
    assert ev.recorded == 1


def test_bind_rejects_small_chunks_and_wrong_sources() -> None:
    plan, _, _ = plan_of({"a": raw(100, 0), "b": raw(100, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    arena = HostArena(plan.arena_bytes).tensor
    with pytest.raises(ValueError, match="chunk 0"):
        bind_program(program, plan.src_views, arena, _chunks(program, program.chunk_bytes - 1))
    with pytest.raises(ValueError, match="needs 1 chunk"):
        bind_program(program, plan.src_views, arena, [])
    with pytest.raises(ValueError, match="source of region 1"):
        bind_program(program, [plan.src_views[0], plan.src_views[1][:5]], arena, _chunks(program))
    with pytest.raises(ValueError, match="too small"):
        bind_program(program, plan.src_views, arena[:10], _chunks(program))


# ------------------------------------------------------------------------------ capture decisions


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


def test_capture_key_names_program_arena_and_chunks() -> None:
    plan, _, _ = plan_of({"a": raw(10, 0), "b": raw(10, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    arenas = [HostArena(plan.arena_bytes).tensor for _ in range(2)]
    chunks = _chunks(program)
    keys = [capture_key(bind_program(program, plan.src_views, a, chunks, use_triton=False)) for a in arenas]
    assert keys[0].program == program.key
    assert keys[0].chunks == (chunks[0].data_ptr(),)
    assert keys[0].arena != keys[1].arena and keys[0] != keys[1]  # each arena has its own graph


# ------------------------------------------------------------------------------ the device copier


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
    monkeypatch.setattr(copier, "_allocate_chunks", lambda s, n: tuple(torch.empty(n, dtype=torch.uint8) for _ in range(s)))
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


# ------------------------------------------------------------------------------ the CPU path


def test_cpu_state_dict_takes_the_cpu_path() -> None:
    sd = _state_dict(3)
    with GraphStager(cache_policy="cached") as stager:
        out = stager.stage(sd)
        stats = stager.last_stats
    _assert_same(sd, out)
    assert stats is not None
    assert (stats.device_path, stats.executor, stats.captures, stats.replays) == ("cpu", "cpu", 0, 0)


# ------------------------------------------------------------------------------ the launch path, with CUDA faked
#
# The copier's launch path and the graph executor run here against stand-ins for streams, events
# and CUDAGraph, on CPU tensors. The fake graph behaves as a real one does: capturing issues
# nothing, and a replay re-issues the ops with the memory bound *at capture time* -- so a replay
# after a source moved would copy the stale source, which is what the fingerprint prevents.


class FakeStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.waited: list[Any] = []

    def wait_stream(self, other: Any) -> None:
        self.waited.append(other)


class FakeEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded = 0

    def record(self, stream: Any = None) -> None:
        self.recorded += 1

    def query(self) -> bool:
        return self.recorded > 0

    def synchronize(self) -> None:
        assert self.recorded, "waiting on an event that was never recorded"


class FakeGraph:
    capturing: "FakeGraph | None" = None
    made: list["FakeGraph"] = []

    def __init__(self) -> None:
        self.issued: list[tuple[Any, range | None]] = []
        self.replays = 0
        FakeGraph.made.append(self)

    def capture_begin(self, capture_error_mode: str = "global") -> None:
        assert capture_error_mode == "thread_local"
        FakeGraph.capturing = self

    def capture_end(self) -> None:
        FakeGraph.capturing = None

    def replay(self) -> None:
        self.replays += 1
        for bindings, ops in self.issued:
            _real_issue_ops(bindings, ops)


from stager.graphs import cuda_graph as _cuda_graph_module  # noqa: E402

_real_issue_ops = _cuda_graph_module.issue_ops


def _issue_or_capture(bindings: Any, ops: range | None = None, **kw: Any) -> None:
    if FakeGraph.capturing is not None:
        FakeGraph.capturing.issued.append((bindings, ops))
        return
    _real_issue_ops(bindings, ops, **kw)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    FakeGraph.made = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "stream", lambda s=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda i=None: contextlib.nullcontext())
    monkeypatch.setattr(_cuda_graph_module, "issue_ops", _issue_or_capture)


def _cpu_copier(**overrides: Any) -> DeviceCopier:
    cfg = StagerConfig.resolve(**{"pack_threshold": 8 * KiB, "chunk_size": 1 << 20, **overrides})
    copier = DeviceCopier(GPU0, cfg)
    copier.device = CPU  # the fake: a "device" whose tensors are CPU tensors
    copier._allocate_chunks = lambda s, n: tuple(torch.empty(n, dtype=torch.uint8) for _ in range(s))  # type: ignore[method-assign]
    return copier


def _pinned_set(plan: Plan, cached: bool = True) -> StagedSet:
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=cached)
    staged_set.arena.pinned = True  # as if registered with CUDA: graphs are allowed
    staged_set.arena.tensor.fill_(POISON)
    return staged_set


def _plans_on_gpu0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stager's plans count every region as on ``cuda:0`` (the fake device)."""
    import stager.stager as stager_module

    real_build = stager_module.build_plan

    def on_gpu0(*args: Any, **kwargs: Any) -> Plan:
        plan = real_build(*args, **kwargs)
        plan.device_regions = {GPU0: list(plan.cpu_index)}
        plan.cpu_index, plan.cpu_src = [], []
        return plan

    monkeypatch.setattr(stager_module, "build_plan", on_gpu0)


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
    sd = _state_dict(4)
    plan, tensors, others = plan_of(sd)
    copier = _cpu_copier()
    staged_set = _pinned_set(plan)
    stats = _launch(copier, plan, staged_set)
    assert (stats.executor, stats.device_path) == ("graph-capture", "packed")
    _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))  # the warm-up copied
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].replays == 0
    for step in range(3):
        for t in sd.values():
            t.add_(1)  # in place: the graph stays valid and sees the new values
        stats = _launch(copier, plan, staged_set)
        assert stats.executor == "graph-replay"
        _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
    assert (copier.captures, copier.replays) == (1, 3)
    assert FakeGraph.made[0].replays == 3


def test_a_source_freed_and_replaced_is_replanned_and_recaptured_through_the_stager(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP-style: the storage behind t3 is freed (resize_(0)) and a new tensor for t3 may take
    # its old address (tests/test_stager.py covers that case on its own). The stager plans again
    # and the copier captures a graph over the new sources, then replays it.
    import stager.stager as stager_module

    class Registered(HostArena):  # as if registered with CUDA: graphs are allowed
        def __init__(self, nbytes: int, **kw: Any) -> None:
            super().__init__(nbytes, **{**kw, "pinned": False})
            self.pinned = True

    _plans_on_gpu0(monkeypatch)
    monkeypatch.setattr(stager_module, "HostArena", Registered)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    sd: dict[str, torch.Tensor] = {f"t{i}": raw(300 + i, i) for i in range(8)}
    sd["t3"] = torch.randn(4096)
    with GraphStager(cache_policy="cached", max_arenas=1, pack_threshold=8 * KiB, chunk_size=1 << 20) as stager:
        copier = stager._copiers[GPU0] = _cpu_copier()
        for _ in range(2):
            _assert_same(sd, stager.stage(sd))
        assert (copier.captures, copier.replays, stager.plans_built) == (1, 1, 1)
        old_address = sd["t3"].data_ptr()
        sd["t3"].untyped_storage().resize_(0)
        sd["t3"] = torch.randn(4096)  # may be at the old address
        out = stager.stage(sd)
        _assert_same(sd, out)
        assert stager.plans_built == 2 and copier.captures == 2
        assert stager.last_stats.executor == "graph-capture"
        if sd["t3"].data_ptr() == old_address:
            # Same signature as planned: only the check of the planned storages caught it.
            assert stager.last_stats.replanned
        del out
        sd["t3"].add_(1)
        _assert_same(sd, stager.stage(sd))
        assert stager.last_stats.executor == "graph-replay"


def test_each_cached_arena_gets_its_own_graph_and_fresh_ones_run_eagerly(fake_cuda: None) -> None:
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, tensors, others = plan_of(sd)
    copier = _cpu_copier()
    a, b = _pinned_set(plan), _pinned_set(plan)
    assert _launch(copier, plan, a).executor == "graph-capture"
    assert _launch(copier, plan, b).executor == "graph-capture"
    assert _launch(copier, plan, a).executor == "graph-replay"
    assert _launch(copier, plan, b).executor == "graph-replay"
    assert (copier.captures, copier.replays) == (2, 2)
    fresh = _pinned_set(plan, cached=False)
    assert _launch(copier, plan, fresh).executor == "eager"
    _assert_same(sd, rebuild(plan.tokens, fresh.tensors, tensors, others))
    unpinned = _pinned_set(plan)
    unpinned.arena.pinned = False
    assert _launch(copier, plan, unpinned).executor == "eager"
    _assert_same(sd, rebuild(plan.tokens, unpinned.tensors, tensors, others))


@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_launch_in_pieces_replays_one_graph_per_piece(fake_cuda: None, pieces: int) -> None:
    sd = {f"s{i}": raw(100 + i, i) for i in range(12)}
    sd.update({f"big{i}": raw(20 * KiB, 50 + i) for i in range(3)})
    plan, tensors, others = plan_of(sd)
    copier = _cpu_copier(replay_pieces=pieces)
    staged_set = _pinned_set(plan)
    _launch(copier, plan, staged_set)
    for t in sd.values():
        t.add_(3)
    _launch(copier, plan, staged_set)
    _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
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
    copier = _cpu_copier()
    staged_set = _pinned_set(plan)
    with caplog.at_level(logging.WARNING, logger="stager"):
        for _ in range(3):
            stats = _launch(copier, plan, staged_set)
            assert stats.executor == "eager" and any("capture failed" in n for n in stats.notes)
            _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
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
    copier = _cpu_copier()
    fresh = _pinned_set(plan, cached=False)  # eager path

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
    copier = _cpu_copier()
    staged_set = _pinned_set(plan)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("warm-up failed (injected)")

    monkeypatch.setattr(_cuda_graph_module, "issue_ops", fail)
    with pytest.raises(RuntimeError, match="injected"):
        copier.launch(plan, staged_set, FakeStream(), StageStats()).wait()
    monkeypatch.setattr(_cuda_graph_module, "issue_ops", _issue_or_capture)
    for t in sd.values():
        t.add_(1)
    staged_set.arena.tensor.fill_(POISON)
    # Nothing was captured: this run warms up and captures (a replay would copy nothing).
    assert _launch(copier, plan, staged_set).executor == "graph-capture"
    _assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))


def test_capture_runs_with_the_garbage_collector_paused(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
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
    _launch(_cpu_copier(), plan, _pinned_set(plan))
    assert seen == [False]
    assert gc.isenabled()


# ------------------------------------------------------------------------------ GraphStager's device orchestration


@pytest.fixture
def gated_device(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Plans whose regions count as on ``cuda:0``, and a device launch whose copy completes only
    when the test opens the gate (as if the caller's stream were still busy)."""
    import threading

    _plans_on_gpu0(monkeypatch)

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

            def launch_devices(plan: Plan, staged_set: StagedSet, stats: StageStats, pending: Any, marks: Any) -> None:
                gate.launch_threads.append(threading.current_thread())
                for idx in plan.device_regions.values():
                    pending.add(GatedEvent(plan, staged_set, idx), plan.src_views)
                stats.executor, stats.device_path = "graph-replay", "packed"

            stager._launch_devices = launch_devices  # type: ignore[method-assign]

    return Gate()


def test_async_device_stage_launches_on_the_staging_thread_and_resolves_after_the_copy(gated_device: Any) -> None:
    import threading
    import time

    sd = _state_dict(5)
    with GraphStager(async_staging=True, cache_policy="cached", max_arenas=1) as stager:
        gated_device.install(stager)
        fut = stager.stage(sd)
        deadline = time.monotonic() + 10
        while not gated_device.launch_threads and time.monotonic() < deadline:
            time.sleep(0.001)
        assert gated_device.launch_threads and gated_device.launch_threads[0] is not threading.current_thread()
        time.sleep(0.05)
        assert not fut.done()  # the copy has not completed: no result yet
        gated_device.open.set()
        out = fut.result(timeout=10)
        _assert_same(sd, out)
        assert gated_device.copied == 1
        stats = stager.last_stats
        assert stats is not None and stats.executor == "graph-replay" and stats.device_path == "packed"
        assert stats.blocked_s < stats.complete_s
        del out, fut
        out = stager.stage(sd).result(timeout=10)  # the same arena again (lease released)
        assert stager.last_stats.arena == "cached"
        _assert_same(sd, out)


def test_sync_device_stage_returns_after_the_copy(gated_device: Any) -> None:
    sd = _state_dict(6)
    with GraphStager(cache_policy="cached") as stager:
        gated_device.install(stager)
        gated_device.open.set()
        out = stager.stage(sd)
        assert gated_device.copied == 1
        _assert_same(sd, out)


def test_stage_nowait_returns_the_dict_with_the_device_copies_in_flight(gated_device: Any) -> None:
    sd = _state_dict(7)
    with GraphStager(cache_policy="cached") as stager:
        gated_device.install(stager)
        staged, pending = stager.stage_nowait(sd)
        assert pending is not None and len(pending.events) == 1
        assert not pending.query() and gated_device.copied == 0
        gated_device.open.set()
        pending.wait()
        assert pending.query() and gated_device.copied == 1
        _assert_same(sd, staged)


def test_an_arena_with_copies_in_flight_is_not_reused_even_once_its_dict_is_dropped(gated_device: Any) -> None:
    sd = _state_dict(9)
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
        _assert_same(sd, out)
        assert not first.leased()  # the copies completed: free again


def test_stage_nowait_on_the_cpu_has_nothing_in_flight() -> None:
    sd = _state_dict(8)
    with GraphStager(cache_policy="cached") as stager:
        staged, pending = stager.stage_nowait(sd)
        assert pending is None
        _assert_same(sd, staged)


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
    monkeypatch.setattr(copier, "_allocate_chunks", lambda s, n: tuple(torch.empty(n, dtype=torch.uint8) for _ in range(s)))
    stats = StageStats()
    program = copier._program_for(_fake_plan([512 << 10] * 16), stats)
    assert copier.path == path
    if chunk is not None:
        assert program.chunk_size == chunk
    if path == "direct":
        assert any("test reading (injected)" in n for n in stats.notes)


def test_arena_layout_puts_each_devices_small_regions_together() -> None:
    from stager.plan import arena_layout

    g0, g1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    sizes = [10, 5000, 20, 5000, 30, 7, 40]
    devices = [g0, g0, g0, g0, g1, cpu, g0]
    offsets, total = arena_layout(sizes, devices, alignment=16, pack_threshold=1000)
    order = sorted(range(len(sizes)), key=offsets.__getitem__)
    assert order == [5, 0, 2, 6, 1, 3, 4]  # cpu; cuda:0 small, cuda:0 large; cuda:1
    assert all(o % 16 == 0 for o in offsets) and total == offsets[4] + 32
    plain, _ = arena_layout(sizes, devices, alignment=16, pack_threshold=None)
    assert sorted(range(len(sizes)), key=plain.__getitem__) == [5, 0, 1, 2, 3, 6, 4]
