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
        self._cpu_parts: dict[int, list[tuple[int, int, list[torch.Tensor]]]] = {}
        storages = [b.untyped_storage() for b in self.bases]
        self.tensors: list[torch.Tensor] = [_make_leaf(leaf, storages) for leaf in plan.leaves]
        self._storages = storages
        self._cdata = [s._cdata for s in storages]
        self._baseline = self._counts()

    def handout(self) -> list[torch.Tensor]:
        """New tensors over the staged storages, one per leaf, with the planned metadata."""
        return list(map(torch.Tensor.detach, self.tensors))

    def cpu_parts(self, parts: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The CPU regions' ``(destinations, sources)`` split into ``parts`` consecutive slices.

        The destinations' slices are made once; the sources are sliced from the plan's current
        ``cpu_src`` on every call (a plan that is demoted and adopted again gets new source views,
        and a cache of the old ones would keep the old storages alive and copy from them).
        """
        cached = self._cpu_parts.get(parts)
        if cached is None:
            n = len(self.cpu_dst)
            bounds = [n * i // parts for i in range(parts + 1)]
            cached = [(a, b, self.cpu_dst[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
            self._cpu_parts[parts] = cached
        src = self.plan.cpu_src
        return [(dst, src[a:b]) for a, b, dst in cached]

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
