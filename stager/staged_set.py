"""Staged sets: the staged tensors of one plan over one host arena, and their leases.

Each region gets its own storage of exactly its bytes (``torch.frombuffer`` over the arena), each
leaf a tensor over that storage. A :class:`StagedSet` is created once and handed out again on
later stages while it is not *leased*: while nothing outside the stager references one of its
tensors or storages (its staged dict, a view, a writer's reference). The check compares the Python
reference counts of the staged tensors and the use counts of the staged storages with their values
when the set was built: two C-level passes over the leaves, no allocation.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from stager.arena import HostArena
    from stager.device import PendingCopy
    from stager.plan import Leaf, Plan

__all__ = ["StagedSet"]

_storage_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


def _make_leaf(leaf: "Leaf", storages: list[torch.UntypedStorage]) -> torch.Tensor:
    if leaf.region < 0:
        return torch.empty_strided(leaf.size, leaf.stride, dtype=leaf.dtype)
    return torch.empty(0, dtype=leaf.dtype).set_(storages[leaf.region], leaf.offset, leaf.size, leaf.stride)


class StagedSet:
    """The staged tensors of ``plan`` over ``arena``, built once and leased per ``stage()``.

    The set's own tensors are never handed out: each ``stage()`` gets new tensor objects over the
    same storages (:meth:`handout`), so nothing a holder does to its tensors (``resize_``, ``t_``,
    ``set_``, ``requires_grad_``, ``.grad``, attributes) reaches a later staged dict, and every
    handed-out tensor counts as a use of its storage for as long as it lives (the lease).
    """

    def __init__(self, plan: "Plan", arena: "HostArena", *, cached: bool) -> None:
        if arena.nbytes < plan.arena_bytes:
            raise ValueError(f"arena of {arena.nbytes} bytes is too small for a plan of {plan.arena_bytes}")
        self.plan = plan
        self.arena = arena
        self.cached = cached
        self.in_flight = False
        self.handed_out = False
        self.pending: PendingCopy | None = None
        """Device copies into this set that may still be running (``stage_nowait``), or ``None``."""
        self._lock = threading.Lock()
        self.bases: list[torch.Tensor] = []
        """One uint8 tensor per region, over the region's own storage (copy destinations)."""
        for r in plan.regions:
            self.bases.append(
                torch.frombuffer(arena.array, dtype=torch.uint8, count=r.nbytes, offset=r.arena_offset)
            )
        self.cpu_dst = [self.bases[i] for i in plan.cpu_index]
        self.cpu_bytes = sum(plan.regions[i].nbytes for i in plan.cpu_index)
        self._cpu_parts: dict[int, list[tuple[int, int, int, int]]] = {}
        storages = [b.untyped_storage() for b in self.bases]
        self.tensors: list[torch.Tensor] = [_make_leaf(leaf, storages) for leaf in plan.leaves]
        self._storages = storages
        self._cdata = [s._cdata for s in storages]
        self._baseline = self._counts()

    def handout(self) -> list[torch.Tensor]:
        """New tensors over the staged storages, one per leaf, with the planned metadata."""
        return list(map(torch.Tensor.detach, self.tensors))

    def cpu_parts(self, parts: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The CPU regions' ``(destinations, sources)`` cut into ``parts`` runs of equal bytes.

        A run is consecutive regions; a region at a cut is split there (its first bytes end one
        run, the rest start the next), so one large region is copied by several threads too. The
        cuts are found once; the views are cut on every call (a view of a staged storage kept
        here would count as a holder of the set, and the plan's ``cpu_src`` are new views after
        the plan is demoted and adopted again: old ones would keep the old storages alive).
        """
        runs = self._cpu_parts.get(parts)
        if runs is None:
            runs = self._cpu_parts[parts] = _byte_runs([t.numel() for t in self.cpu_dst], parts)
        src = self.plan.cpu_src
        return [(_cut(self.cpu_dst, *run), _cut(src, *run)) for run in runs]

    def _counts(self) -> tuple[list[int], list[int]]:
        # Python references to the (unique) Python storage objects, and C++ uses of the storages:
        # every handed-out tensor, view, detached tensor or writer's handle is one. The set's own
        # tensors are never handed out (see handout), so their references need no count.
        srefs = list(map(sys.getrefcount, self._storages))
        uses = list(map(_storage_use_count, self._cdata)) if _storage_use_count is not None else []
        return srefs, uses

    def leased(self) -> bool:
        """Whether anything outside the stager still holds a staged tensor or storage of this set.

        Without torch's storage use count (``torch._C._storage_Use_Count``) a view or storage
        held elsewhere cannot be seen, so a set that was handed out once counts as leased for
        good: later stages take other arenas (or wait) rather than risk overwriting a held copy.
        """
        if self.in_flight:
            return True
        if self.pending is not None:
            if not self.pending.query():
                return True  # a device copy may still write into the arena
            self.pending = None
        if _storage_use_count is None and self.handed_out:
            return True
        return self._counts() != self._baseline

    def try_acquire(self) -> bool:
        """Mark the set in flight if it is free; ``False`` if it is leased."""
        with self._lock:
            if self.leased():
                return False
            self.in_flight = True
            return True

    def done(self) -> None:
        """End the in-flight mark once the staged dict that holds the tensors exists."""
        self.handed_out = True
        self.in_flight = False


def _byte_runs(sizes: list[int], parts: int) -> list[tuple[int, int, int, int]]:
    """``(a, lo, b, hi)`` per run of about ``sum(sizes) / parts`` bytes: regions ``a`` to ``b``
    (inclusive), from byte ``lo`` of region ``a`` to byte ``hi`` (exclusive) of region ``b``."""
    total = sum(sizes)
    runs: list[tuple[int, int, int, int]] = []
    i = off = done = 0  # the next byte to copy: ``off`` of region ``i``; ``done`` bytes before it
    for k in range(1, parts + 1):
        a, lo, target = i, off, total * k // parts
        while done < target:
            take = min(sizes[i] - off, target - done)
            done, off = done + take, off + take
            if off == sizes[i]:
                i, off = i + 1, 0
        if (i, off) != (a, lo):
            runs.append((a, lo, i, off) if off else (a, lo, i - 1, sizes[i - 1]))
    return runs


def _cut(views: list[torch.Tensor], a: int, lo: int, b: int, hi: int) -> list[torch.Tensor]:
    """``views[a..b]`` with the first starting at byte ``lo`` and the last ending at ``hi``."""
    if a == b:
        return [views[a][lo:hi]]
    return [views[a][lo:], *views[a + 1 : b], views[b][:hi]]

