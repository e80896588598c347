"""The arena pool: the plans a stager keeps, their host arenas, and which arena a stage takes.

A stager keeps up to ``max_plans`` plans (README.md, "Plan once, then replay"), each in a
:class:`PlanSlot` with the staged sets (cached arenas) laid out for it. A plan not in use is
*demoted*: it keeps its layout and arenas but lets go of its sources and, on a GPU, of the
bindings and graphs that hold them. A dropped plan's free arenas become spares for the next plan
(up to ``max_arenas``). :meth:`ArenaPool.acquire` chooses each stage's host arena; arenas made
for one checkpoint only (*fresh*) are counted until their staged dict is released.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from stager.arena import HostArena
from stager.config import StagerConfig
from stager.device import DeviceCopier
from stager.envs import CachePolicy, LeasePolicy
from stager.errors import LeaseTimeoutError
from stager.headroom import HostDecision, HostReading, decide_host, read_host
from stager.holders import traceback_holders
from stager.plan import Plan
from stager.staged_set import StagedSet
from stager.stats import ArenaSource, StageStats

__all__ = ["ArenaPool", "PlanSlot"]

log = logging.getLogger("stager")

_INSPECT_AFTER_S = 1.0  # waited this long for an arena: look for failed writes that hold one


@dataclass(eq=False)
class PlanSlot:
    """A plan kept by the stager, with the staged sets (cached arenas) laid out for it."""

    plan: Plan
    sets: list[StagedSet] = field(default_factory=list)


class ArenaPool:
    """The plans kept (most recently used first), their cached staged sets and the spare arenas.

    ``copiers`` are the stager's device copiers, told to forget a plan that is demoted or
    dropped; ``new_arena(nbytes)`` makes a host arena (pinned and shared as configured).
    The caller serializes :meth:`match`, :meth:`add` and :meth:`acquire` (the pipeline's lock).
    """

    def __init__(
        self,
        config: StagerConfig,
        copiers: dict[torch.device, DeviceCopier],
        new_arena: Callable[[int], HostArena],
    ) -> None:
        self.config = config
        self.slots: list[PlanSlot] = []
        self.spares: list[HostArena] = []
        self.plans_built = 0
        """How many times a plan was built (first stage and every change of the state dict)."""
        self._copiers = copiers
        self._make_arena = new_arena
        self._fresh_alive = 0
        self._fresh_bytes = [0, 0]  # total, pinned
        self._last_decision: HostDecision | None = None
        self.reset_after_fork()

    def reset_after_fork(self) -> None:
        """A fresh lock (a thread that held it does not exist in a forked child)."""
        self._counter_lock = threading.Lock()

    @property
    def sets(self) -> list[StagedSet]:
        """Every cached staged set of every plan kept."""
        return [s for slot in self.slots for s in slot.sets]

    def match(self, tokens: list[tuple], tensors: list[torch.Tensor]) -> PlanSlot | None:
        """The slot of the kept plan that matches a walked state dict (now the most recent)."""
        for i, slot in enumerate(self.slots):
            if slot.plan.matches(tokens, tensors):
                if i:
                    self._demote(self.slots[0])
                    self.slots.insert(0, self.slots.pop(i))
                return slot
        return None

    def add(self, plan: Plan) -> PlanSlot:
        """Keep a new plan as the most recent one; drop the oldest beyond ``max_plans``."""
        if self.slots:
            self._demote(self.slots[0])
        # A kept plan whose sources are all gone can never match again: its arenas become spares.
        for old in [slot for slot in self.slots if slot.plan.dead()]:
            self.slots.remove(old)
            self._drop(old)
        slot = PlanSlot(plan)
        self.slots.insert(0, slot)
        self.plans_built += 1
        while len(self.slots) > self.config.max_plans:
            self._drop(self.slots.pop())
        log.debug(
            "stager: new plan, %d tensors in %d regions, %d bytes",
            len(plan.leaves), len(plan.regions), plan.arena_bytes,
        )
        return slot

    def release_sources(self) -> None:
        """Drop every plan (their free arenas become spares)."""
        for slot in self.slots:
            self._drop(slot)
        self.slots = []

    def close(self) -> None:
        """Drop every plan's sources, the plans and the spare arenas."""
        for slot in self.slots:
            slot.plan.release_sources()
        self.slots = []
        self.spares = []

    def _demote(self, slot: PlanSlot) -> None:
        """Another plan is in use: ``slot``'s plan keeps its layout and arenas but lets go of its
        sources (and, on a GPU, of the bindings and graphs that hold them)."""
        slot.plan.demote()
        for copier in self._copiers.values():
            copier.forget_plan(slot.plan)

    def _drop(self, slot: PlanSlot) -> None:
        """Let a plan go: its free arenas become spares, its sources and programs are dropped."""
        keep = self.config.max_arenas
        for s in slot.sets:
            if not s.leased() and len(self.spares) < keep:
                self.spares.append(s.arena)
        slot.sets = []
        for copier in self._copiers.values():
            copier.forget_plan(slot.plan)
        slot.plan.release_sources()

    def held_bytes(self) -> tuple[int, int]:
        """``(total, pinned)`` host bytes of every arena alive: cached ones, spares, fresh ones."""
        with self._counter_lock:
            total, pinned = self._fresh_bytes
        seen: set[int] = set()
        arenas = [s.arena for slot in list(self.slots) for s in list(slot.sets)] + list(self.spares)
        for a in arenas:
            if id(a) in seen:
                continue
            seen.add(id(a))
            total += a.mapped_bytes
            pinned += a.mapped_bytes if a.pinned else 0
        return total, pinned

    def _new_arena(self, plan: Plan, stats: StageStats) -> HostArena:
        for i, a in enumerate(self.spares):
            if a.nbytes >= plan.arena_bytes:
                return self.spares.pop(i)
        arena = self._make_arena(plan.arena_bytes)
        stats.alloc_s += arena.alloc_s + arena.pin_s
        return arena

    def _cached_sets(self) -> int:
        return sum(len(slot.sets) for slot in self.slots)

    def _take_free_arena(self, plan: Plan) -> HostArena | None:
        """A free cached arena of another plan large enough for ``plan`` (least recent first)."""
        for slot in reversed(self.slots):
            if slot.plan is plan:
                continue
            for s in slot.sets:
                if s.arena.nbytes >= plan.arena_bytes and s.try_acquire():
                    slot.sets.remove(s)
                    return s.arena
        return None

    def _cached_set(self, slot: PlanSlot, arena: HostArena) -> StagedSet:
        s = StagedSet(slot.plan, arena, cached=True)
        s.in_flight = True
        slot.sets.append(s)
        return s

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

    def acquire(self, slot: PlanSlot, stats: StageStats) -> StagedSet:
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
                        stats.arena = ArenaSource.CACHED_AFTER_WAIT if waited else ArenaSource.CACHED
                        stats.host_decision = HostDecision.REUSE.value
                        return s
                if self._cached_sets() >= cfg.max_arenas:
                    arena = self._take_free_arena(plan)
                    if arena is not None:
                        stats.arena = ArenaSource.CACHED
                        stats.host_decision = HostDecision.REUSE.value
                        return self._cached_set(slot, arena)
            host = read_host(reserve_bytes=cfg.host_reserve, shared_memory=cfg.shared_memory)
            decision = self._decide(plan, host, cfg.cache_policy, cfg.lease_policy)
            if decision is not self._last_decision:
                log.info("stager: host arena decision %s (%s)", decision.value, host.source)
                self._last_decision = decision
            stats.host_decision = decision.value
            if decision is HostDecision.NEW_CACHED:
                s = self._cached_set(slot, self._new_arena(plan, stats))
                stats.arena = ArenaSource.NEW_CACHED
                return s
            if decision is HostDecision.FRESH:
                stats.arena = ArenaSource.FRESH
                return self._fresh_set(plan, stats)
            # WAIT: a held arena (or a fresh one's memory) has to come back first.
            if not collected:
                gc.collect()  # a dropped staged dict caught in a reference cycle
                collected = True
                continue
            if not inspected and time.perf_counter() - t0 >= min(_INSPECT_AFTER_S, cfg.lease_timeout):
                inspected = True
                leased = [(s.arena.ptr, s.arena.ptr + s.arena.nbytes) for s in self.sets if s.leased()]
                holders = traceback_holders(leased)
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

    def _decide(
        self, plan: Plan, host: HostReading, cache_policy: CachePolicy, lease_policy: LeasePolicy
    ) -> HostDecision:
        """:func:`stager.headroom.decide_host` for ``plan`` with the arenas held now."""
        return decide_host(
            plan.arena_bytes,
            cached_arenas=self._cached_sets(),
            max_cached_arenas=self.config.max_arenas,
            host=host,
            cache_policy=cache_policy,
            lease_policy=lease_policy,
            fresh_leased=self._fresh_alive,
        )

    def _instead_of_waiting(
        self, plan: Plan, host: HostReading, stats: StageStats, holders: list[str]
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
        stats.arena = ArenaSource.FRESH
        stats.host_decision = HostDecision.FRESH.value
        return self._fresh_set(plan, stats)
