"""The staging pipeline: the one path of every stage, from the plan check to the staged dict.

Every :class:`~stager.stager.GraphStager` entry point (``stage()``, ``stage_nowait()``,
``prewarm()``) runs :meth:`StagingPipeline._pipeline`, one call at a time: find the plan the dict
matches (bad input raises there, before anything is copied), take a host arena
(:mod:`stager.pool`), copy every region (CPU sources: ``_foreach_copy_``, over up to 8 threads
when there are many; device sources: the staging program on a side stream, see
:mod:`stager.device`), rebuild the dict around the staged tensors while device copies are in
flight, and wait for them (except ``stage_nowait``). Stats are filled and failures cleaned up in
that one function; plans are not changed once published.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch

from stager import nvtx
from stager.arena import HostArena
from stager.config import StagerConfig
from stager.device import DeviceCopier, PendingCopy, device_checksums
from stager.envs import Mode
from stager.errors import SourceModifiedError, StagingInputError
from stager.integrity import checksum_staged_set, clear_checksums
from stager.plan import Plan, build_plan, gc_paused
from stager.pool import ArenaPool, PlanSlot
from stager.staged_set import StagedSet
from stager.stats import DevicePath, Executor, StageStats
from stager.stats import record as record_stats
from stager.threads import worker_pool
from stager.tree import find_cycle, rebuild, walk

if TYPE_CHECKING:
    Marks = dict[torch.device, torch.cuda.Event]

__all__ = ["StagingPipeline"]

log = logging.getLogger("stager")

_REGIONS_PER_THREAD = 1024  # below this many CPU regions per thread, one thread copies them all
_BYTES_PER_THREAD = 4 << 20  # and below this many bytes per thread
_VERSION = attrgetter("_version")


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """Every tensor's version counter (``None`` for an inference tensor, which has none)."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:  # an inference tensor: no counter, so no write to it can be seen
        return [None if t.is_inference() else t._version for t in tensors]


class StagingPipeline:
    """The pipeline behind a stager: its plans and arenas (an :class:`~stager.pool.ArenaPool`),
    its device copiers, and the one function that carries a stage through."""

    def __init__(self, config: StagerConfig) -> None:
        self.config = config
        self.last_stats: StageStats | None = None
        """Statistics of the most recent ``stage()`` call."""
        self._pinned = self._want_pinned()
        self._cpu_threads = max(1, min(8, torch.get_num_threads()))
        self._copiers: dict[torch.device, DeviceCopier] = {}
        self._pool = ArenaPool(config, self._copiers, self._new_arena)
        self._init_pipeline_locks()

    def _reset_after_fork(self) -> None:
        """Fresh locks, no thread pool and no device copier: none of them works in a forked child."""
        self._init_pipeline_locks()
        self._pool.reset_after_fork()
        self._copiers.clear()

    def _init_pipeline_locks(self) -> None:
        self._lock = threading.RLock()  # the pipeline: one stage at a time
        self._copy_pool: ThreadPoolExecutor | None = None
        self._graveyard: list[list[object]] = []  # see PendingCopy: emptied at the start of each stage

    def _want_pinned(self) -> bool:
        mode = self.config.pinned
        if mode is Mode.OFF:
            return False
        available = torch.cuda.is_available()
        if mode is Mode.ON and not available:
            log.warning("stager: STAGER_PINNED=on but CUDA is not available; the arena is not pinned")
        return available

    def _new_arena(self, nbytes: int) -> HostArena:
        return HostArena(nbytes, pinned=self._pinned, shared=self.config.shared_memory)

    def _pipeline(
        self,
        state_dict: Any,
        stats: StageStats,
        t0: float,
        marks: Marks | None,
        *,
        leave_in_flight: bool = False,
        check_versions: str | None = None,
    ) -> tuple[Any, PendingCopy | None]:
        """Carry one stage from the plan check to the staged dict; the only place that does.

        ``marks``: what the caller's streams were at call time (``GraphStager.caller_marks``);
        ``None`` makes the side streams wait for the current streams of this thread.
        ``leave_in_flight`` returns with device copies still running (their
        :class:`~stager.device.PendingCopy` is returned and the set stays leased until they
        complete). ``check_versions`` (what to do about it, for the message) fails the stage when a
        source's version counter moved between the walk and the end of the copy.
        """
        with self._lock, torch.inference_mode(False):
            # What earlier copies used is let go here, where no capture can be running.
            self._graveyard.clear()
            slot, tensors, tokens, others = self._find_plan(state_dict, stats)
            plan = slot.plan
            versions = _versions(tensors) if check_versions is not None else None
            stats.plan_s = time.perf_counter() - t0
            staged_set = self._pool.acquire(slot, stats)
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
    def _raise_modified(
        plan: Plan, tensors: list[torch.Tensor], versions: list[int | None], hint: str
    ) -> None:
        now = _versions(tensors)
        i = next(i for i, (a, b) in enumerate(zip(versions, now)) if a != b)
        raise SourceModifiedError(
            f"state_dict{plan.leaves[i].path} was written while it was being staged (its version "
            f"counter went from {versions[i]} to {now[i]}); this checkpoint's copy may mix two "
            f"steps and was not handed out. {hint}"
        )

    def _find_plan(
        self, state_dict: Any, stats: StageStats
    ) -> tuple[PlanSlot, list[torch.Tensor], list[tuple], list[Any]]:
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
                    slot = self._pool.match(tokens, tensors)
                    if slot is not None:
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
            cfg = self.config
            plan = build_plan(
                tokens, tensors, paths, alignment=cfg.alignment, pack_threshold=cfg.pack_threshold
            )
            stats.replanned = True
            return self._pool.add(plan), tensors, tokens, others

    def _copy_cpu(self, plan: Plan, staged_set: StagedSet) -> None:
        # Many small CPU regions cost ~2 us of per-tensor overhead each inside _foreach_copy_, and
        # large ones bandwidth: split the bytes over up to min(8, torch.get_num_threads()) threads
        # (the op drops the GIL), each running on itself alone (see stager.threads).
        n = len(plan.cpu_src)
        if not n:
            return
        wanted = n // _REGIONS_PER_THREAD
        if torch.get_num_threads() == 1:  # one of the stager's threads: no OpenMP to split the bytes
            wanted = max(wanted, staged_set.cpu_bytes // _BYTES_PER_THREAD)
        parts = max(1, min(self._cpu_threads, wanted))
        with nvtx.range("stager/copy", self.config.nvtx):
            if parts == 1:
                torch._foreach_copy_(staged_set.cpu_dst, plan.cpu_src)
                return
            if self._copy_pool is None:
                self._copy_pool = worker_pool(self._cpu_threads - 1, "stager-copy")
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
        self, plan: Plan, staged_set: StagedSet, stats: StageStats, pending: PendingCopy, marks: Marks | None
    ) -> None:
        """Queue the copies of every device's regions."""
        for device, idx in plan.device_regions.items():
            if device.type != "cuda":
                # Another accelerator: plain synchronous per-region copies.
                for i in idx:
                    staged_set.bases[i].copy_(plan.src_views[i])
                stats.device_path = DevicePath.DIRECT
                stats.executor = Executor.EAGER
                continue
            mark = marks.get(device) if marks else None
            if mark is None:
                mark = torch.cuda.current_stream(device)  # synchronous: the calling thread's stream
            self._copier(device).launch(plan, staged_set, mark, stats, pending)
        stats.captures = sum(c.captures for c in self._copiers.values())
        stats.replays = sum(c.replays for c in self._copiers.values())

    def _finish(self, stats: StageStats) -> None:
        if stats.copy_s > 0:
            stats.gbps = stats.nbytes / stats.copy_s / 1e9
            if self._copiers:
                link = next(iter(self._copiers.values())).link()  # read once per copier
                if link is not None:
                    stats.link_fraction = link.fraction(stats.gbps * 1e9)
        stats.host_bytes, stats.pinned_bytes = self._pool.held_bytes()
        self.last_stats = stats
        record_stats(stats)
