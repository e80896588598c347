"""``GraphStager``: a drop-in ``AsyncStager`` for ``torch.distributed.checkpoint.async_save``.

Every entry point (``stage()``, synchronous or asynchronous, ``stage_nowait()``, ``prewarm()``)
runs one pipeline, :meth:`GraphStager._pipeline`, one call at a time:

1. walk the state dict and find the plan it matches among the plans kept (up to
   ``max_plans``; a new plan otherwise: bad input raises here, before anything is copied);
2. take a host arena for the staged copy: a free cached one of that plan, another one, a fresh
   one or, per the lease policy, wait for one to come free (see :mod:`stager.headroom`);
3. copy every source region into its slot (CPU sources: ``_foreach_copy_``, split over up to
   ``torch.get_num_threads()`` threads when there are many; device sources: the staging program
   on a low-priority side stream, replayed as CUDA graphs, see :mod:`stager.device` and
   :mod:`stager.graphs`);
4. rebuild the nested structure around the staged tensors (while device copies are in flight)
   and deep-copy the other leaves; wait for the copies (except ``stage_nowait``).

Stats are filled and failures cleaned up in that one function. With ``async_staging`` on,
``stage()`` only records what must be fixed at call time -- on a GPU, an event on the caller's
current stream of each device the stager has staged from, which the side stream waits on, so the
copy sees exactly the state at the call -- and hands the whole pipeline to the staging thread.
Its ``Future`` resolves when the copy is complete; as DCP's contract says, the sources must not
be written until then, and a source whose version counter moved while it was being copied fails
that ``Future`` with :class:`~stager.errors.SourceModifiedError` instead of handing out a copy
that may mix two steps.

One stager may be called from several threads: the pipeline is serialized, and plans are not
changed once published. A forked child gets fresh locks and thread pools.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Iterator

import torch

from stager import nvtx
from stager.arena import HostArena, StagedSet, find_segment
from stager.config import StagerConfig
from stager.device import DeviceCopier, PendingCopy, device_checksums
from stager.envs import CachePolicy, LeasePolicy, Mode
from stager.errors import (
    LeaseTimeoutError,
    SourceModifiedError,
    StagerClosedError,
    StagingInputError,
)
from stager.headroom import HostDecision, decide_host, read_host
from stager.holders import traceback_holders
from stager.integrity import checksum_staged_set, clear_checksums
from stager.plan import Plan, build_plan, gc_paused
from stager.stats import StageStats
from stager.stats import record as record_stats
from stager.tree import find_cycle, rebuild, walk

__all__ = ["GraphStager", "HostBytes"]

log = logging.getLogger("stager")

_REGIONS_PER_THREAD = 1024  # below this many CPU regions per thread, one thread copies them all
_VERSION = attrgetter("_version")
_INSPECT_AFTER_S = 1.0  # waited this long for an arena: look for failed writes that hold one
_ASYNC_HINT = (
    "Wait for staging to complete before the next optimizer step: "
    "response.staging_completion.result() or stager.synchronize_staging()"
)


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """Every tensor's version counter (``None`` for an inference tensor, which has none)."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:  # an inference tensor: no counter, so no write to it can be seen
        return [None if t.is_inference() else t._version for t in tensors]


@dataclass(frozen=True)
class HostBytes:
    """Host memory held by a stager's arenas (see :meth:`GraphStager.host_bytes`)."""

    total: int
    """Bytes of every arena alive: cached ones, spares and fresh ones still held."""
    pinned: int
    """The part of ``total`` registered with CUDA (page-locked)."""


@dataclass(eq=False)
class _PlanSlot:
    """A plan kept by the stager, with the staged sets (cached arenas) laid out for it."""

    plan: Plan
    sets: list[StagedSet] = field(default_factory=list)


_STAGERS: "weakref.WeakSet[GraphStager]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Locks may have been held by a thread that does not exist in the child, and pool threads are
    # gone: a child that used an inherited stager would wait for ever. Give each a fresh start.
    for s in list(_STAGERS):
        s._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class GraphStager:
    """Stage state dicts into host memory with cached plans and leased, reusable host arenas.

    Implements DCP's ``AsyncStager`` protocol, so it plugs into
    ``dcp.async_save(state_dict, checkpoint_id=path, async_stager=GraphStager())``.

    Args:
        config: a resolved :class:`~stager.config.StagerConfig`; by default one is resolved from
            the profile and the ``STAGER_*`` environment.
        **overrides: config fields to set explicitly (they win over everything else).

    The staged copy has the structure of the input; every tensor is a CPU tensor with the same
    dtype, shape, stride and bytes (``requires_grad=False``; ``nn.Parameter`` becomes a plain
    tensor, as with PyTorch's ``StateDictStager``); tensors that share a source storage share a
    staged storage; other leaves are deep-copied. The copy stays valid while anything holds it:
    a later ``stage()`` never overwrites it.
    """

    _synchronize_after_execute = False  # DCP's AsyncStager protocol attribute

    def __init__(self, config: StagerConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = StagerConfig.resolve(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        if config.shared_memory:
            # Arenas may be created on the staging thread, where no signal handler can be
            # installed: set up the SIGTERM clean-up of this process's /dev/shm files now.
            from stager import shm

            shm.install_sigterm_cleanup()
        self._slots: list[_PlanSlot] = []  # most recently used first
        self._closed = False
        self.last_stats: StageStats | None = None
        """Statistics of the most recent ``stage()`` call."""
        self.plans_built = 0
        """How many times a plan was built (first stage and every change of the state dict)."""
        self._pinned = self._want_pinned()
        self._spare_arenas: list[HostArena] = []
        self._cpu_threads = max(1, min(8, torch.get_num_threads()))
        self._fresh_alive = 0
        self._fresh_bytes = [0, 0]  # total, pinned
        self._last_decision: HostDecision | None = None
        self._copiers: dict[torch.device, DeviceCopier] = {}
        self._calls = 0  # stage() calls so far, for the profiler window
        self._window = nvtx.profiler_window(config)
        self._init_concurrency()
        _STAGERS.add(self)

    def _init_concurrency(self) -> None:
        self._lock = threading.RLock()  # the pipeline: one stage at a time
        self._counter_lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())
        self._active = 0  # entry-point calls running now (close() waits for them)
        self._executor: ThreadPoolExecutor | None = None
        self._staging_ident: int | None = None  # the staging thread, once it has run a stage
        self._copy_pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._graveyard: list[Any] = []  # see PendingCopy: emptied at the start of each stage

    def _reset_after_fork(self) -> None:
        self._init_concurrency()
        self._copiers = {}  # CUDA cannot be used in a forked child

    # ---------------------------------------------------------------- AsyncStager protocol

    @property
    def should_synchronize_after_execute(self) -> bool:
        """Whether DCP should call :meth:`synchronize_staging` after starting the write.

        Synchronous staging is complete when ``stage()`` returns; asynchronous staging returns a
        ``Future`` that DCP waits on itself.
        """
        return self._synchronize_after_execute

    def stage(self, state_dict: Any) -> Any:
        """Return a staged host copy of ``state_dict``, or a ``Future`` of it with async staging.

        With async staging the call returns after recording the caller's stream(s); the walk,
        plan check, copy and rebuild run on the staging thread. Do not write the sources until
        the ``Future`` resolves (``synchronize_staging()`` or the ``Future``'s ``result()``).

        Raises (or, async, fails the ``Future`` with):
            StagingInputError: a leaf cannot be staged (names its key path); nothing was copied.
            StagingMemoryError: no host memory for the copy under the configured limits.
            LeaseTimeoutError: the lease policy is ``wait`` and no arena came free in time.
            SourceModifiedError: (async only) a source was written while it was being copied.
            StagerClosedError: the stager was closed.
        """
        with self._call("stage"):
            t0 = time.perf_counter()
            stats = StageStats()
            if not self.config.async_staging:
                with self._profiled():
                    staged, _ = self._pipeline(state_dict, stats, t0, None)
                stats.blocked_s = stats.complete_s
                return staged
            marks = self.caller_marks()
            result: Future = Future()
            with self._counter_lock:  # two threads' first calls must not make two executors
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager")
            # The caller's Future is not the one the stager keeps (to wait on in
            # synchronize_staging and close): a Future holding the staged dict would keep its
            # arena leased after the caller dropped it.
            self._future = self._executor.submit(self._run_async, state_dict, stats, t0, marks, result)
            stats.blocked_s = time.perf_counter() - t0
            return result

    def _run_async(
        self, state_dict: Any, stats: StageStats, t0: float, marks: dict | None, result: Future
    ) -> None:
        wanted = result.set_running_or_notify_cancel()  # False: cancelled, still finish and release
        self._staging_ident = threading.get_ident()
        try:
            with self._profiled():
                staged, _ = self._pipeline(state_dict, stats, t0, marks, check_versions=_ASYNC_HINT)
        except BaseException as exc:
            if wanted:
                result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if wanted:
            result.set_result(staged)

    def stage_nowait(
        self, state_dict: Any, marks: dict | None = None, *, check_versions: str | None = None
    ) -> tuple[Any, PendingCopy | None]:
        """Stage ``state_dict`` but leave the device copies in flight (for :func:`stager.wrap`).

        Returns ``(staged, pending)``: the staged dict, whose tensors hold their final bytes only
        once ``pending`` (a :class:`~stager.device.PendingCopy`, ``None`` when no copy is left in
        flight) has completed -- on the host with ``pending.wait()``, or on the device by making a
        stream wait on each of ``pending.events``. Until then the sources must not be written
        (make the writing stream wait on the events first) and ``pending`` keeps them alive.
        CPU sources are copied before this returns. Ignores ``async_staging``.

        ``marks`` is what :meth:`caller_marks` returned on the thread that produced the sources,
        when this runs on another thread; by default the side streams wait for this thread's
        current streams. ``check_versions`` (a hint for the message) raises
        :class:`~stager.errors.SourceModifiedError` when a source was written during the call.
        """
        with self._call("stage_nowait"):
            return self._pipeline(
                state_dict, StageStats(), time.perf_counter(), marks, leave_in_flight=True,
                check_versions=check_versions,
            )

    def synchronize_staging(self) -> None:
        """Wait until the last asynchronous ``stage()`` is complete (no-op when synchronous).

        From the staging thread itself (a done-callback of a staging ``Future``) there is nothing
        to wait for: the stage that resolved that ``Future`` is complete.
        """
        future = self._future
        if future is not None and not self._on_staging_thread():
            future.result()

    def _on_staging_thread(self) -> bool:
        return threading.get_ident() == self._staging_ident

    def close(self) -> None:
        """Wait for staging in flight, then drop the plans, their source references and arenas.

        Staged dicts already handed out stay valid (their memory lives as long as they do).
        Calling ``close()`` twice is harmless.
        """
        with self._idle:
            if self._closed:
                return
            self._closed = True
            while self._active:  # a stage() on another thread: let it finish with its plan
                self._idle.wait()
        if self._executor is not None:
            # From a done-callback on the staging thread, that thread cannot wait for itself:
            # its queued stages still run; the clean-up below waits for the current one's lock.
            self._executor.shutdown(wait=not self._on_staging_thread())
            self._executor = None
        with self._lock:
            if self._copy_pool is not None:
                self._copy_pool.shutdown(wait=True)
                self._copy_pool = None
            for copier in self._copiers.values():
                copier.close()
            self._copiers.clear()
            self._graveyard.clear()
            for slot in self._slots:
                slot.plan.release_sources()
            self._slots = []
            self._spare_arenas = []

    @contextlib.contextmanager
    def _call(self, name: str) -> Iterator[None]:
        """One entry-point call: refused once closed, waited for by ``close()``."""
        with self._idle:
            if self._closed:
                raise StagerClosedError(f"{name}() called on a closed GraphStager; create a new one")
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def __enter__(self) -> "GraphStager":
        """``with GraphStager() as stager:`` closes the stager on the way out."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the stager (see :meth:`close`)."""
        self.close()

    # ---------------------------------------------------------------- frameworks

    def prewarm(self, state_dict: Any) -> None:
        """Plan ``state_dict``, allocate (and pin) its host arena and device chunks, copy nothing.

        Call it before the training loop so that the first checkpoint does not pay for planning,
        allocation and pinning inside it. Bad input raises here as it would in ``stage()``.
        """
        with self._call("prewarm"), self._lock, torch.inference_mode(False):
            stats = StageStats()
            slot, _, _, _ = self._find_plan(state_dict, stats)
            if any(not s.leased() for s in slot.sets):
                return
            staged_set = self._acquire(slot, stats)
            try:
                for device in slot.plan.device_regions:
                    if device.type == "cuda":
                        self._copier(device).prepare(slot.plan, staged_set, stats)
            finally:
                staged_set.in_flight = False  # nothing was handed out

    def release_sources(self) -> None:
        """Drop every reference the stager keeps to source storages (for offload and refit).

        The plans, their programs and CUDA graphs go with them; arenas are kept as spares for the
        next plan. The next ``stage()`` plans anew. Waits for staging in flight.
        """
        self._synchronize_quietly()
        with self._lock:
            for slot in self._slots:
                self._drop_slot(slot)
            self._slots = []

    def release(self, staged: Any) -> None:
        """End the lease of ``staged`` (a staged dict, or the ``Future`` of one) now.

        Every tensor in it is emptied (``set_()``), so it can no longer be read, and the arena
        behind it comes free for the next ``stage()`` as soon as nothing else (a view, a writer)
        still holds its memory. Use it when something you do not control (an executor callback,
        a failed write's traceback) keeps the staged dict alive after it was written.
        """
        if isinstance(staged, Future):
            if not staged.done():
                raise ValueError("release() of a staging Future that has not resolved: wait for it first")
            if staged.exception() is not None:
                return
            staged = staged.result()
        tokens: list[tuple] = []
        tensors: list[torch.Tensor] = []
        paths: list[str] = []
        walk(staged, tokens, tensors, [], paths)
        for t, path in zip(tensors, paths):
            st = t.untyped_storage()
            if st.nbytes() and (t.device.type != "cpu" or find_segment(st.data_ptr(), st.nbytes()) is None):
                raise ValueError(
                    f"release(): state_dict{path} is not a staged tensor (its memory is not in a host "
                    f"arena; device={t.device}); pass what stage() returned, not the source state dict. "
                    "Nothing was released"
                )
        for t in tensors:
            t.set_()

    def host_bytes(self) -> HostBytes:
        """Host bytes held by this stager's arenas now (total and pinned)."""
        with self._counter_lock:
            total, pinned = self._fresh_bytes
        seen: set[int] = set()
        arenas = [s.arena for slot in list(self._slots) for s in list(slot.sets)] + list(self._spare_arenas)
        for a in arenas:
            if id(a) in seen:
                continue
            seen.add(id(a))
            total += a.mapped_bytes
            pinned += a.mapped_bytes if a.pinned else 0
        return HostBytes(total=total, pinned=pinned)

    def _synchronize_quietly(self) -> None:
        """Wait for the last asynchronous stage, ignoring its outcome (its caller sees it)."""
        future = self._future
        if future is not None and not self._on_staging_thread():
            with contextlib.suppress(BaseException):
                future.result()

    # ---------------------------------------------------------------- the pipeline

    def _pipeline(
        self,
        state_dict: Any,
        stats: StageStats,
        t0: float,
        marks: dict | None,
        *,
        leave_in_flight: bool = False,
        check_versions: str | None = None,
    ) -> tuple[Any, PendingCopy | None]:
        """Carry one stage from the plan check to the staged dict; the only place that does.

        ``marks``: what the caller's streams were at call time (:meth:`caller_marks`); ``None``
        makes the side streams wait for the current streams of this thread. ``leave_in_flight``
        returns with device copies still running (their :class:`PendingCopy` is returned and the
        set stays leased until they complete). ``check_versions`` (what to do about it, for the
        message) fails the stage when a source's version counter moved between the walk and the
        end of the copy.
        """
        with self._lock, torch.inference_mode(False):
            # What earlier copies used is let go here, where no capture can be running.
            self._graveyard.clear()
            slot, tensors, tokens, others = self._find_plan(state_dict, stats)
            plan = slot.plan
            versions = _versions(tensors) if check_versions is not None else None
            stats.plan_s = time.perf_counter() - t0
            staged_set = self._acquire(slot, stats)
            pending: PendingCopy | None = None
            completed = False
            try:
                t1 = time.perf_counter()
                if plan.device_regions:
                    pending = PendingCopy(self._graveyard)
                    self._launch_devices(plan, staged_set, stats, pending, marks)
                self._copy_cpu(plan, staged_set)
                copied = time.perf_counter()
                # Built while the device copies are still in flight: the dict needs no bytes.
                with gc_paused():
                    staged = rebuild(tokens, staged_set.handout(), tensors, others, plan.attr_index)
                if pending is not None and not leave_in_flight:
                    pending.wait()
                    copied = time.perf_counter()
                    t1 = min(t1, pending.t0)
                if pending is None or not leave_in_flight:
                    stats.copy_s = copied - t1
                    if self.config.checksum is Mode.ON:
                        # The copy is complete: device regions take the values their programs
                        # computed on the device; the rest (CPU sources) are hashed here.
                        checksum_staged_set(staged_set, stats, known=device_checksums(pending, staged_set))
                    else:
                        clear_checksums(staged_set)
                else:
                    clear_checksums(staged_set)  # still being copied: nothing to vouch for yet
                completed = True
            finally:
                if pending is not None and not (completed and leave_in_flight):
                    pending.wait()  # never hand the set back while a copy may still write into it
                    pending = None
                # A set whose copies may still be running counts as leased until they complete,
                # even once its dict was dropped (a new plan must not take its arena meanwhile).
                staged_set.pending = pending
                staged_set.done()
            if versions is not None and _versions(tensors) != versions:
                # Not handed out; and not kept alive by this frame in the error's traceback,
                # which would hold the arena for as long as anyone holds the error.
                del staged
                self._raise_modified(plan, tensors, versions, check_versions or "")
            stats.nbytes = plan.nbytes
            stats.tensors = len(plan.leaves)
            stats.regions = len(plan.regions)
            stats.complete_s = time.perf_counter() - t0
            self._finish(stats)
            return staged, pending

    @staticmethod
    def _raise_modified(plan: Plan, tensors: list[torch.Tensor], versions: list[int | None], hint: str) -> None:
        now = _versions(tensors)
        i = next(i for i, (a, b) in enumerate(zip(versions, now)) if a != b)
        raise SourceModifiedError(
            f"state_dict{plan.leaves[i].path} was written while it was being staged (its version "
            f"counter went from {versions[i]} to {now[i]}); this checkpoint's copy may mix two "
            f"steps and was not handed out. {hint}"
        )

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        """Bracket the chosen checkpoints with the CUDA profiler (``STAGER_PROFILE_CHECKPOINTS``);
        an asynchronous stage is bracketed on the staging thread, where its whole pipeline runs."""
        with self._counter_lock:
            self._calls += 1
            n = self._calls
        with self._window.stage(n):
            yield

    def caller_marks(self) -> dict | None:
        """Record, on the calling thread, an event on the current stream of every CUDA device
        this stager has staged from, the current device and every device with a context: what
        a pipeline run on another thread makes its side streams wait for. ``None`` without CUDA."""
        if not torch.cuda.is_available():
            return None
        devices = {d for slot in self._slots for d in slot.plan.device_regions if d.type == "cuda"}
        devices.add(torch.device("cuda", torch.cuda.current_device()))
        # Every device this process has touched, so that a first stage of a dict on another
        # device still waits for the caller's stream there (not for the staging thread's).
        has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        if has_context is not None:
            devices.update(torch.device("cuda", i) for i in range(torch.cuda.device_count()) if has_context(i))
        marks = {}
        for d in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            marks[d] = ev
        return marks

    # ---------------------------------------------------------------- planning

    @property
    def plan(self) -> Plan | None:
        """The plan used by the most recent stage (``None`` before the first ``stage()``)."""
        slots = self._slots
        return slots[0].plan if slots else None

    @property
    def plans(self) -> list[Plan]:
        """Every plan kept, most recently used first (at most ``max_plans``)."""
        return [slot.plan for slot in self._slots]

    @property
    def _sets(self) -> list[StagedSet]:
        """Every cached staged set of every plan kept (for inspection)."""
        return [s for slot in self._slots for s in slot.sets]

    def _find_plan(
        self, state_dict: Any, stats: StageStats
    ) -> tuple[_PlanSlot, list[torch.Tensor], list[tuple], list[Any]]:
        """Walk ``state_dict``; return the slot of the plan it matches (a new one when none
        does), its tensors, its structure tokens as walked now (equal to the plan's, but with
        this call's key objects) and its other leaves."""
        with nvtx.range("stager/plan", self.config.nvtx):
            tokens: list[tuple] = []
            tensors: list[torch.Tensor] = []
            others: list[Any] = []
            with gc_paused():
                try:
                    walk(state_dict, tokens, tensors, others)
                    for i, slot in enumerate(self._slots):
                        if slot.plan.matches(tokens, tensors):
                            if i:
                                self._demote(self._slots[0])
                                self._slots.insert(0, self._slots.pop(i))
                            return slot, tensors, tokens, others
                except (StagingInputError, RecursionError, RuntimeError, NotImplementedError):
                    pass  # walked again below, with key paths: the error names the leaf
            # Walk again with key paths, validate every leaf, lay out a new arena.
            paths: list[str] = []
            tokens, tensors, others = [], [], []
            try:
                walk(state_dict, tokens, tensors, others, paths)
            except RecursionError:
                raise StagingInputError(
                    find_cycle(state_dict) or "<root>",
                    "the state dict contains itself (a cycle) or nests deeper than Python's recursion limit",
                    "remove the cycle",
                ) from None
            plan = build_plan(
                tokens, tensors, paths, alignment=self.config.alignment, pack_threshold=self.config.pack_threshold
            )
            slot = self._add_plan(plan)
            stats.replanned = True
            return slot, tensors, tokens, others

    def _add_plan(self, plan: Plan) -> _PlanSlot:
        if self._slots:
            self._demote(self._slots[0])
        # A kept plan whose sources are all gone can never match again: its arenas become spares.
        for old in [slot for slot in self._slots if slot.plan.dead()]:
            self._slots.remove(old)
            self._drop_slot(old)
        slot = _PlanSlot(plan)
        self._slots.insert(0, slot)
        self.plans_built += 1
        while len(self._slots) > self.config.max_plans:
            self._drop_slot(self._slots.pop())
        log.debug(
            "stager: new plan, %d tensors in %d regions, %d bytes", len(plan.leaves), len(plan.regions), plan.arena_bytes
        )
        return slot

    def _demote(self, slot: _PlanSlot) -> None:
        """Another plan is in use: ``slot``'s plan keeps its layout and arenas but lets go of its
        sources (and, on a GPU, of the bindings and graphs that hold them)."""
        slot.plan.demote()
        for copier in self._copiers.values():
            copier.forget_plan(slot.plan)

    def _drop_slot(self, slot: _PlanSlot) -> None:
        """Let a plan go: its free arenas become spares, its sources and programs are dropped."""
        keep = self.config.max_arenas
        for s in slot.sets:
            if not s.leased() and len(self._spare_arenas) < keep:
                self._spare_arenas.append(s.arena)
        slot.sets = []
        for copier in self._copiers.values():
            copier.forget_plan(slot.plan)
        slot.plan.release_sources()

    # ---------------------------------------------------------------- arenas and leases

    def _want_pinned(self) -> bool:
        mode = self.config.pinned
        if mode is Mode.OFF:
            return False
        available = torch.cuda.is_available()
        if mode is Mode.ON and not available:
            log.warning("stager: STAGER_PINNED=on but CUDA is not available; the arena is not pinned")
        return available

    def _new_arena(self, plan: Plan, stats: StageStats) -> HostArena:
        for i, a in enumerate(self._spare_arenas):
            if a.nbytes >= plan.arena_bytes:
                return self._spare_arenas.pop(i)
        arena = HostArena(plan.arena_bytes, pinned=self._pinned, shared=self.config.shared_memory)
        stats.alloc_s += arena.alloc_s + arena.pin_s
        return arena

    def _cached_sets(self) -> int:
        return sum(len(slot.sets) for slot in self._slots)

    def _take_free_arena(self, plan: Plan) -> HostArena | None:
        """A free cached arena of another plan large enough for ``plan`` (least recent first)."""
        for slot in reversed(self._slots):
            if slot.plan is plan:
                continue
            for s in slot.sets:
                if s.arena.nbytes >= plan.arena_bytes and s.try_acquire():
                    slot.sets.remove(s)
                    return s.arena
        return None

    def _fresh_set(self, plan: Plan, stats: StageStats) -> StagedSet:
        arena = self._new_arena(plan, stats)
        s = StagedSet(plan, arena, cached=False)
        s.in_flight = True
        nbytes = arena.mapped_bytes
        pinned = nbytes if arena.pinned else 0
        with self._counter_lock:
            self._fresh_alive += 1
            self._fresh_bytes[0] += nbytes
            self._fresh_bytes[1] += pinned
        weakref.finalize(arena.array, self._fresh_released, nbytes, pinned)
        return s

    def _fresh_released(self, nbytes: int, pinned: int) -> None:
        with self._counter_lock:
            self._fresh_alive -= 1
            self._fresh_bytes[0] -= nbytes
            self._fresh_bytes[1] -= pinned

    def _acquire(self, slot: _PlanSlot, stats: StageStats) -> StagedSet:
        """Take the host arena for this stage, following :func:`stager.headroom.decide_host`.

        A free cached arena of the plan is reused without reading the headroom. Otherwise the
        host is read and the decision is one of: another cached arena (a free one of another
        plan when the cap is reached), a fresh arena (freed when its staged dict is released),
        waiting for a held arena (up to ``lease_timeout``), or ``StagingMemoryError``.
        """
        cfg = self.config
        plan = slot.plan
        t0 = time.perf_counter()
        deadline = t0 + cfg.lease_timeout
        delay = 1e-4
        collected = False
        inspected = False
        holders: list[str] = []
        while True:
            if cfg.cache_policy is not CachePolicy.FRESH:
                for s in slot.sets:
                    if s.try_acquire():
                        waited = time.perf_counter() - t0 if collected else 0.0
                        stats.waited_s = waited
                        stats.arena = "cached after wait" if waited else "cached"
                        stats.host_decision = HostDecision.REUSE.value
                        return s
                if self._cached_sets() >= cfg.max_arenas:
                    arena = self._take_free_arena(plan)
                    if arena is not None:
                        s = StagedSet(plan, arena, cached=True)
                        s.in_flight = True
                        slot.sets.append(s)
                        stats.arena = "cached"
                        stats.host_decision = HostDecision.REUSE.value
                        return s
            host = read_host(reserve_bytes=cfg.host_reserve, shared_memory=cfg.shared_memory)
            decision = self._decide(plan, host, cfg.cache_policy, cfg.lease_policy)
            if decision is not self._last_decision:
                log.info("stager: host arena decision %s (%s)", decision.value, host.source)
                self._last_decision = decision
            stats.host_decision = decision.value
            if decision is HostDecision.NEW_CACHED:
                s = StagedSet(plan, self._new_arena(plan, stats), cached=True)
                s.in_flight = True
                slot.sets.append(s)
                stats.arena = "new-cached"
                return s
            if decision is HostDecision.FRESH:
                stats.arena = "fresh"
                return self._fresh_set(plan, stats)
            # WAIT: a held arena (or a fresh one's memory) has to come back first.
            if not collected:
                gc.collect()  # a dropped staged dict caught in a reference cycle
                collected = True
                continue
            if not inspected and time.perf_counter() - t0 >= min(_INSPECT_AFTER_S, cfg.lease_timeout):
                inspected = True
                holders = traceback_holders(self._leased_ranges())
                if holders:
                    s = self._instead_of_waiting(plan, host, stats, holders)
                    if s is not None:
                        return s
                    raise LeaseTimeoutError(
                        "the host arena this stage would wait for is held by a failed write, which "
                        f"never releases it: {holders[0]}; the Future (or AsyncSaveResponse) of that "
                        "save keeps the exception alive: call its result() and handle the error, then "
                        "drop it, or pass the staged dict to GraphStager.release(); there is no host "
                        "memory for another arena meanwhile"
                    )
            if time.perf_counter() >= deadline:
                raise LeaseTimeoutError(
                    f"no host arena came free within {cfg.lease_timeout:g} s: {self._cached_sets()} cached "
                    f"and {self._fresh_alive} fresh arena(s) are still held by earlier staged dicts; "
                    "release the staged dicts (and their tensors) once written (a failed write's "
                    "Future holds its dict through the exception: handle and drop it), raise "
                    "STAGER_LEASE_TIMEOUT or STAGER_MAX_ARENAS, or set STAGER_LEASE_POLICY=allocate"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _leased_ranges(self) -> list[tuple[int, int]]:
        return [
            (s.arena.ptr, s.arena.ptr + s.arena.nbytes)
            for slot in self._slots
            for s in slot.sets
            if s.leased()
        ]

    def _decide(self, plan: Plan, host: Any, cache_policy: CachePolicy, lease_policy: LeasePolicy) -> HostDecision:
        """:func:`stager.headroom.decide_host` for ``plan`` with the arenas held now."""
        return decide_host(
            plan.arena_bytes,
            cached_arena_free=False,
            cached_arenas=self._cached_sets(),
            max_cached_arenas=self.config.max_arenas,
            host=host,
            cache_policy=cache_policy,
            lease_policy=lease_policy,
            fresh_leased=self._fresh_alive,
        )

    def _instead_of_waiting(
        self, plan: Plan, host: Any, stats: StageStats, holders: list[str]
    ) -> StagedSet | None:
        """The arena waited for is held by a failed write: take a fresh one if the host has room."""
        decision = self._decide(plan, host, CachePolicy.AUTO, LeasePolicy.ALLOCATE)
        if decision not in (HostDecision.FRESH, HostDecision.NEW_CACHED):
            return None
        log.warning(
            "stager: not waiting for a host arena held by a failed write (%s); staging into a fresh "
            "arena instead. Handle and drop the failed save's Future to give the memory back",
            holders[0],
        )
        stats.notes.append(f"a failed write holds an earlier copy: {holders[0]}")
        stats.arena = "fresh"
        stats.host_decision = HostDecision.FRESH.value
        return self._fresh_set(plan, stats)

    # ---------------------------------------------------------------- copying

    def _copy_cpu(self, plan: Plan, staged_set: StagedSet) -> None:
        # Many small CPU regions cost ~2 us of per-tensor overhead each inside _foreach_copy_, not
        # bandwidth: split them over up to torch.get_num_threads() threads (the op drops the GIL).
        n = len(plan.cpu_src)
        if not n:
            return
        parts = max(1, min(self._cpu_threads, n // _REGIONS_PER_THREAD))
        with nvtx.range("stager/copy", self.config.nvtx):
            if parts == 1:
                torch._foreach_copy_(staged_set.cpu_dst, plan.cpu_src)
                return
            if self._copy_pool is None:
                self._copy_pool = ThreadPoolExecutor(self._cpu_threads - 1, thread_name_prefix="stager-copy")
            first, *rest = staged_set.cpu_parts(parts)
            futures = [self._copy_pool.submit(torch._foreach_copy_, dst, src) for dst, src in rest]
            try:
                torch._foreach_copy_(*first)
            finally:
                for f in futures:
                    f.result()

    def _copier(self, device: torch.device) -> DeviceCopier:
        copier = self._copiers.get(device)
        if copier is None:
            copier = self._copiers[device] = DeviceCopier(device, self.config)
        return copier

    def _launch_devices(
        self, plan: Plan, staged_set: StagedSet, stats: StageStats, pending: PendingCopy, marks: dict | None
    ) -> None:
        """Queue the copies of every device's regions."""
        for device, idx in plan.device_regions.items():
            if device.type != "cuda":
                # Another accelerator: plain synchronous per-region copies.
                for i in idx:
                    staged_set.bases[i].copy_(plan.src_views[i])
                stats.device_path = "direct"
                stats.executor = "eager"
                continue
            mark = marks.get(device) if marks else None
            if mark is None:
                mark = torch.cuda.current_stream(device)  # synchronous: the calling thread's stream
            self._copier(device).launch(plan, staged_set, mark, stats, pending)
        stats.captures = sum(c.captures for c in self._copiers.values())
        stats.replays = sum(c.replays for c in self._copiers.values())

    # -- restore: see stager/restore.py

    def restore(self, staged: Any, into: Any) -> StageStats:
        """Copy a staged dict back into the live tensors of ``into``, in place and bit-exact.

        ``staged`` is what :meth:`stage` returned (a ``Future`` is waited for). ``into`` has the
        structure of the state dict that was staged (its tensors are written; non-tensor leaves
        are left alone). CPU targets: one ``_foreach_copy_``; CUDA targets: small tensors in runs
        of one chunk (one host-to-device copy from this stager's pinned arena and one
        ``unpack_scatter`` launch each), larger ones copied straight from the arena. Returns the
        restore's :class:`StageStats`.

        Raises:
            RestoreMismatchError: (a ``ValueError``) structure, shape or dtype differ, naming the
                key path; nothing was copied.
        """
        from stager.restore import restore_state

        if isinstance(staged, Future):  # what stage() returns with async staging
            staged = staged.result()
        arenas = [s.arena.tensor for slot in self._slots for s in slot.sets]
        cfg = self.config
        return restore_state(
            staged, into, nvtx_enabled=cfg.nvtx, host_buffers=arenas,
            pack_threshold=cfg.pack_threshold, chunk_bytes=cfg.chunk_size,
        )

    def _finish(self, stats: StageStats) -> None:
        if stats.copy_s > 0:
            stats.gbps = stats.nbytes / stats.copy_s / 1e9
            if self._copiers:
                link = next(iter(self._copiers.values())).link()  # read once per copier
                if link is not None:
                    stats.link_fraction = link.fraction(stats.gbps * 1e9)
        held = self.host_bytes()
        stats.host_bytes = held.total
        stats.pinned_bytes = held.pinned
        self.last_stats = stats
        record_stats(stats)
