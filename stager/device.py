"""The device staging path: one :class:`DeviceCopier` per CUDA device a state dict lives on.

For each ``stage()`` with regions on its device, a copier (on the staging thread) takes the plan's
staging program (:mod:`stager.graphs.program`) and its device chunks (on
``torch.cuda.OutOfMemoryError`` the program is rebuilt with every region direct, and the stats say
so); binds it to the staged set's arena, once per arena (the plan check before every stage keeps
the bindings' sources valid); makes its low-priority side stream wait on the device for what the
caller marked; runs the program there, as a CUDA-graph replay (:class:`CudaGraphExecutor`, one per
cached arena, each a different destination) when the arena is cached and pinned and graphs are
on, eagerly otherwise; and records the ``done`` event into a :class:`PendingCopy` with every tensor
the queued copies touch. A checksum program's host buffer goes into the :class:`PendingCopy` too;
:func:`device_checksums` reads it once the copy is complete. Packed or direct, and the chunk size,
are decided in one place, :meth:`DeviceCopier._decide_packing`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from stager import nvtx
from stager.envs import Mode, format_size
from stager.graphs.bindings import Bindings, bind_program
from stager.graphs.cuda_graph import Action, CaptureKey, CudaGraphExecutor, capture_key
from stager.graphs.eager import run_eager
from stager.graphs.program import Program, build_program
from stager.stats import DevicePath, Executor

if TYPE_CHECKING:
    from stager.config import StagerConfig
    from stager.headroom import LinkInfo
    from stager.plan import Plan
    from stager.staged_set import StagedSet
    from stager.stats import StageStats

__all__ = ["CHUNK_SLOTS", "DeviceCopier", "PendingCopy", "combine_executor", "device_checksums", "use_triton"]

log = logging.getLogger("stager")

CHUNK_SLOTS = 2
"""Device chunks the packed runs cycle through (the ring)."""
_LOW_PRIORITY = 0
"""CUDA stream priorities run from 0 (lowest, and the default) to negative numbers (higher): the
side stream ranks below a training stream only if that one was created with a higher priority."""

_EXECUTOR_RANK = (Executor.CPU, Executor.EAGER, Executor.GRAPH_REPLAY, Executor.GRAPH_CAPTURE)
_EXECUTOR_OF = {
    Action.CAPTURE: Executor.GRAPH_CAPTURE, Action.REPLAY: Executor.GRAPH_REPLAY, Action.EAGER: Executor.EAGER
}


def combine_executor(a: Executor, b: Executor) -> Executor:
    """The executor to report for a stage that used both ``a`` and ``b`` (several devices)."""
    return a if _EXECUTOR_RANK.index(a) >= _EXECUTOR_RANK.index(b) else b


def use_triton(mode: Mode) -> bool | None:
    """``pack_gather``'s ``use_triton`` for ``STAGER_TRITON``: on insists, off uses the reference."""
    return {Mode.ON: True, Mode.OFF: False}.get(mode)


class PendingCopy:
    """Device copies queued for one ``stage()``: their done events and what they read and write.

    :meth:`wait` blocks until every event completed, then lets go of the references: into
    ``graveyard`` when given (a list its owner empties where no CUDA-graph capture can be running:
    freeing a pinned buffer of PyTorch's caching host allocator records an event on every stream
    that used it, and an event recorded on the side stream while another thread captures on it
    becomes part of that capture), else at once.
    """

    def __init__(self, graveyard: list[list[object]] | None = None) -> None:
        self.t0 = time.perf_counter()
        self._events: list[torch.cuda.Event] = []
        self._keep: list[object] = []
        self._graveyard = graveyard
        self._checksums: list[tuple["StagedSet", torch.Tensor, tuple[int, ...]]] = []

    @property
    def events(self) -> tuple[torch.cuda.Event, ...]:
        """The done events (``torch.cuda.Event``, one per device): a stream that must see the
        staged bytes, or must not overwrite the sources yet, waits on these."""
        return tuple(self._events)

    def add(self, event: torch.cuda.Event, keep: object) -> None:
        """Add a device's done ``event``, and what must stay alive until it completes."""
        self._events.append(event)
        self._keep.append(keep)

    def add_checksums(self, staged_set: "StagedSet", values: torch.Tensor, regions: Sequence[int]) -> None:
        """Add checksums a device program computes: once the copies completed, ``values[k]`` (a
        host ``int64`` buffer the program fills) is the checksum of region ``regions[k]`` of
        ``staged_set``."""
        self._checksums.append((staged_set, values, tuple(regions)))

    @property
    def checksums(self) -> tuple[tuple["StagedSet", torch.Tensor, tuple[int, ...]], ...]:
        """``(staged set, host values, region indices)`` per device program that computes
        checksums; read the values only once :meth:`wait` returned."""
        return tuple(self._checksums)

    def query(self) -> bool:
        """Whether every copy has completed (never blocks)."""
        return all(e.query() for e in self._events)

    def wait(self) -> None:
        """Block until every copy has completed."""
        for e in self._events:
            e.synchronize()
        keep, self._keep = self._keep, []
        if self._graveyard is not None and keep:
            self._graveyard.append(keep)


def device_checksums(
    pending: PendingCopy | None, staged_set: "StagedSet"
) -> tuple[list[int], torch.Tensor] | None:
    """``(region indices, int64 checksums)`` the device programs of ``pending`` computed for
    ``staged_set``, or None when none did. Call it once ``pending.wait()`` returned (the values
    are read from the host buffers the programs filled); pass the result to
    :func:`stager.integrity.checksum_staged_set` as ``known``, which hashes the other regions
    (CPU sources) on the host."""
    if pending is None:
        return None
    entries = [(values, regions) for s, values, regions in pending.checksums if s is staged_set]
    if not entries:
        return None
    regions = [i for _, r in entries for i in r]
    values = torch.cat([v.reshape(-1)[: len(r)] for v, r in entries]).clone()
    return regions, values


@dataclass(eq=False)
class _Entry:
    """Per staged set: its bindings and (cached, pinned sets) the graph executor bound to them."""

    bindings: Bindings | None = None
    executor: CudaGraphExecutor | None = None
    key: CaptureKey | None = None


class DeviceCopier:
    """Stages the regions of a plan that live on one CUDA ``device``; one per device per stager.

    Owns the side stream, the staging program of the current plan, the device chunks (created
    once, reused by every cached arena) and one graph executor per cached arena.
    """

    def __init__(self, device: torch.device, config: "StagerConfig") -> None:
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"DeviceCopier needs an indexed CUDA device, got {device}")
        self.device = device
        self.config = config
        self._stream: torch.cuda.Stream | None = None
        self._programs: "weakref.WeakKeyDictionary[Plan, Program]" = weakref.WeakKeyDictionary()
        self.program: Program | None = None
        """The staging program of the plan staged last."""
        self.path: DevicePath | None = None
        """What the program staged last does (packed or direct); ``None`` before the first."""
        self._link: LinkInfo | None = None
        self._link_read = False
        self._index = device.index
        self._chunks: tuple[torch.Tensor, ...] = ()
        self._entries: "weakref.WeakKeyDictionary[StagedSet, _Entry]" = weakref.WeakKeyDictionary()
        self.captures = 0
        """CUDA-graph captures made by this copier so far (re-captures included)."""
        self.replays = 0
        """CUDA-graph replays made by this copier so far (one per stage, whatever the pieces)."""

    @property
    def stream(self) -> torch.cuda.Stream:
        """The low-priority side stream every staging op of this device runs on."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device, priority=_LOW_PRIORITY)
        return self._stream

    def _drop_entries(self) -> None:
        self._entries = weakref.WeakKeyDictionary()

    def forget_plan(self, plan: "Plan") -> None:
        """Drop the program of ``plan`` and the bindings and graphs of its staged sets, which hold
        its sources (the stager demoted or let go of it); chunks and the stream stay."""
        program = self._programs.pop(plan, None)
        if program is not None and program is self.program:
            self.program = None
        for staged_set in [s for s in list(self._entries.keys()) if s.plan is plan]:
            self._entries.pop(staged_set, None)

    def close(self) -> None:
        """Drop the programs, graphs, bindings and chunks (copies in flight keep what they use)."""
        self._programs = weakref.WeakKeyDictionary()
        self._drop_entries()
        self.program = None
        self._chunks = ()

    def link(self) -> LinkInfo | None:
        """The device's PCIe link (:class:`stager.headroom.LinkInfo`, or None), read once."""
        if not self._link_read:
            from stager.headroom import read_link

            self._link = read_link(self._index)
            self._link_read = True
        return self._link

    def _decide_packing(self, program: Program) -> tuple[bool, int, str]:
        """``(pack, chunk_size, reason)`` for ``program`` (packed, configured chunks): the single place
        this is decided, by :func:`stager.headroom.decide_device` over the device headroom."""
        from stager.headroom import DeviceMode, decide_device, read_device

        reading = read_device(self.device) if self.device.type == "cuda" else None
        if reading is None:
            return True, self.config.chunk_size, "device headroom unknown; configured chunk size"
        d = decide_device(
            program.device_bytes,
            program.chunk_bytes,
            reading,
            self.config.device_reserve,
            chunks_in_flight=program.slots,
        )
        if d.mode is DeviceMode.DIRECT:
            return False, 0, d.reason
        if d.mode is DeviceMode.PACKED:
            return True, self.config.chunk_size, d.reason
        return True, d.chunk_bytes, d.reason

    def _build(self, plan: "Plan", *, chunk_size: int | None = None, pack: bool = True) -> Program:
        cfg = self.config
        return build_program(
            plan.regions,
            self.device,
            pack_threshold=cfg.pack_threshold,
            chunk_size=chunk_size or cfg.chunk_size,
            slots=CHUNK_SLOTS,
            pack=pack,
            checksum=cfg.checksum is Mode.ON,  # auto: not until measured on a GPU
        )

    def _program_for(self, plan: "Plan", stats: "StageStats") -> Program:
        program = self._programs.get(plan)
        if program is not None:
            self.program = program
            self.path = DevicePath.PACKED if program.packed else DevicePath.DIRECT
            return program
        program = self._build(plan)
        if program.packed:
            pack, chunk_size, reason = self._decide_packing(program)
            if not pack:
                stats.notes.append(f"{self.device}: direct copies ({reason})")
                program = self._build(plan, pack=False)
            elif chunk_size != self.config.chunk_size:
                stats.notes.append(f"{self.device}: chunk size {format_size(chunk_size)} ({reason})")
                program = self._build(plan, chunk_size=chunk_size)
        if program.packed and not self._ensure_chunks(program):
            stats.notes.append(
                f"{self.device}: out of device memory for {program.slots} staging chunk(s) of "
                f"{format_size(program.chunk_bytes)}; copying each region directly"
            )
            log.warning("stager: %s", stats.notes[-1])
            program = self._build(plan, pack=False)
        if not program.packed and self._chunks and not any(p.packed for p in self._programs.values()):
            self._chunks = ()  # not needed any more: give the memory back
            self._drop_entries()
        self._programs[plan] = program
        self.program = program
        self.path = DevicePath.PACKED if program.packed else DevicePath.DIRECT
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stager: %s", program.describe(format_size))
        return program

    def _ensure_chunks(self, program: Program) -> bool:
        """Make sure ``program.slots`` chunks of ``program.chunk_bytes`` exist; False on OOM."""
        have = self._chunks
        wanted = have[: program.slots]
        if len(have) >= program.slots and all(c.numel() >= program.chunk_bytes for c in wanted):
            return True
        self._chunks = ()
        self._drop_entries()  # their graphs address the old chunks
        try:
            self._chunks = self._allocate_chunks(program.slots, program.chunk_bytes)
        except torch.cuda.OutOfMemoryError:
            return False
        return True

    def _allocate_chunks(self, slots: int, nbytes: int) -> tuple[torch.Tensor, ...]:
        # On the side stream, the only stream that ever uses them.
        with torch.cuda.stream(self.stream):
            return tuple(torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(slots))

    def _graphs_wanted(self, staged_set: "StagedSet", stats: "StageStats") -> bool:
        mode = self.config.graphs
        if mode is Mode.OFF or not staged_set.cached:
            return False
        if not staged_set.arena.pinned:
            if mode is Mode.ON:
                stats.notes.append(
                    f"{self.device}: STAGER_GRAPHS=on but the arena is not pinned; eager copies"
                )
            return False
        return True

    def _allocate_checksums(self, n: int, pinned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A checksum program's buffers: ``n`` int64 slots on the device, and as many on the host
        (pinned when the arena is, so that the copy into it can be captured)."""
        pin = pinned and self.device.type == "cuda"
        return (
            torch.empty(n, dtype=torch.int64, device=self.device),
            torch.empty(n, dtype=torch.int64, pin_memory=pin),
        )

    def _bind(self, plan: "Plan", program: Program, staged_set: "StagedSet") -> Bindings:
        sums: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if program.checksum:  # once per binding, before any capture; on the side stream
            sums = self._allocate_checksums(len(program.checksum_regions), staged_set.arena.pinned)
        return bind_program(
            program,
            plan.src_views,
            staged_set.arena.tensor,
            self._chunks,
            use_triton=use_triton(self.config.triton),
            non_blocking=staged_set.arena.pinned,
            checksums=sums[0],
            host_checksums=sums[1],
        )

    def prepare(self, plan: "Plan", staged_set: "StagedSet", stats: "StageStats") -> None:
        """Build the program and chunks of ``plan`` and bind them to a cached ``staged_set``,
        copying nothing (``GraphStager.prewarm``)."""
        with torch.cuda.device(self.device.index):
            program = self._program_for(plan, stats)
            if staged_set.cached and staged_set not in self._entries:
                with torch.cuda.stream(self.stream):
                    self._entries[staged_set] = _Entry(bindings=self._bind(plan, program, staged_set))

    def launch(
        self,
        plan: "Plan",
        staged_set: "StagedSet",
        wait_for: torch.cuda.Event | torch.cuda.Stream,
        stats: "StageStats",
        pending: PendingCopy | None = None,
    ) -> PendingCopy:
        """Queue the copies of this device's regions of ``plan`` into ``staged_set``.

        ``wait_for`` is what produced the sources: a ``torch.cuda.Event`` recorded on the
        caller's stream when ``stage()`` was called, or that stream itself; the side stream waits
        for it on the device. Returns ``pending`` (a new one by default) at once, with the done
        event and what the copies use added: wait on it before reading the staged tensors. The
        caller has checked the plan against the sources of this call (nothing here reads their
        addresses again).
        """
        cfg = self.config
        if pending is None:
            pending = PendingCopy()
        with torch.cuda.device(self.device.index):
            side = self.stream
            program = self._program_for(plan, stats)
            graphs = self._graphs_wanted(staged_set, stats)
            # Cached sets keep their bindings (and graphs); a fresh set is bound for this call only.
            entry = self._entries.get(staged_set) if staged_set.cached else None
            if entry is None:
                entry = _Entry()
                if staged_set.cached:
                    self._entries[staged_set] = entry
            if entry.bindings is None or entry.bindings.program is not program:
                # Binding prepares the pack tables on the side stream (a host-to-device copy):
                # before the side stream is made to wait for the caller.
                with torch.cuda.stream(side):
                    entry.bindings = self._bind(plan, program, staged_set)
                entry.executor = None
            bindings = entry.bindings
            # blocking: a thread that waits on it sleeps instead of spinning a CPU core
            done = torch.cuda.Event(blocking=True)
            if isinstance(wait_for, torch.cuda.Event):
                side.wait_event(wait_for)
            else:
                side.wait_stream(wait_for)
            try:
                if graphs:
                    if entry.executor is None:
                        entry.executor = CudaGraphExecutor(
                            side, pieces=cfg.replay_pieces, ranges=nvtx.ranges(cfg.nvtx)
                        )
                        entry.key = capture_key(bindings)
                    action = entry.executor.run(bindings, entry.key, done)
                    if action is Action.CAPTURE:
                        self.captures += 1
                    elif action is Action.REPLAY:
                        self.replays += 1
                    executor = _EXECUTOR_OF[action]
                    if action is Action.EAGER and entry.executor.tracker.failure:
                        failure = entry.executor.tracker.failure
                        note = f"{self.device}: graph capture failed ({failure}); eager"
                        if note not in stats.notes:
                            stats.notes.append(note)
                    keepalive = entry.executor.keepalive()
                    keep: tuple[object, ...] = (bindings, keepalive, plan.src_views, self._chunks)
                else:
                    run_eager(bindings, stream=side, ranges=nvtx.ranges(cfg.nvtx), done=done)
                    executor = Executor.EAGER
                    keep = (bindings, plan.src_views, self._chunks)
            except BaseException:
                # Copies queued before the failure still read the sources and write the arena:
                # the caller's wait (which releases the arena) must cover them too.
                with contextlib.suppress(Exception):
                    done.record(side)
                    pending.add(done, (bindings, plan.src_views, self._chunks))
                raise
        pending.add(done, keep)
        if bindings.host_checksums is not None:
            pending.add_checksums(staged_set, bindings.host_checksums, program.checksum_regions)
        stats.executor = combine_executor(stats.executor, executor)
        packed = DevicePath.PACKED in (self.path, stats.device_path)
        stats.device_path = DevicePath.PACKED if packed else DevicePath.DIRECT
        return pending
