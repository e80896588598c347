"""``GraphStager``: a drop-in ``AsyncStager`` for ``torch.distributed.checkpoint.async_save``.

Every entry point runs one pipeline (:mod:`stager.pipeline`), one call at a time, over the plans
and host arenas of an arena pool (:mod:`stager.pool`). With ``async_staging`` on, ``stage()`` only
records what must be fixed at call time -- on a GPU, an event on the caller's current stream of
each device the stager has staged from, which the side stream waits on, so the copy sees exactly
the state at the call -- and hands the pipeline to the staging thread. Its ``Future`` resolves
when the copy is complete; as DCP's contract says, the sources must not be written until then.
One stager may be called from several threads; a forked child gets fresh locks and thread pools.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from stager import nvtx, shm
from stager.config import StagerConfig
from stager.device import PendingCopy
from stager.errors import StagerClosedError
from stager.pipeline import StagingPipeline
from stager.plan import Plan
from stager.pool import PlanSlot
from stager.segments import find_segment
from stager.staged_set import StagedSet
from stager.stats import StageStats
from stager.threads import worker_pool
from stager.tree import walk

if TYPE_CHECKING:
    from stager.pipeline import Marks

__all__ = ["GraphStager", "HostBytes"]

_ASYNC_HINT = (
    "Wait for staging to complete before the next optimizer step: "
    "response.staging_completion.result() or stager.synchronize_staging()"
)


@dataclass(frozen=True)
class HostBytes:
    """Host memory held by a stager's arenas (see :meth:`GraphStager.host_bytes`)."""

    total: int
    """Bytes of every arena alive: cached ones, spares and fresh ones still held."""
    pinned: int
    """The part of ``total`` registered with CUDA (page-locked)."""


_STAGERS: "weakref.WeakSet[GraphStager]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Locks may have been held by a thread that does not exist in the child, and pool threads are
    # gone: a child that used an inherited stager would wait for ever. Give each a fresh start.
    for s in list(_STAGERS):
        s._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class GraphStager(StagingPipeline):
    """Stage state dicts into host memory with cached plans and leased, reusable host arenas.

    Implements DCP's ``AsyncStager`` protocol, so it plugs into
    ``dcp.async_save(state_dict, checkpoint_id=path, async_stager=GraphStager())``.

    Args:
        config: a resolved :class:`~stager.config.StagerConfig`; by default one is resolved from
            the profile and the ``STAGER_*`` environment.
        **overrides: config fields to set explicitly (they win over everything else).

    What a staged copy is: README.md, "What a staged copy is"; a later ``stage()`` never overwrites it.
    """

    _synchronize_after_execute = False  # DCP's AsyncStager protocol attribute

    def __init__(self, config: StagerConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = StagerConfig.resolve(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if config.shared_memory:
            # Arenas may be created on the staging thread, where no signal handler can be
            # installed: set up the SIGTERM clean-up of this process's /dev/shm files now.
            shm.install_sigterm_cleanup()
        super().__init__(config)
        self._closed = False
        self._calls = 0  # stage() calls so far, for the profiler window
        self._window = nvtx.profiler_window(config)
        self._init_concurrency()
        _STAGERS.add(self)

    def _init_concurrency(self) -> None:
        self._counter_lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())
        self._active = 0  # entry-point calls running now (close() waits for them)
        self._executor: ThreadPoolExecutor | None = None
        self._staging_ident: int | None = None  # the staging thread, once it has run a stage
        self._future: Future | None = None

    def _reset_after_fork(self) -> None:
        super()._reset_after_fork()
        self._init_concurrency()

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
                    self._executor = worker_pool(1, "stager")
            # The caller's Future is not the one the stager keeps (to wait on in
            # synchronize_staging and close): a Future holding the staged dict would keep its
            # arena leased after the caller dropped it.
            self._future = self._executor.submit(self._run_async, state_dict, stats, t0, marks, result)
            stats.blocked_s = time.perf_counter() - t0
            return result

    def _run_async(
        self, state_dict: Any, stats: StageStats, t0: float, marks: Marks | None, result: Future
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
        self, state_dict: Any, marks: Marks | None = None, *, check_versions: str | None = None
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
            self._pool.close()

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
            staged_set = self._pool.acquire(slot, stats)
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
            self._pool.release_sources()

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
        total, pinned = self._pool.held_bytes()
        return HostBytes(total=total, pinned=pinned)

    def _synchronize_quietly(self) -> None:
        """Wait for the last asynchronous stage, ignoring its outcome (its caller sees it)."""
        future = self._future
        if future is not None and not self._on_staging_thread():
            with contextlib.suppress(BaseException):
                future.result()

    @contextlib.contextmanager
    def _profiled(self) -> Iterator[None]:
        """Bracket the chosen checkpoints with the CUDA profiler (``STAGER_PROFILE_CHECKPOINTS``);
        an asynchronous stage is bracketed on the staging thread, where its whole pipeline runs."""
        with self._counter_lock:
            self._calls += 1
            n = self._calls
        with self._window.stage(n):
            yield

    def caller_marks(self) -> Marks | None:
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
            count = torch.cuda.device_count()
            devices.update(torch.device("cuda", i) for i in range(count) if has_context(i))
        marks = {}
        for d in devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            marks[d] = ev
        return marks

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
    def plans_built(self) -> int:
        """How many times a plan was built (first stage and every change of the state dict)."""
        return self._pool.plans_built

    @property
    def _slots(self) -> list[PlanSlot]:
        """The plans kept, most recently used first, with their cached staged sets."""
        return self._pool.slots

    @property
    def _sets(self) -> list[StagedSet]:
        """Every cached staged set of every plan kept (for inspection)."""
        return self._pool.sets

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
        arenas = [s.arena.tensor for s in self._sets]
        cfg = self.config
        return restore_state(
            staged, into, nvtx_enabled=cfg.nvtx, host_buffers=arenas,
            pack_threshold=cfg.pack_threshold, chunk_bytes=cfg.chunk_size,
        )
