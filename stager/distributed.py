"""Many ranks: peer replication of a staged copy as the packed arena, in a few large messages.

:class:`Replicator` sends a staged dict (what ``GraphStager.stage()`` returned) to a partner rank's
host memory over a ``torch.distributed`` process group, and receives the partner's, so that a rank
that dies can be restored from its partner's memory. PyTorch's experimental ``_ReplicationStager``
(over ``PGTransport``) pickles per-tensor metadata on every call and sends one message per tensor;
here a staged dict is one host buffer (the stager's arena) and goes as that buffer, split in chunks
of at most ``chunk_bytes`` (256 MiB), straight from the arena into the partner's receive arena.

Partners. In a group of ``world`` ranks, rank ``r`` sends to ``(r + world // 2) % world`` (its
*partner*, which then holds ``r``'s replica) and receives from ``(r - world // 2) % world`` (its
*source*). With an even world the two are the same rank and the pairs are symmetric.

Protocol, per direction, in four rounds (every operation is an ``isend``/``irecv`` pair posted
receive-first, so no ordering of ranks can deadlock, and every wait has the replicator's timeout):

1. header (8 int64): status, plan key, buffer bytes, chunk bytes, lengths of the pickled plan,
   the pickled non-tensor leaves and an error message;
2. reply (receiver to sender): which of plan and leaves the receiver needs;
3. those bytes (plan only when the receiver does not have it: it is cached under a random key per
   sender, so a restarted receiver simply asks again);
4. the buffer, in chunks, into an arena the receiver leases like the stager's own.

The replica is an ordinary staged dict: CPU tensors over per-region storages of a host arena
(shared when ``STAGER_SHARED_MEMORY=1``), DTensors with the sender's mesh and placements,
non-tensor leaves as sent. It can be written by DCP, sent back with :meth:`Replicator.send`, or
copied into live tensors with :func:`stager.restore.restore_state`.

Integrity. With ``STAGER_CHECKSUM`` not ``off``, the sender sends one checksum per region after
the buffer: those stored with the staged copy (computed when it was staged, or when a replica was
received: no pass over the bytes), else, with ``on``, computed from the regions just before
sending. The receiver hashes the received regions and compares; a difference (a byte changed in
transit, or in the sender's memory since the checksums were taken) raises
:class:`~stager.errors.IntegrityError` naming the key path, the replica is not returned and the
replicator stays usable. The verified checksums are stored with the replica, so a restore from it
(:func:`stager.restore.restore_state`) verifies it again first, and sending it back to a
restarted rank (:meth:`Replicator.send`) sends them along for that rank to verify on receipt.

Failures. A rank whose staging failed calls :meth:`Replicator.abort` (``stage_and_replicate`` does
it for you); its partner's ``replicate`` then raises :class:`PartnerFailedError` with that rank's
message at once, and both replicators stay usable. A rank that never arrives makes its partner
raise :class:`ReplicationTimeoutError` naming it after ``timeout`` seconds; the replicator is then
unusable (its group may hold unmatched messages): create a new one.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stager.arena import HostArena, StagedSet, find_segment
from stager.config import StagerConfig
from stager.errors import PartnerFailedError, ReplicationError, ReplicationTimeoutError
from stager.plan import Leaf, Plan, Region, TensorSignature, build_plan, gc_paused, tensor_signature
from stager.tree import Token, consumes, rebuild, walk

if TYPE_CHECKING:
    from stager.stager import GraphStager

__all__ = [
    "Replicator",
    "ReplicationStats",
    "ReplicationError",
    "ReplicationTimeoutError",
    "PartnerFailedError",
    "DEFAULT_CHUNK_BYTES",
]

log = logging.getLogger("stager")

DEFAULT_CHUNK_BYTES = 256 << 20
_MAGIC = 0x53544752  # "STGR"
_OK, _FAILED = 0, 1
_NEED_PLAN, _NEED_OTHERS, _ABORTED = 1, 2, 4
_HEADER = 10  # magic, status, plan key, buffer bytes, chunk bytes, plan len, leaves len, error len, leaves changed,
#             checksums that follow the buffer (0: none)
_PLANS_KEPT = 2  # plans cached per peer (each with its receive arenas)


@dataclass
class ReplicationStats:
    """One ``replicate``/``send``/``recv`` call."""

    sent_bytes: int = 0
    """Buffer bytes sent (the packed arena span)."""
    received_bytes: int = 0
    messages: int = 0
    """Messages this rank posted (headers, replies, metadata and chunks, both directions)."""
    plan_sent: bool = False
    """Whether the plan metadata went over the wire (first call, plan change, restarted peer)."""
    zero_copy: bool = False
    """Whether the sent buffer was the stager's arena itself (no packing copy)."""
    pack_s: float = 0.0
    wire_s: float = 0.0
    total_s: float = 0.0
    checksums_sent: bool = False
    """Whether region checksums went with the sent buffer (see Integrity in the module docstring)."""
    verified_regions: int = 0
    """Regions of the received replica whose bytes matched the checksums the sender sent."""
    checksum_s: float = 0.0
    """Time spent computing checksums to send and verifying the received replica."""


class _Ref:
    """Stands for staged tensor ``i`` inside pickled non-tensor leaves (and carries a subclass's
    attributes in its ``__dict__``)."""

    __slots__ = ("i", "__dict__")

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled itself
        raise TypeError("_Ref is a placeholder")


class _OthersPickler(pickle.Pickler):
    def __init__(self, buf: io.BytesIO, ids: dict[int, int]) -> None:
        super().__init__(buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.ids = ids

    def persistent_id(self, obj: Any) -> Any:
        found = self.ids.get(id(obj))
        if found is None and isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor:
            dtensor = sys.modules.get("torch.distributed.tensor")
            if dtensor is not None and isinstance(obj, dtensor.DTensor):
                raise ReplicationError(
                    "a DTensor inside an object (not a dict, list or tuple) cannot be replicated: its local "
                    "shard would travel by value; keep DTensors directly in the state dict's containers"
                )
        return found


class _OthersUnpickler(pickle.Unpickler):
    def __init__(self, buf: io.BytesIO, refs: list[_Ref]) -> None:
        super().__init__(buf)
        self.refs = refs

    def persistent_load(self, pid: Any) -> Any:
        return self.refs[pid]


@dataclass
class _Outbound:
    """What a sender knows about one staged-dict layout (cached per destination)."""

    key: int
    tokens: list[tuple]
    signature: TensorSignature
    meta: bytes
    buffer_bytes: int
    offsets: list[int]
    """Offset of every region in the sent buffer."""
    anchors: list[tuple[int, int]]
    """Per region: (index of one tensor in it, byte offset of the region in that tensor's storage)."""
    sizes: list[int]
    """Bytes of every region."""
    segment_lo: int | None
    src_addrs: list[int] = field(default_factory=list)
    """Address of each region's first byte when the entry was made (checked on reuse)."""
    """When every region lies in one known arena: the address the sent buffer starts at."""
    pack: HostArena | None = None


@dataclass
class _Inbound:
    """What a receiver keeps for one sender layout: the plan and the arenas leased per replica."""

    plan: Plan
    sets: list[StagedSet] = field(default_factory=list)


@dataclass
class _Peer:
    outbound: list[_Outbound] = field(default_factory=list)
    last_others: bytes | None = None
    inbound: "OrderedDict[int, _Inbound]" = field(default_factory=OrderedDict)
    others: tuple[int, list[Any], list[_Ref]] | None = None
    """(plan key, unpickled non-tensor leaves, the placeholders they reference) last received."""


class Replicator:
    """Replicate staged dicts to a partner rank's host memory, as packed arenas.

    Args:
        stager_or_config: the :class:`~stager.stager.GraphStager` whose staged dicts are sent
            (also used by :meth:`stage_and_replicate`), or a :class:`~stager.config.StagerConfig`
            (``None``: resolved from the environment). The config's ``shared_memory``,
            ``alignment`` and ``max_arenas`` apply to the receive arenas.
        group: the process group (gloo, or any backend that moves CPU tensors). ``None`` creates a
            private gloo group over all ranks, which is collective: every rank must construct its
            ``Replicator`` at the same point.
        timeout: seconds (or a ``timedelta``) any one wait may take before
            :class:`ReplicationTimeoutError`.
        chunk_bytes: the largest single message (default 256 MiB).
    """

    def __init__(
        self,
        stager_or_config: "GraphStager | StagerConfig | None" = None,
        *,
        group: dist.ProcessGroup | None = None,
        timeout: float | timedelta = 300.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ReplicationError(
                "Replicator needs an initialised torch.distributed process group "
                "(dist.init_process_group) with at least 2 ranks"
            )
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if not seconds > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.stager: GraphStager | None = None
        if isinstance(stager_or_config, StagerConfig):
            self.config = stager_or_config
        elif stager_or_config is None:
            self.config = StagerConfig.resolve()
        else:
            self.stager = stager_or_config
            self.config = stager_or_config.config
        self.timeout = timedelta(seconds=seconds)
        self.chunk_bytes = int(chunk_bytes)
        self.group = group if group is not None else dist.new_group(backend="gloo", timeout=self.timeout)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.world < 2:
            raise ReplicationError(f"replication needs a group of at least 2 ranks, got {self.world}")
        self.partner = self._global((self.rank + self.world // 2) % self.world)
        """Global rank this rank sends its staged dict to (it holds our replica)."""
        self.source = self._global((self.rank - self.world // 2) % self.world)
        """Global rank whose staged dict this rank receives (we hold its replica)."""
        self.last_stats: ReplicationStats | None = None
        self._peers: dict[int, _Peer] = {}
        self._broken: str | None = None
        self._rng = random.Random()

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _peer(self, rank: int) -> _Peer:
        return self._peers.setdefault(rank, _Peer())

    # ---------------------------------------------------------------- public API

    def replicate(self, staged: Any) -> Any:
        """Send ``staged`` to :attr:`partner` and return the replica received from :attr:`source`.

        Collective over the pairs: every rank of the group calls it (or :meth:`abort`).

        Raises:
            PartnerFailedError: the source rank called :meth:`abort` instead.
            ReplicationTimeoutError: a peer did not answer within the timeout.
            ReplicationError: anything else (the message names the peer and the phase).
        """
        return self._exchange(staged, self.partner, self.source)

    def send(self, staged: Any, dst: int) -> None:
        """Send ``staged`` to global rank ``dst``, which calls :meth:`recv` (e.g. to give a
        restarted rank back its replica)."""
        self._exchange(staged, dst, None)

    def recv(self, src: int) -> Any:
        """Receive a staged dict that global rank ``src`` sends with :meth:`send`."""
        return self._exchange(None, None, src)

    def abort(self, error: BaseException | str) -> None:
        """Tell :attr:`partner` that this rank will not replicate, instead of leaving it waiting.

        Takes the place of :meth:`replicate` on a rank whose staging failed; the partner's
        ``replicate`` raises :class:`PartnerFailedError` with ``error``'s message. Returns once the
        partner has been told (and this rank has heard from :attr:`source`). The exchange is
        complete on both sides, so the replicator stays usable for the next step.

        Raises:
            ReplicationTimeoutError: a peer did not answer within the timeout.
        """
        message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        self._exchange(None, self.partner, self.source, failure=message)

    def stage_and_replicate(self, state_dict: Any) -> tuple[Any, Any]:
        """``stager.stage(state_dict)`` then :meth:`replicate`; a staging error is reported to
        the partner with :meth:`abort` and re-raised. Returns ``(staged, replica)``."""
        if self.stager is None:
            raise ReplicationError("stage_and_replicate needs a Replicator built from a GraphStager")
        try:
            staged = self.stager.stage(state_dict)
            if isinstance(staged, Future):
                staged = staged.result()
        except BaseException as exc:
            self.abort(exc)
            raise
        return staged, self.replicate(staged)

    def close(self) -> None:
        """Drop cached plans and receive arenas (replicas already returned stay valid)."""
        self._peers.clear()

    # ---------------------------------------------------------------- sender side

    def _outbound(self, staged: Any, peer: _Peer) -> tuple[_Outbound, list[torch.Tensor], list[Any]]:
        tokens: list[tuple] = []
        tensors: list[torch.Tensor] = []
        others: list[Any] = []
        with gc_paused():
            walk(staged, tokens, tensors, others)
        for entry in peer.outbound:
            if entry.signature.matches(tensors) and entry.tokens == tokens and _regions_hold(entry, tensors):
                return entry, tensors, others
        paths: list[str] = []
        tokens, tensors, others = [], [], []
        walk(staged, tokens, tensors, others, paths)
        plan = build_plan(tokens, tensors, paths, alignment=self.config.alignment)
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
            seg = find_segment(lo, hi - lo)
            if seg is not None:
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
        entry = _Outbound(
            key=self._rng.getrandbits(62) + 1,
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
        peer.outbound.insert(0, entry)
        del peer.outbound[_PLANS_KEPT:]
        log.debug(
            "stager: replication plan %x, %d regions, %d bytes, %s",
            entry.key, len(regions), buffer_bytes, "zero-copy" if segment_lo is not None else "packed",
        )
        return entry, tensors, others

    def _buffer(self, entry: _Outbound, tensors: list[torch.Tensor], stats: ReplicationStats) -> torch.Tensor:
        """The bytes to send: the arena span itself, or the regions packed into a host buffer."""
        n = entry.buffer_bytes
        if n == 0:
            return torch.empty(0, dtype=torch.uint8)
        if entry.segment_lo is not None:
            seg = find_segment(entry.segment_lo, n)
            if seg is not None:
                stats.zero_copy = True
                start = entry.segment_lo - seg.base
                whole = seg.tensor()
                if whole is not None:
                    return whole[start : start + n]
        t0 = time.perf_counter()
        if entry.pack is None or entry.pack.nbytes < n:
            entry.pack = HostArena(n)
        buf = entry.pack.tensor[:n]
        dst, src = [], []
        for (i, off), o, size in zip(entry.anchors, entry.offsets, entry.sizes):
            dst.append(buf[o : o + size])
            src.append(torch.empty(0, dtype=torch.uint8).set_(tensors[i].untyped_storage(), off, (size,), (1,)))
        torch._foreach_copy_(dst, src)
        stats.pack_s = time.perf_counter() - t0
        return buf

    @staticmethod
    def _pickle_others(tensors: list[torch.Tensor], others: list[Any], tokens: list[tuple]) -> bytes:
        """The non-tensor leaves (and tensor-subclass attributes), tensors pickled as indices."""
        subclass_attrs: dict[int, dict] = {}
        others = list(others)
        i = j = 0  # index into tensors, into others
        for tok in tokens:
            if tok[0] is Token.SUBTENSOR and getattr(tensors[i], "__dict__", None):
                subclass_attrs[i] = tensors[i].__dict__
            elif tok[0] is Token.DICT and tok[1] is not dict:
                # A dict subclass is rebuilt from an emptied copy of itself: send it empty (its
                # values travel as leaves; a DTensor value must not be pickled by value).
                template = copy.copy(others[j])
                template.clear()
                others[j] = template
            n_tensors, n_others = consumes(tok)
            i += n_tensors
            j += n_others
        if not others and not subclass_attrs:
            return b""  # a flat dict of tensors: nothing to send
        ids = {id(t): i for i, t in enumerate(tensors)}
        buf = io.BytesIO()
        try:
            _OthersPickler(buf, ids).dump((others, subclass_attrs))
        except ReplicationError:
            raise
        except Exception as exc:
            raise ReplicationError(
                f"a non-tensor leaf of the staged dict cannot be pickled for the partner "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return buf.getvalue()

    def _outbound_checksums(
        self, entry: _Outbound, tensors: list[torch.Tensor], stats: ReplicationStats
    ) -> torch.Tensor | None:
        """One checksum per sent region, or None to send none (see Integrity above).

        A region that is exactly a staged region with a stored checksum takes it; the rest are
        computed from their bytes now when ``checksum`` is ``on``, or when some regions have
        stored checksums (``auto``: complete what the staging kernels left out).
        """
        from stager.envs import Mode
        from stager.integrity import region_checksums, region_of

        mode = self.config.checksum
        if mode is Mode.OFF or not entry.sizes:
            return None
        t0 = time.perf_counter()
        values: list[int | None] = []
        for (i, off), size in zip(entry.anchors, entry.sizes):
            v = None
            if i >= 0 and off == 0 and tensors[i].untyped_storage().nbytes() == size:
                hit = region_of(tensors[i])
                if hit is not None and hit[0].plan.regions[hit[1]].nbytes == size:
                    v = int(hit[0].checksums[hit[1]])
            values.append(v)
        missing = [r for r, v in enumerate(values) if v is None]
        if missing and mode is not Mode.ON and len(missing) == len(values):
            return None
        if missing:
            if any(entry.anchors[r][0] < 0 for r in missing):  # pragma: no cover - every region has a leaf
                return None
            bufs = []
            for r in missing:
                i, off = entry.anchors[r]
                bufs.append(
                    torch.empty(0, dtype=torch.uint8).set_(tensors[i].untyped_storage(), off, (entry.sizes[r],), (1,))
                )
            for r, v in zip(missing, region_checksums(bufs).tolist()):
                values[r] = v
        stats.checksum_s += time.perf_counter() - t0
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def _verify_received(
        in_set: StagedSet, plan: Plan, sums: torch.Tensor | None, src: int, stats: ReplicationStats
    ) -> None:
        """Hash the received regions and compare with the sender's checksums; keep them with the
        replica (or forget stale ones when none came)."""
        from stager.errors import IntegrityError
        from stager.integrity import clear_checksums, compute_set_checksums, format_checksum, store_checksums

        if sums is None:
            clear_checksums(in_set)
            return
        t0 = time.perf_counter()
        found = compute_set_checksums(in_set)
        bad = torch.nonzero(found != sums).flatten().tolist()
        stats.checksum_s += time.perf_counter() - t0
        if bad:
            clear_checksums(in_set)
            i = bad[0]
            path = next((leaf.path for leaf in plan.leaves if leaf.region == i), "")
            more = f", and {len(bad) - 1} more region(s) too" if len(bad) > 1 else ""
            raise IntegrityError(
                f"the replica from rank {src} arrived damaged: state_dict{path} does not match the checksum rank "
                f"{src} sent with it (region {i}, {plan.regions[i].nbytes} bytes: expected "
                f"{format_checksum(int(sums[i]))}, found {format_checksum(int(found[i]))}){more}; it changed in "
                f"transit or in rank {src}'s memory after its checksums were taken. The replica was not kept; "
                "replicate again (this Replicator is still usable)",
                path=f"state_dict{path}",
                expected=format_checksum(int(sums[i])),
                found=format_checksum(int(found[i])),
            )
        store_checksums(in_set, sums, seconds=time.perf_counter() - t0)
        stats.verified_regions = len(plan.regions)

    # ---------------------------------------------------------------- receiver side

    def _inbound(self, peer: _Peer, key: int, meta: bytes | None, src: int) -> _Inbound:
        if meta is not None:
            try:
                tokens, leaves, regions, buffer_bytes = pickle.loads(meta)
            except Exception as exc:
                raise ReplicationError(
                    f"the plan sent by rank {src} cannot be unpickled here ({type(exc).__name__}: {exc})"
                ) from None
            plan = _receive_plan(tokens, leaves, regions, buffer_bytes, self.config.alignment)
            peer.inbound[key] = _Inbound(plan)
            while len(peer.inbound) > _PLANS_KEPT:
                peer.inbound.popitem(last=False)
        inbound = peer.inbound[key]
        peer.inbound.move_to_end(key)
        return inbound

    def _lease(self, inbound: _Inbound) -> StagedSet:
        for s in inbound.sets:
            if s.try_acquire():
                return s
        arena = HostArena(max(inbound.plan.arena_bytes, 1), shared=self.config.shared_memory)
        cached = len(inbound.sets) < self.config.max_arenas
        s = StagedSet(inbound.plan, arena, cached=cached)
        s.in_flight = True
        if cached:
            inbound.sets.append(s)
        return s

    # ---------------------------------------------------------------- the protocol

    def _exchange(self, staged: Any, dst: int | None, src: int | None, failure: str | None = None) -> Any:
        if self._broken is not None:
            raise ReplicationError(f"this Replicator is unusable: {self._broken}; create a new one")
        t_start = time.perf_counter()
        stats = ReplicationStats()
        ops = _Ops(self, stats)
        try:
            return self._protocol(staged, dst, src, failure, ops, stats)
        finally:
            stats.total_s = time.perf_counter() - t_start
            self.last_stats = stats

    def _protocol(
        self, staged: Any, dst: int | None, src: int | None, failure: str | None,
        ops: "_Ops", stats: ReplicationStats,
    ) -> Any:
        # Prepare what goes out. A failure here is told to the partner, then re-raised.
        entry: _Outbound | None = None
        out_tensors: list[torch.Tensor] = []
        out_others = b""
        out_sums: torch.Tensor | None = None
        prep_error: BaseException | None = None
        if dst is not None and failure is None:
            try:
                entry, out_tensors, others = self._outbound(staged, self._peer(dst))
                out_others = self._pickle_others(out_tensors, others, entry.tokens)
                out_sums = self._outbound_checksums(entry, out_tensors, stats)
            except Exception as exc:
                prep_error = exc
                failure = f"{type(exc).__name__}: {exc}"
        err = failure.encode() if failure is not None else b""
        peer_out = self._peer(dst) if dst is not None else None
        peer_in = self._peer(src) if src is not None else None

        # 1. headers
        h_out = None
        if dst is not None:
            changed = int(entry is not None and out_others != peer_out.last_others)
            h_out = torch.tensor(
                [_MAGIC, _FAILED if failure is not None else _OK, entry.key if entry else 0,
                 entry.buffer_bytes if entry else 0, self.chunk_bytes, len(entry.meta) if entry else 0,
                 len(out_others), len(err), changed,
                 out_sums.numel() if out_sums is not None and failure is None else 0],
                dtype=torch.int64,
            )
        h_in_t = torch.zeros(_HEADER, dtype=torch.int64) if src is not None else None
        ops.run("header", recv=(h_in_t, src), send=(h_out, dst))
        h_in = h_in_t.tolist() if h_in_t is not None else None
        if h_in is not None and (h_in[0] != _MAGIC or h_in[4] < 1 or h_in[3] < 0):
            raise ReplicationError(f"rank {src} sent something that is not a stager replication header: {h_in}")
        src_failed = h_in is not None and h_in[1] == _FAILED

        # 2. replies: what each receiver needs, or that it will not take the buffer
        reply_out = None
        if h_in is not None:
            need = 0
            if failure is not None:
                need = _ABORTED
            elif not src_failed:
                if h_in[2] not in peer_in.inbound:
                    need |= _NEED_PLAN
                if peer_in.others is None or peer_in.others[0] != h_in[2]:
                    need |= _NEED_OTHERS
            reply_out = torch.tensor([need], dtype=torch.int64)
        reply_in_t = torch.zeros(1, dtype=torch.int64) if h_out is not None else None
        ops.run("reply", recv=(reply_in_t, dst), send=(reply_out, src))
        reply_in = int(reply_in_t.item()) if reply_in_t is not None else 0

        # 3. bytes: a failed sender's message, or the plan / non-tensor leaves the receiver lacks
        blob_out = None
        send_plan = False
        if h_out is not None:
            send_plan, send_others = _blob_parts(failure is not None, reply_in, bool(h_out[8]))
            if failure is not None:
                blob_out = err
            else:
                blob_out = (entry.meta if send_plan else b"") + (out_others if send_others else b"")
        plan_len = others_len = blob_in_len = 0
        want_others = False
        if h_in is not None:
            reply = int(reply_out.item())
            want_plan, want_others = _blob_parts(src_failed, reply, bool(h_in[8]))
            if src_failed:
                blob_in_len = h_in[7]
            else:
                plan_len = h_in[5] if want_plan else 0
                others_len = h_in[6] if want_others else 0
                blob_in_len = plan_len + others_len
        blob_in = torch.empty(blob_in_len, dtype=torch.uint8) if blob_in_len else None
        blob_out_t = _bytes_tensor(blob_out) if blob_out else None
        ops.run("metadata", recv=(blob_in, src), send=(blob_out_t, dst))
        raw_in = blob_in.numpy().tobytes() if blob_in is not None else b""
        stats.plan_sent = send_plan

        # 4. the buffer, in chunks, when both ends of a direction are fine
        in_set: StagedSet | None = None
        inbound: _Inbound | None = None
        recv_view = send_view = None
        sums_in: torch.Tensor | None = None
        posted = False
        try:
            if h_in is not None and failure is None and not src_failed:
                key = h_in[2]
                inbound = self._inbound(peer_in, key, raw_in[:plan_len] if plan_len else None, src)
                if want_others:
                    refs = [_Ref(i) for i in range(len(inbound.plan.leaves))]
                    others_in: list[Any] = []
                    if others_len:
                        others_in, attrs = _OthersUnpickler(io.BytesIO(raw_in[plan_len:]), refs).load()
                        for i, d in attrs.items():
                            refs[i].__dict__.update(d)
                    peer_in.others = (key, others_in, refs)
                if inbound.plan.arena_bytes != h_in[3]:
                    raise ReplicationError(
                        f"rank {src} announced {h_in[3]} buffer bytes for a plan of {inbound.plan.arena_bytes}"
                    )
                if h_in[9] and h_in[9] != len(inbound.plan.regions):
                    raise ReplicationError(
                        f"rank {src} announced {h_in[9]} checksums for a plan of {len(inbound.plan.regions)} regions"
                    )
                in_set = self._lease(inbound)
                recv_view = in_set.arena.tensor[: h_in[3]]
                sums_in = torch.empty(h_in[9], dtype=torch.int64) if h_in[9] else None
            if entry is not None and failure is None and not (reply_in & _ABORTED):
                send_view = self._buffer(entry, out_tensors, stats)
            t_wire = time.perf_counter()
            posted = True
            recvs = [(c, src) for c in _chunks(recv_view, h_in[4])] if recv_view is not None else []
            sends = [(c, dst) for c in _chunks(send_view, self.chunk_bytes)] if send_view is not None else []
            if sums_in is not None:
                recvs.append((sums_in, src))
            if send_view is not None and out_sums is not None:
                sends.append((out_sums, dst))
                stats.checksums_sent = True
            ops.run_many("buffer", recvs, sends)
            stats.wire_s = time.perf_counter() - t_wire
            if send_view is not None:
                stats.sent_bytes = send_view.numel()
                peer_out.last_others = out_others
            replica = None
            if in_set is not None:
                stats.received_bytes = recv_view.numel()
                self._verify_received(in_set, inbound.plan, sums_in, src, stats)
                _, others_in, refs = peer_in.others
                # rebuild() deep-copies objects with memo {id(ref i): staged tensor i}.
                replica = rebuild(inbound.plan.tokens, in_set.handout(), refs, others_in)
        except BaseException as exc:
            if not posted and self._broken is None:
                # The partner has posted its side of the buffer exchange; this side never will.
                # A later call would pair its header with the partner's stale chunks.
                self._broken = f"replicate() failed between the metadata and the buffer ({type(exc).__name__}: {exc})"
            raise
        finally:
            if in_set is not None:
                in_set.done()

        if prep_error is not None:
            raise prep_error
        if src_failed:
            message = raw_in.decode(errors="replace")
            if failure is not None:
                log.warning("stager: rank %s failed too: %s", src, message)
                return None
            raise PartnerFailedError(f"rank {src} failed before replicating to rank {dist.get_rank()}: {message}")
        return replica


def _regions_hold(entry: _Outbound, tensors: list[torch.Tensor]) -> bool:
    """Whether every region of ``entry`` is still where it was, inside its anchor tensor's storage.

    The signature alone does not say so: the same addresses can come back grouped into storages
    differently (separate tensors one call, views of one storage the next), and a region read
    through its anchor's storage would then be the wrong bytes.
    """
    for (i, off), addr, size in zip(entry.anchors, entry.src_addrs, entry.sizes):
        if i < 0:
            continue
        st = tensors[i].untyped_storage()
        if st.data_ptr() + off != addr or off + size > st.nbytes():
            return False
    return True


def _blob_parts(sender_failed: bool, reply: int, changed: bool) -> tuple[bool, bool]:
    """(plan sent, leaves sent) for one direction, as both ends compute it."""
    if sender_failed or reply & _ABORTED:
        return False, False
    return bool(reply & _NEED_PLAN), bool(reply & _NEED_OTHERS) or changed


class _Ops:
    """Posts isend/irecv pairs receive-first and waits for them with the replicator's timeout."""

    def __init__(self, rep: Replicator, stats: ReplicationStats) -> None:
        self.rep = rep
        self.stats = stats

    def run(self, phase: str, *, recv: tuple[torch.Tensor | None, int | None], send: tuple[Any, int | None]) -> None:
        r = [(recv[0], recv[1])] if recv[0] is not None and recv[1] is not None else []
        s = [(send[0], send[1])] if send[0] is not None and send[1] is not None else []
        self.run_many(phase, r, s)

    def run_many(self, phase: str, recvs: list[tuple[torch.Tensor, int]], sends: list[tuple[torch.Tensor, int]]) -> None:
        rep = self.rep
        works: list[tuple[Any, int, str]] = []
        try:
            for t, peer in recvs:
                works.append((dist.irecv(t, src=peer, group=rep.group), peer, "receive"))
            for t, peer in sends:
                works.append((dist.isend(t, dst=peer, group=rep.group), peer, "send"))
        except RuntimeError as exc:
            peer = (recvs or sends)[0][1]
            rep._broken = f"posting the {phase} messages failed ({exc})"
            raise ReplicationError(f"could not post the {phase} messages to/from rank {peer}: {exc}") from None
        self.stats.messages += len(works)
        for w, peer, what in works:
            try:
                w.wait(rep.timeout)
            except RuntimeError as exc:
                text = str(exc)
                me = dist.get_rank()
                rep._broken = f"the {phase} {what} with rank {peer} failed ({text.splitlines()[0] if text else exc!r})"
                if "timed out" in text.lower() or "timeout" in text.lower():
                    raise ReplicationTimeoutError(
                        f"rank {me}: rank {peer} did not {'send' if what == 'receive' else 'receive'} the "
                        f"replication {phase} within {rep.timeout.total_seconds():g} s; it may have "
                        "failed before replicating (see its log) or be stuck. This Replicator is now "
                        "unusable: create a new one"
                    ) from None
                raise ReplicationError(
                    f"rank {me}: replication {phase} {what} with rank {peer} failed: {text.splitlines()[0] if text else exc!r}"
                ) from None


def _chunks(buf: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    n = buf.numel()
    return [buf[i : i + chunk] for i in range(0, n, chunk)]


def _bytes_tensor(b: bytes) -> torch.Tensor:
    if not b:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _receive_plan(
    tokens: list[tuple], leaves: list[Leaf], regions: list[Region], buffer_bytes: int, alignment: int
) -> Plan:
    """A plan over the sender's buffer layout, with no sources (only its arena layout is used)."""
    return Plan(
        tokens=tokens,
        signature=TensorSignature([], [], [], []),
        leaves=leaves,
        regions=regions,
        arena_bytes=buffer_bytes,
        nbytes=sum(r.nbytes for r in regions),
        alignment=alignment,
        src_views=[],
        devices=[torch.device("cpu")] if regions else [],
        cpu_index=[r.index for r in regions],
        cpu_src=[],
        device_regions={},
    )
