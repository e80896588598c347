"""Helpers of the staging-program and device-path tests: plans and regions of CPU tensors, CUDA
faked on the CPU, and the staging paths of the ``staging_path`` fixture (:class:`StagingPath`).

The fakes stand in for streams, events and ``CUDAGraph`` so that the copier's launch path and the
graph executor run on CPU tensors. The fake graph behaves as a real one does: capturing issues
nothing, and a replay re-issues the ops with the memory bound *at capture time* -- so a replay
after a source moved would copy the stale source, which is what the plan check prevents.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _helpers import POISON

from stager import GraphStager, StagerConfig, StageStats
from stager.arena import HostArena
from stager.device import DeviceCopier
from stager.graphs import cuda_graph as _cuda_graph_module
from stager.plan import Plan, Region, build_plan
from stager.staged_set import StagedSet
from stager.stats import ArenaSource, DevicePath, Executor
from stager.tree import walk

KiB = 1 << 10
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


def regions(
    sizes: list[int], device: torch.device | list[torch.device] = CPU, align: int = 256
) -> list[Region]:
    """Regions back to back as a plan lays them out (each at a multiple of ``align``)."""
    out, offset = [], 0
    devices = device if isinstance(device, list) else [device] * len(sizes)
    for i, (n, d) in enumerate(zip(sizes, devices)):
        out.append(Region(index=i, device=d, nbytes=n, arena_offset=offset, src_offset=0))
        offset = (offset + n + align - 1) // align * align
    return out


def mixed_state_dict(seed: int) -> dict[str, Any]:
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


def chunks_for(program: Any, nbytes: int | None = None) -> list[torch.Tensor]:
    n = program.chunk_bytes if nbytes is None else nbytes
    return [torch.full((n,), POISON, dtype=torch.uint8) for _ in range(max(program.slots, 1))]


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


_real_issue_ops = _cuda_graph_module.issue_ops


def issue_or_capture(bindings: Any, ops: range | None = None, **kw: Any) -> None:
    if FakeGraph.capturing is not None:
        FakeGraph.capturing.issued.append((bindings, ops))
        return
    _real_issue_ops(bindings, ops, **kw)


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace streams, events, ``CUDAGraph`` and the device/stream contexts with the fakes (what
    each test module's ``fake_cuda`` fixture does)."""
    FakeGraph.made = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "stream", lambda s=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda i=None: contextlib.nullcontext())
    monkeypatch.setattr(_cuda_graph_module, "issue_ops", issue_or_capture)


def cpu_copier(**overrides: Any) -> DeviceCopier:
    cfg = StagerConfig.resolve(**{"pack_threshold": 8 * KiB, "chunk_size": 1 << 20, **overrides})
    copier = DeviceCopier(GPU0, cfg)
    copier.device = CPU  # the fake: a "device" whose tensors are CPU tensors
    copier._allocate_chunks = lambda s, n: tuple(torch.empty(n, dtype=torch.uint8) for _ in range(s))  # type: ignore[method-assign]
    return copier


def pinned_set(plan: Plan, cached: bool = True) -> StagedSet:
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=cached)
    staged_set.arena.pinned = True  # as if registered with CUDA: graphs are allowed
    staged_set.arena.tensor.fill_(POISON)
    return staged_set


def plans_on_gpu0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stager's plans count every region as on ``cuda:0`` (the fake device)."""
    import stager.pipeline as stager_module

    real_build = stager_module.build_plan

    def on_gpu0(*args: Any, **kwargs: Any) -> Plan:
        plan = real_build(*args, **kwargs)
        plan.device_regions = {GPU0: list(plan.cpu_index)}
        plan.cpu_index, plan.cpu_src = [], []
        return plan

    monkeypatch.setattr(stager_module, "build_plan", on_gpu0)


class RegisteredArena(HostArena):
    """A pageable host arena that counts as pinned (as if registered with CUDA): graphs are allowed."""

    def __init__(self, nbytes: int, **kw: Any) -> None:
        super().__init__(nbytes, **{**kw, "pinned": False})
        self.pinned = True


@dataclass(frozen=True)
class StagingPath:
    """One way a ``stage()`` runs, for the ``staging_path`` fixture (``tests/conftest.py``).

    ``device``: ``"cpu"`` (CPU sources, copied on the host) or ``"fake-cuda"`` (every region counts
    as on ``cuda:0`` and is copied by a copier whose device is the CPU, with the fakes of
    :func:`install_fake_cuda`). ``cached``: a persistent arena (``cache_policy=cached``) or one for
    this call only (``fresh``). Fake device only: ``packed`` (small regions packed into chunks;
    else ``pack_threshold=0``, every region direct) and ``graph`` (cached: captured, then replayed
    once the arena is reused; else ``graphs=off``, eager; a fresh arena always runs eagerly).
    """

    device: str
    cached: bool
    packed: bool = False
    graph: bool = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Put the fake device in place (nothing for the CPU path)."""
        if self.device == "cpu":
            return
        import stager.pipeline as pipeline_module

        install_fake_cuda(monkeypatch)
        plans_on_gpu0(monkeypatch)
        monkeypatch.setattr(pipeline_module, "HostArena", RegisteredArena)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())

    def config(self) -> dict[str, Any]:
        """The ``GraphStager`` arguments that choose this path."""
        cfg: dict[str, Any] = {"cache_policy": "cached" if self.cached else "fresh"}
        if self.device != "cpu":
            graphs = "auto" if not self.cached else "on" if self.graph else "off"
            cfg.update(pack_threshold=8 * KiB if self.packed else 0, chunk_size=1 << 20, graphs=graphs)
        return cfg

    def stager(self, **overrides: Any) -> GraphStager:
        """A ``GraphStager`` set up for this path (after :meth:`install`)."""
        cfg = {**self.config(), **overrides}
        stager = GraphStager(**cfg)
        if self.device != "cpu":
            stager._copiers[GPU0] = cpu_copier(**cfg)
        return stager

    def assert_taken(self, stats: StageStats | None, *, reused: bool) -> None:
        """``stats`` record this path; ``reused``: the stage reused the arena of an earlier one
        (released since), so a graph path replays instead of capturing."""
        assert stats is not None
        graph_run = Executor.GRAPH_REPLAY if reused else Executor.GRAPH_CAPTURE
        if self.device == "cpu":
            want = (Executor.CPU, DevicePath.CPU)
        else:
            path = DevicePath.PACKED if self.packed else DevicePath.DIRECT
            want = (graph_run if self.graph else Executor.EAGER, path)
        cached = ArenaSource.CACHED if reused else ArenaSource.NEW_CACHED
        arena = cached if self.cached else ArenaSource.FRESH
        assert (stats.executor, stats.device_path, stats.arena) == (*want, arena), stats.notes
        if not self.graph:
            assert (stats.captures, stats.replays) == (0, 0)
