"""The sent buffer's layout: where each region of a staged dict sits in the bytes on the wire.

A sender describes a staged dict once per layout (:func:`outbound_layout`) and sends the
description (a pickled plan) only when the receiver lacks it. When every region lies in one known
host arena, the buffer is that arena's span itself (zero copy); otherwise :func:`pack_buffer`
copies the regions into a host buffer. The receiver rebuilds a source-less plan over the same
layout (:func:`receive_plan`) and leases arenas for it like the stager's own.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

from stager.arena import HostArena
from stager.errors import ReplicationError
from stager.plan import Plan, Region, TensorSignature, build_plan, tensor_signature
from stager.segments import find_segment
from stager.staged_set import StagedSet
from stager.tree import walk


@dataclass
class Outbound:
    """What a sender knows about one staged-dict layout (cached per destination)."""

    key: int
    tokens: list[tuple]
    signature: TensorSignature
    meta: bytes
    """The pickled (tokens, leaves, regions, buffer bytes) the receiver rebuilds its plan from."""
    buffer_bytes: int
    offsets: list[int]
    """Offset of every region in the sent buffer."""
    anchors: list[tuple[int, int]]
    """Per region: (index of one tensor in it, byte offset of the region in that tensor's storage)."""
    sizes: list[int]
    """Bytes of every region."""
    segment_lo: int | None
    """When every region lies in one known arena: the address the sent buffer starts at."""
    src_addrs: list[int] = field(default_factory=list)
    """Address of each region's first byte when the entry was made (checked on reuse)."""
    pack: HostArena | None = None

    def holds(self, tokens: list[tuple], tensors: list[torch.Tensor]) -> bool:
        """Whether ``tokens`` and ``tensors`` (a walk of a staged dict) still fit this layout.

        The signature alone does not say so: the same addresses can come back grouped into
        storages differently (separate tensors one call, views of one storage the next), and a
        region read through its anchor's storage would then be the wrong bytes.
        """
        if not (self.signature.matches(tensors) and self.tokens == tokens):
            return False
        for (i, off), addr, size in zip(self.anchors, self.src_addrs, self.sizes):
            if i < 0:
                continue
            st = tensors[i].untyped_storage()
            if st.data_ptr() + off != addr or off + size > st.nbytes():
                return False
        return True

    def region_bytes(self, tensors: list[torch.Tensor], r: int) -> torch.Tensor:
        """Region ``r``'s bytes, read through its anchor tensor's storage."""
        i, off = self.anchors[r]
        storage = tensors[i].untyped_storage()
        return torch.empty(0, dtype=torch.uint8).set_(storage, off, (self.sizes[r],), (1,))


def outbound_layout(staged: object, alignment: int, key: int) -> Outbound:
    """Describe ``staged`` (a dict of host tensors) for sending, under the random ``key``."""
    paths: list[str] = []
    tokens: list[tuple] = []
    tensors: list[torch.Tensor] = []
    walk(staged, tokens, tensors, [], paths)
    plan = build_plan(tokens, tensors, paths, alignment=alignment)
    for r in plan.regions:
        if r.device.type != "cpu":
            path = next(leaf.path for leaf in plan.leaves if leaf.region == r.index)
            raise ReplicationError(
                f"replicate() sends staged (host) dicts, but state_dict{path} is on {r.device}; "
                "send what GraphStager.stage() returned"
            )
    ptrs = list(plan.src_ptrs)
    plan.release_sources()  # holding them would keep the stager's arena leased
    anchors: list[tuple[int, int]] = [(-1, 0)] * len(plan.regions)
    for i, leaf in enumerate(plan.leaves):
        if leaf.region >= 0 and anchors[leaf.region][0] < 0:
            anchors[leaf.region] = (i, plan.regions[leaf.region].src_offset)
    segment_lo = None
    if ptrs:
        lo = min(ptrs)
        hi = max(p + r.nbytes for p, r in zip(ptrs, plan.regions))
        if find_segment(lo, hi - lo) is not None:
            segment_lo = lo
            offsets = [p - lo for p in ptrs]
            buffer_bytes = hi - lo
    if segment_lo is None:
        offsets = [r.arena_offset for r in plan.regions]
        buffer_bytes = plan.arena_bytes if plan.regions else 0
    regions = [
        Region(index=r.index, device=torch.device("cpu"), nbytes=r.nbytes, arena_offset=o, src_offset=0)
        for r, o in zip(plan.regions, offsets)
    ]
    try:
        meta = pickle.dumps((tokens, plan.leaves, regions, buffer_bytes), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise ReplicationError(
            f"the structure of the staged dict cannot be pickled for the partner ({type(exc).__name__}: "
            f"{exc}); every container class and DTensor spec must be importable by the receiver"
        ) from None
    return Outbound(
        key=key,
        tokens=tokens,
        signature=tensor_signature(tensors),
        meta=meta,
        buffer_bytes=buffer_bytes,
        offsets=offsets,
        anchors=anchors,
        sizes=[r.nbytes for r in regions],
        segment_lo=segment_lo,
        src_addrs=ptrs,
    )


def pack_buffer(entry: Outbound, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The bytes to send and whether they are the arena span itself (else the regions were
    packed into a host buffer)."""
    n = entry.buffer_bytes
    if n == 0:
        return torch.empty(0, dtype=torch.uint8), False
    if entry.segment_lo is not None:
        seg = find_segment(entry.segment_lo, n)
        if seg is not None:
            start = entry.segment_lo - seg.base
            whole = seg.tensor()
            if whole is not None:
                return whole[start : start + n], True
    if entry.pack is None or entry.pack.nbytes < n:
        entry.pack = HostArena(n)
    buf = entry.pack.tensor[:n]
    dst = [buf[o : o + size] for o, size in zip(entry.offsets, entry.sizes)]
    torch._foreach_copy_(dst, [entry.region_bytes(tensors, r) for r in range(len(entry.sizes))])
    return buf, False


def receive_plan(meta: bytes, src: int) -> Plan:
    """A plan over the sender's buffer layout, with no sources (only its arena layout is used)."""
    try:
        tokens, leaves, regions, buffer_bytes = pickle.loads(meta)
    except Exception as exc:
        raise ReplicationError(
            f"the plan sent by rank {src} cannot be unpickled here ({type(exc).__name__}: {exc})"
        ) from None
    return Plan(
        tokens=tokens,
        signature=TensorSignature([], [], [], []),
        leaves=leaves,
        regions=regions,
        arena_bytes=buffer_bytes,
        nbytes=sum(r.nbytes for r in regions),
        src_views=[],
        cpu_index=[r.index for r in regions],
        cpu_src=[],
        device_regions={},
    )


@dataclass
class Inbound:
    """What a receiver keeps for one sender layout: the plan and the arenas leased per replica."""

    plan: Plan
    sets: list[StagedSet] = field(default_factory=list)

    def lease(self, shared: bool, max_arenas: int) -> StagedSet:
        """A receive arena for one replica: a released cached one, else a new one (cached while
        fewer than ``max_arenas`` are)."""
        for s in self.sets:
            if s.try_acquire():
                return s
        arena = HostArena(max(self.plan.arena_bytes, 1), shared=shared)
        cached = len(self.sets) < max_arenas
        s = StagedSet(self.plan, arena, cached=cached)
        s.in_flight = True
        if cached:
            self.sets.append(s)
        return s
