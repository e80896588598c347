"""``StageStats``: what one ``stage()`` call did and how long it took, and the string-valued enums
of its modes (:class:`Executor`, :class:`DevicePath`, :class:`ArenaSource`)."""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ArenaSource", "DevicePath", "Executor", "StageStats", "record", "latest"]

log = logging.getLogger("stager")

_latest: "StageStats | None" = None


class _Label(str, enum.Enum):
    """A string-valued mode that is its string everywhere: ``==``, hash (dict keys), f-strings."""

    def __str__(self) -> str:
        return str(self.value)

    __hash__ = str.__hash__


class Executor(_Label):
    """What ran the copies of a call (:attr:`StageStats.executor`)."""

    CPU = "cpu"  # CPU sources, copied on the host
    EAGER = "eager"  # the device staging program, run op by op
    GRAPH_CAPTURE = "graph-capture"  # the device staging program, captured as a CUDA graph in this call
    GRAPH_REPLAY = "graph-replay"  # a CUDA graph captured earlier, replayed
    RESTORE_CPU = "restore-cpu"  # a restore of CPU targets
    RESTORE_UNPACK = "restore-unpack"  # a restore onto a device, unpacked there


class DevicePath(_Label):
    """How the regions of a call travelled (:attr:`StageStats.device_path`)."""

    CPU = "cpu"  # CPU sources (or targets): no device involved
    PACKED = "packed"  # small regions packed into device chunks (Triton), the rest copied directly
    DIRECT = "direct"  # every region copied straight to (or from) its arena slot
    UNPACK = "unpack"  # a restore onto a device, unpacked there


class ArenaSource(_Label):
    """Which host arena a call staged into (:attr:`StageStats.arena`)."""

    NONE = ""  # no arena was taken (a restore)
    CACHED = "cached"  # a free persistent arena, reused
    CACHED_AFTER_WAIT = "cached after wait"  # a persistent arena, reused once its holder released it
    NEW_CACHED = "new-cached"  # a new persistent arena
    FRESH = "fresh"  # an arena for this call only, freed when its staged dict is released


@dataclass
class StageStats:
    """One ``stage()`` call, recorded on ``GraphStager.last_stats`` (and ``handle.stats``).

    Times are wall-clock seconds measured on the host. ``blocked_s`` is how long the caller of
    ``stage()`` waited; ``complete_s`` is from the start of the call until the staged copy was
    complete (equal to ``blocked_s`` for synchronous staging).
    """

    nbytes: int = 0
    """Bytes copied (sum of staged regions)."""
    tensors: int = 0
    """Tensor leaves in the state dict."""
    regions: int = 0
    """Distinct source storage spans copied."""
    arena: ArenaSource = ArenaSource.NONE
    """Host arena used (:class:`ArenaSource`)."""
    host_decision: str = ""
    """The headroom decision behind ``arena`` (see ``stager.headroom``)."""
    device_path: DevicePath = DevicePath.CPU
    """How the regions travelled (:class:`DevicePath`)."""
    executor: Executor = Executor.CPU
    """What ran the copies (:class:`Executor`)."""
    replanned: bool = False
    """Whether this call built a new plan (first call, or the state dict changed)."""
    blocked_s: float = 0.0
    """How long the call kept its caller waiting."""
    complete_s: float = 0.0
    """From the call to the staged copy being complete (equal to ``blocked_s`` unless async)."""
    plan_s: float = 0.0
    """Time spent walking the dict and checking (or building) the plan."""
    alloc_s: float = 0.0
    """Time spent allocating (and pinning) host memory in this call."""
    waited_s: float = 0.0
    """Time spent waiting for a held arena to come free."""
    copy_s: float = 0.0
    """From the first copy queued to the last one complete, as the host sees it (device copies
    are waited for after the staged dict is built, so a dict that takes longer to build than
    the copies take to run adds to this)."""
    checksum_s: float = 0.0
    """Time spent computing the staged copy's region checksums in this call (``STAGER_CHECKSUM``;
    a CPU pass on the staging thread after the copy, 0 when none was taken; on the GPU path they
    come from the staging kernels and cost no host time)."""
    verify_s: float = 0.0
    """Time spent verifying stored checksums (a restore hashes the staged copy again first)."""
    gbps: float = 0.0
    """``nbytes`` / ``copy_s`` in GB/s (10^9 bytes per second)."""
    link_fraction: float | None = None
    """``gbps`` as a fraction of the PCIe link's bandwidth, when NVML can read the link."""
    host_bytes: int = 0
    """Host bytes of the arenas this stager holds after the call (cached and fresh ones alive)."""
    pinned_bytes: int = 0
    """The part of ``host_bytes`` that is pinned (registered with CUDA)."""
    captures: int = 0
    """CUDA-graph captures so far on this stager."""
    replays: int = 0
    """CUDA-graph replays so far on this stager."""
    notes: list[str] = field(default_factory=list)
    """Anything worth knowing about this call: a fallback taken (capture failed, chunks shrunk or
    skipped for lack of device memory), a restore, tensors copied one by one."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field."""
        return dataclasses.asdict(self)

    def log(self) -> None:
        """Log the record at debug level on the ``stager`` logger."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stage: %s", self.to_dict())


def record(stats: StageStats) -> None:
    """Make ``stats`` the process-wide latest record (``stager.last_stats``) and log it."""
    global _latest
    _latest = stats
    stats.log()


def latest() -> StageStats | None:
    """The record of the most recent ``stage()`` in this process, by any stager."""
    return _latest
