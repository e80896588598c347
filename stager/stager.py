"""``GraphStager``: a drop-in ``AsyncStager`` for ``torch.distributed.checkpoint.async_save``.

One ``stage()`` call:

1. walks the state dict and checks it against the cached plan (re-plans when it changed; bad
   input raises here, before anything is copied);
2. takes a host arena for the staged copy: a free cached one, another one, a fresh one or, per the
   lease policy, waits for one to come free (see :mod:`stager.headroom`);
3. copies every source region into its slot (CPU sources: ``_foreach_copy_``, split over up to
   ``torch.get_num_threads()`` threads when there are many; device sources: the staging program
   on a low-priority side stream, replayed as CUDA graphs, see :mod:`stager.device` and
   :mod:`stager.graphs`);
4. rebuilds the nested structure around the staged tensors and deep-copies the other leaves.

With ``async_staging`` on, ``stage()`` returns a ``concurrent.futures.Future`` of the staged dict,
as DCP's ``DefaultStager`` does. For device sources, steps 2-3 still run in ``stage()``, on the
caller's thread, because they only *queue* the copies (a side stream waits on the device for the
caller's current stream, then one graph replay); a background thread waits for the done event and
then rebuilds the dict (step 4). CPU sources are copied on that thread.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import torch

from stager import nvtx
from stager.arena import HostArena, StagedSet
from stager.config import StagerConfig
from stager.device import DeviceCopier, PendingCopy
from stager.envs import CachePolicy, Mode
from stager.headroom import HostDecision, decide_host, read_host, read_link
from stager.errors import LeaseTimeoutError, StagerClosedError, StagingInputError
from stager.plan import Plan, build_plan, find_cycle, gc_paused, rebuild, walk
from stager.stats import StageStats
from stager.stats import record as record_stats

__all__ = ["GraphStager"]

log = logging.getLogger("stager")

_REGIONS_PER_THREAD = 1024  # below this many CPU regions per thread, one thread copies them all


class GraphStager:
    """Stage state dicts into host memory with a cached plan and leased, reusable host arenas.

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
        self._plan: Plan | None = None
        self._sets: list[StagedSet] = []
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(threading.Lock())
        self._active = 0  # stage()/stage_nowait() calls running now
        self.last_stats: StageStats | None = None
        """Statistics of the most recent ``stage()`` call."""
        self.plans_built = 0
        """How many times a plan was built (first stage and every change of the state dict)."""
        self._pinned = self._want_pinned()
        self._spare_arenas: list[HostArena] = []
        self._cpu_threads = max(1, min(8, torch.get_num_threads()))
        self._copy_pool: ThreadPoolExecutor | None = None
        self._fresh_alive = 0
        self._last_decision: HostDecision | None = None
        self._copiers: dict[torch.device, DeviceCopier] = {}

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

        Raises:
            StagingInputError: a leaf cannot be staged (names its key path); nothing was copied.
            StagingMemoryError: no host memory for the copy under the configured limits.
            LeaseTimeoutError: the lease policy is ``wait`` and no arena came free in time.
            StagerClosedError: the stager was closed.
        """
        with self._call("stage"):
            return self._stage(state_dict)

    def _stage(self, state_dict: Any) -> Any:
        t0 = time.perf_counter()
        stats = StageStats()
        plan, tensors, tokens, others = self._check_plan(state_dict, stats)
        stats.plan_s = time.perf_counter() - t0
        if not self.config.async_staging:
            staged = self._stage_into(plan, tensors, tokens, others, stats, t0)
            stats.blocked_s = time.perf_counter() - t0
            self._finish(stats)
            return staged
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager")
        staged_set: StagedSet | None = None
        pending: PendingCopy | None = None
        if plan.device_regions:
            # Device sources: queue the copies here, behind the caller's current stream(s), so they
            # copy the values as of this call; the worker only waits for the done events.
            staged_set = self._acquire(plan, stats)
            pending = PendingCopy()
            try:
                self._launch_devices(plan, staged_set, stats, pending)
            except BaseException:
                pending.wait()
                staged_set.done()
                raise

        # The caller's Future is not the one the stager keeps (to wait on in synchronize_staging,
        # re-planning and close): holding the staged dict in a Future of its own would keep its
        # arena leased after the caller dropped it.
        result: Future = Future()

        def run() -> None:
            wanted = result.set_running_or_notify_cancel()  # False: cancelled, still finish and release
            try:
                staged = self._stage_into(plan, tensors, tokens, others, stats, t0, staged_set, pending)
                self._finish(stats)
            except BaseException as exc:
                if wanted:
                    result.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            if wanted:
                result.set_result(staged)

        self._future = self._executor.submit(run)
        stats.blocked_s = time.perf_counter() - t0
        return result

    def stage_nowait(self, state_dict: Any) -> tuple[Any, PendingCopy | None]:
        """Stage ``state_dict`` but leave the device copies in flight (for :func:`stager.wrap`).

        Returns ``(staged, pending)``: the staged dict, whose tensors hold their final bytes only
        once ``pending`` (a :class:`~stager.device.PendingCopy`, ``None`` when no copy is left in
        flight) has completed -- on the host with ``pending.wait()``, or on the device by making a
        stream wait on each of ``pending.events``. Until then the sources must not be written
        (make the writing stream wait on the events first) and ``pending`` keeps them alive.
        CPU sources are copied before this returns. Ignores ``async_staging``.
        """
        with self._call("stage_nowait"):
            return self._stage_nowait(state_dict)

    def _stage_nowait(self, state_dict: Any) -> tuple[Any, PendingCopy | None]:
        t0 = time.perf_counter()
        stats = StageStats()
        plan, tensors, tokens, others = self._check_plan(state_dict, stats)
        stats.plan_s = time.perf_counter() - t0
        staged_set = self._acquire(plan, stats)
        pending: PendingCopy | None = None
        try:
            if plan.device_regions:
                pending = PendingCopy()
                try:
                    self._launch_devices(plan, staged_set, stats, pending)
                except BaseException:
                    pending.wait()
                    raise
            self._copy_cpu(plan, staged_set)
            with gc_paused():
                staged = rebuild(tokens, staged_set.handout(), tensors, others)
        finally:
            # The staged dict now holds the lease; a later stage on the same device is queued on
            # the same side stream, behind these copies. Should the dict be dropped before they
            # complete, the set still counts as leased until they have (a new plan must not
            # take its arena while they may write into it).
            staged_set.pending = pending
            staged_set.done()
        stats.nbytes = plan.nbytes
        stats.tensors = len(plan.leaves)
        stats.regions = len(plan.regions)
        stats.blocked_s = time.perf_counter() - t0
        self._finish(stats)
        return staged, pending

    def synchronize_staging(self) -> None:
        """Wait until the last asynchronous ``stage()`` is complete (no-op when synchronous)."""
        if self._future is not None:
            self._future.result()

    def close(self) -> None:
        """Wait for staging in flight, then drop the plan, its source references and the arenas.

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
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)
            self._copy_pool = None
        self._sets.clear()
        for copier in self._copiers.values():
            copier.close()
        self._copiers.clear()
        if self._plan is not None:
            self._plan.release_sources()
        self._plan = None

    @contextlib.contextmanager
    def _call(self, name: str) -> Iterator[None]:
        """One ``stage()``/``stage_nowait()`` call: refused once closed, waited for by ``close()``."""
        with self._idle:
            if self._closed:
                raise StagerClosedError(f"{name}() called on a closed GraphStager; create a new one")
            self._active += 1
        try:
            # Arenas, chunks and staged tensors made inside torch.inference_mode() would be
            # inference tensors, which no later stage outside it may write or hand out.
            with torch.inference_mode(False):
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

    # ---------------------------------------------------------------- planning

    @property
    def plan(self) -> Plan | None:
        """The current plan (``None`` before the first ``stage()``)."""
        return self._plan

    def _check_plan(
        self, state_dict: Any, stats: StageStats
    ) -> tuple[Plan, list[torch.Tensor], list[tuple], list[Any]]:
        """Walk ``state_dict``; return the plan to stage it with (re-planned when it changed), its
        tensors, its structure tokens as walked now (equal to the plan's, but with this call's
        key objects) and its other leaves."""
        with nvtx.range("stager/plan", self.config.nvtx):
            return self._check_plan_inner(state_dict, stats)

    def _check_plan_inner(
        self, state_dict: Any, stats: StageStats
    ) -> tuple[Plan, list[torch.Tensor], list[tuple], list[Any]]:
        tokens: list[tuple] = []
        tensors: list[torch.Tensor] = []
        others: list[Any] = []
        plan = self._plan
        with gc_paused():
            try:
                walk(state_dict, tokens, tensors, others)
                if plan is not None and plan.matches(tokens, tensors):
                    return plan, tensors, tokens, others
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
        new_plan = build_plan(
            tokens, tensors, paths, alignment=self.config.alignment, pack_threshold=self.config.pack_threshold
        )
        self._replace_plan(new_plan)
        stats.replanned = True
        return new_plan, tensors, tokens, others

    def _replace_plan(self, plan: Plan) -> None:
        if self._future is not None and not self._future.done():
            self._future.result()  # the worker must not be using the old plan's sets
        old = self._plan
        self._plan = plan
        self.plans_built += 1
        # Arenas of free cached sets are reused by the new plan when large enough.
        self._spare_arenas = [
            s.arena for s in self._sets if not s.leased() and s.arena.nbytes >= plan.arena_bytes
        ][: self.config.max_arenas]
        self._sets = []
        for copier in self._copiers.values():
            copier.forget_plan()  # its bindings hold the old plan's sources
        if old is not None:
            old.release_sources()
        log.debug("stager: new plan, %d tensors in %d regions, %d bytes", len(plan.leaves), len(plan.regions), plan.arena_bytes)

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
        if self._spare_arenas:
            return self._spare_arenas.pop()
        arena = HostArena(plan.arena_bytes, pinned=self._pinned, shared=self.config.shared_memory)
        stats.alloc_s += arena.alloc_s + arena.pin_s
        return arena

    def _fresh_set(self, plan: Plan, stats: StageStats) -> StagedSet:
        s = StagedSet(plan, self._new_arena(plan, stats), cached=False)
        s.in_flight = True
        with self._lock:
            self._fresh_alive += 1
        weakref.finalize(s.arena.array, self._fresh_released)
        return s

    def _fresh_released(self) -> None:
        with self._lock:
            self._fresh_alive -= 1

    def _acquire(self, plan: Plan, stats: StageStats) -> StagedSet:
        """Take the host arena for this stage, following :func:`stager.headroom.decide_host`.

        A free cached arena is reused without reading the headroom. Otherwise the host is read and
        the decision is one of: another cached arena, a fresh arena (freed when its staged dict is
        released), waiting for a held arena (up to ``lease_timeout``), or ``StagingMemoryError``.
        """
        cfg = self.config
        t0 = time.perf_counter()
        deadline = t0 + cfg.lease_timeout
        delay = 1e-4
        collected = False
        while True:
            if cfg.cache_policy is not CachePolicy.FRESH:
                for s in self._sets:
                    if s.try_acquire():
                        waited = time.perf_counter() - t0 if collected else 0.0
                        stats.waited_s = waited
                        stats.arena = "cached after wait" if waited else "cached"
                        stats.host_decision = HostDecision.REUSE.value
                        return s
            host = read_host(reserve_bytes=cfg.host_reserve, shared_memory=cfg.shared_memory)
            decision = decide_host(
                plan.arena_bytes,
                cached_arena_free=False,
                cached_arenas=len(self._sets),
                max_cached_arenas=cfg.max_arenas,
                host=host,
                cache_policy=cfg.cache_policy,
                lease_policy=cfg.lease_policy,
                fresh_leased=self._fresh_alive,
            )
            if decision is not self._last_decision:
                log.info("stager: host arena decision %s (%s)", decision.value, host.source)
                self._last_decision = decision
            stats.host_decision = decision.value
            if decision is HostDecision.NEW_CACHED:
                s = StagedSet(plan, self._new_arena(plan, stats), cached=True)
                s.in_flight = True
                self._sets.append(s)
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
            if time.perf_counter() >= deadline:
                raise LeaseTimeoutError(
                    f"no host arena came free within {cfg.lease_timeout:g} s: {len(self._sets)} cached "
                    f"and {self._fresh_alive} fresh arena(s) are still held by earlier staged dicts; "
                    "release the staged dicts (and their tensors) once written, raise "
                    "STAGER_LEASE_TIMEOUT or STAGER_MAX_ARENAS, or set STAGER_LEASE_POLICY=allocate"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    # ---------------------------------------------------------------- copying

    def _stage_into(
        self,
        plan: Plan,
        tensors: list[torch.Tensor],
        tokens: list[tuple],
        others: list[Any],
        stats: StageStats,
        t0: float,
        staged_set: StagedSet | None = None,
        pending: PendingCopy | None = None,
    ) -> Any:
        """Copy into a staged set and rebuild the dict around it.

        ``staged_set`` and ``pending`` are given when the device copies were already queued (by an
        asynchronous ``stage()`` on the caller's thread); this then only waits for them.
        """
        if staged_set is None:
            staged_set = self._acquire(plan, stats)
        try:
            t1 = time.perf_counter()
            if pending is None and plan.device_regions:
                pending = PendingCopy()
                self._launch_devices(plan, staged_set, stats, pending)
            self._copy_cpu(plan, staged_set)
            copied = time.perf_counter()
            # Built while the device copies are still in flight: the dict does not need their bytes.
            with gc_paused():
                staged = rebuild(tokens, staged_set.handout(), tensors, others)
            if pending is not None:
                pending.wait()
                copied = time.perf_counter()
                t1 = min(t1, pending.t0)
            stats.copy_s = copied - t1
        finally:
            if pending is not None:
                pending.wait()  # never hand the set back while a copy may still write into it
            staged_set.done()
        stats.nbytes = plan.nbytes
        stats.tensors = len(plan.leaves)
        stats.regions = len(plan.regions)
        stats.complete_s = time.perf_counter() - t0
        return staged

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

    def _launch_devices(self, plan: Plan, staged_set: StagedSet, stats: StageStats, pending: PendingCopy) -> None:
        """Queue the copies of every device's regions (call on the caller's thread)."""
        for device, idx in plan.device_regions.items():
            self._copy_device(plan, staged_set, device, idx, stats, pending)
        stats.captures = sum(c.captures for c in self._copiers.values())
        stats.replays = sum(c.replays for c in self._copiers.values())

    def _copy_device(
        self,
        plan: Plan,
        staged_set: StagedSet,
        device: torch.device,
        idx: list[int],
        stats: StageStats,
        pending: PendingCopy,
    ) -> None:
        if device.type != "cuda":
            # Another accelerator: plain synchronous per-region copies.
            for i in idx:
                staged_set.bases[i].copy_(plan.src_views[i])
            stats.device_path = "direct"
            stats.executor = "eager"
            return
        if device.index is None:  # pragma: no cover - storages always name their device index
            device = torch.device("cuda", torch.cuda.current_device())
        copier = self._copiers.get(device)
        if copier is None:
            copier = self._copiers[device] = DeviceCopier(device, self.config)
        # The caller's current stream on that device, read on the caller's thread.
        copier.launch(plan, staged_set, torch.cuda.current_stream(device), stats, pending)

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
        arenas = [s.arena.tensor for s in self._sets]
        cfg = self.config
        return restore_state(
            staged, into, nvtx_enabled=cfg.nvtx, host_buffers=arenas,
            pack_threshold=cfg.pack_threshold, chunk_bytes=cfg.chunk_size,
        )

    def _finish(self, stats: StageStats) -> None:
        if stats.copy_s > 0:
            stats.gbps = stats.nbytes / stats.copy_s / 1e9
            if self._copiers:
                link = read_link(next(iter(self._copiers)))  # cached after the first reading
                if link is not None:
                    stats.link_fraction = link.fraction(stats.gbps * 1e9)
        self.last_stats = stats
        record_stats(stats)
