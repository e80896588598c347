""":class:`Replicator`: what each rank sends its partner, and when (the rounds are in
:mod:`stager.distributed.wire`, the buffer's layout in :mod:`stager.distributed.layout`).

Per exchange, a sender describes its staged dict (a layout cached per destination, under a random
key), announces it, sends the plan and the non-tensor leaves only when the receiver asks for them,
then the buffer. A receiver keeps the last ``_PLANS_KEPT`` plans per source, each with the arenas
its replicas are leased from, and rebuilds each replica as a staged dict over one of them.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from stager.config import StagerConfig
from stager.distributed import wire
from stager.distributed.checksums import outbound_checksums, verify_received
from stager.distributed.layout import Inbound, Outbound, outbound_layout, pack_buffer, receive_plan
from stager.errors import PartnerFailedError, ReplicationError
from stager.plan import gc_paused
from stager.staged_set import StagedSet
from stager.tree import rebuild, walk

if TYPE_CHECKING:
    from stager.stager import GraphStager

log = logging.getLogger("stager")

DEFAULT_CHUNK_BYTES = 256 << 20
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
    """Whether region checksums went with the sent buffer (see :mod:`stager.distributed.checksums`)."""
    verified_regions: int = 0
    """Regions of the received replica whose bytes matched the checksums the sender sent."""
    checksum_s: float = 0.0
    """Time spent computing checksums to send and verifying the received replica."""


@dataclass
class _Peer:
    outbound: list[Outbound] = field(default_factory=list)
    last_others: bytes | None = None
    inbound: OrderedDict[int, Inbound] = field(default_factory=OrderedDict)
    others: tuple[int, list[Any], list[wire.Ref]] | None = None
    """(plan key, unpickled non-tensor leaves, the placeholders they reference) last received."""


@dataclass
class _Outgoing:
    """What this rank sends in one exchange (``entry`` None: nothing, or it failed)."""

    entry: Outbound | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)
    leaves: bytes = b""
    sums: torch.Tensor | None = None
    error: BaseException | None = None


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
        stager_or_config: GraphStager | StagerConfig | None = None,
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

    def _outbound(self, staged: Any, peer: _Peer) -> tuple[Outbound, list[torch.Tensor], list[Any]]:
        """The layout of ``staged`` toward ``peer`` (a cached one while it still fits), its
        tensors and its non-tensor leaves."""
        tokens: list[tuple] = []
        tensors: list[torch.Tensor] = []
        others: list[Any] = []
        with gc_paused():
            walk(staged, tokens, tensors, others)
        for entry in peer.outbound:
            if entry.holds(tokens, tensors):
                return entry, tensors, others
        entry = outbound_layout(staged, self.config.alignment, key=self._rng.getrandbits(62) + 1)
        peer.outbound.insert(0, entry)
        del peer.outbound[_PLANS_KEPT:]
        log.debug(
            "stager: replication plan %x, %d regions, %d bytes, %s", entry.key, len(entry.sizes),
            entry.buffer_bytes, "zero-copy" if entry.segment_lo is not None else "packed",
        )
        return entry, tensors, others

    def _prepare(self, staged: Any, dst: int, stats: ReplicationStats) -> _Outgoing:
        """What goes out to ``dst``; a failure is kept, to be told to the partner and re-raised."""
        out = _Outgoing()
        try:
            out.entry, out.tensors, others = self._outbound(staged, self._peer(dst))
            out.leaves = wire.encode_leaves(out.tensors, others, out.entry.tokens)
            t0 = time.perf_counter()
            out.sums = outbound_checksums(out.entry, out.tensors, self.config.checksum)
            if out.sums is not None:
                stats.checksum_s += time.perf_counter() - t0
        except Exception as exc:
            out.error = exc
        return out

    def _buffer(self, entry: Outbound, tensors: list[torch.Tensor], stats: ReplicationStats) -> torch.Tensor:
        """The bytes to send: the arena span itself, or the regions packed into a host buffer."""
        t0 = time.perf_counter()
        buf, stats.zero_copy = pack_buffer(entry, tensors)
        if entry.buffer_bytes and not stats.zero_copy:
            stats.pack_s = time.perf_counter() - t0
        return buf

    def _inbound(self, peer: _Peer, h_in: wire.Header, got: wire.Metadata, src: int) -> Inbound:
        """The receive plan for ``src``'s announced layout (from the plan it sent, else cached),
        with the non-tensor leaves it sent; checks the announced sizes against it."""
        key = h_in.plan_key
        if got.plan is not None:
            peer.inbound[key] = Inbound(receive_plan(got.plan, src))
            while len(peer.inbound) > _PLANS_KEPT:
                peer.inbound.popitem(last=False)
        inbound = peer.inbound[key]
        peer.inbound.move_to_end(key)
        if got.leaves is not None:
            peer.others = (key, *wire.decode_leaves(got.leaves, len(inbound.plan.leaves)))
        if inbound.plan.arena_bytes != h_in.buffer_bytes:
            raise ReplicationError(
                f"rank {src} announced {h_in.buffer_bytes} buffer bytes for a plan of "
                f"{inbound.plan.arena_bytes}"
            )
        if h_in.checksums and h_in.checksums != len(inbound.plan.regions):
            raise ReplicationError(
                f"rank {src} announced {h_in.checksums} checksums for a plan of "
                f"{len(inbound.plan.regions)} regions"
            )
        return inbound

    def _lease(self, inbound: Inbound) -> StagedSet:
        return inbound.lease(self.config.shared_memory, self.config.max_arenas)

    def _exchange(self, staged: Any, dst: int | None, src: int | None, failure: str | None = None) -> Any:
        if self._broken is not None:
            raise ReplicationError(f"this Replicator is unusable: {self._broken}; create a new one")
        t_start = time.perf_counter()
        stats = ReplicationStats()
        link = wire.Link(self.group, self.timeout)
        try:
            return self._protocol(staged, dst, src, failure, link, stats)
        finally:
            if link.broken is not None and self._broken is None:
                self._broken = link.broken
            stats.messages = link.messages
            stats.total_s = time.perf_counter() - t_start
            self.last_stats = stats

    def _protocol(
        self, staged: Any, dst: int | None, src: int | None, failure: str | None, link: wire.Link,
        stats: ReplicationStats,
    ) -> Any:
        out = self._prepare(staged, dst, stats) if dst is not None and failure is None else _Outgoing()
        if out.error is not None:
            failure = f"{type(out.error).__name__}: {out.error}"
        peer_in = self._peer(src) if src is not None else None
        h_out = self._header(out, failure, self._peer(dst)) if dst is not None else None
        h_in = wire.exchange_headers(link, h_out, dst, src)
        need = self._need(h_in, failure, peer_in) if h_in is not None and peer_in is not None else None
        reply = wire.exchange_replies(link, need, dst, src)
        err = failure.encode() if failure is not None else b""
        meta = out.entry.meta if out.entry is not None else b""
        sent = (h_out, reply, meta, out.leaves, err) if h_out is not None else None
        got = wire.exchange_metadata(link, sent, dst, h_in, need or 0, src)
        stats.plan_sent = got.plan_sent
        replica = self._transfer(out, h_in, got, reply, failure, link, stats, dst, src)
        if out.error is not None:
            raise out.error
        if got.error is not None:
            if failure is not None:
                log.warning("stager: rank %s failed too: %s", src, got.error)
                return None
            me = dist.get_rank()
            raise PartnerFailedError(f"rank {src} failed before replicating to rank {me}: {got.error}")
        return replica

    def _header(self, out: _Outgoing, failure: str | None, peer: _Peer) -> wire.Header:
        """Round 1's announcement: the layout's key and sizes, or that this rank failed."""
        if failure is not None or out.entry is None:
            error_len = len((failure or "").encode())
            return wire.Header(failed=True, chunk_bytes=self.chunk_bytes, error_len=error_len)
        e = out.entry
        return wire.Header(
            plan_key=e.key, buffer_bytes=e.buffer_bytes, chunk_bytes=self.chunk_bytes, plan_len=len(e.meta),
            leaves_len=len(out.leaves), leaves_changed=out.leaves != peer.last_others,
            checksums=out.sums.numel() if out.sums is not None else 0,
        )

    def _need(self, h_in: wire.Header, failure: str | None, peer: _Peer) -> int:
        """Round 2's reply: which of plan and leaves this receiver lacks, or that it aborts."""
        if failure is not None:
            return wire.ABORTED
        need = 0
        if not h_in.failed:
            if h_in.plan_key not in peer.inbound:
                need |= wire.NEED_PLAN
            if peer.others is None or peer.others[0] != h_in.plan_key:
                need |= wire.NEED_OTHERS
        return need

    def _transfer(
        self, out: _Outgoing, h_in: wire.Header | None, got: wire.Metadata, reply: int, failure: str | None,
        link: wire.Link, stats: ReplicationStats, dst: int | None, src: int | None,
    ) -> Any:
        """Round 4, when both ends of a direction are fine; the replica received, if any."""
        in_set: StagedSet | None = None
        recv = send = None
        posted = False
        try:
            if h_in is not None and src is not None and failure is None and not h_in.failed:
                inbound = self._inbound(self._peer(src), h_in, got, src)
                in_set = self._lease(inbound)
                sums_in = torch.empty(h_in.checksums, dtype=torch.int64) if h_in.checksums else None
                recv = (in_set.arena.tensor[: h_in.buffer_bytes], h_in.chunk_bytes, sums_in)
            if out.entry is not None and failure is None and not reply & wire.ABORTED:
                send = (self._buffer(out.entry, out.tensors, stats), self.chunk_bytes, out.sums)
                stats.checksums_sent = out.sums is not None
            t_wire = time.perf_counter()
            posted = True
            wire.exchange_buffers(link, recv, src, send, dst)
            stats.wire_s = time.perf_counter() - t_wire
            if send is not None and dst is not None:
                stats.sent_bytes = send[0].numel()
                self._peer(dst).last_others = out.leaves
            if in_set is None or recv is None or src is None:
                return None
            stats.received_bytes = recv[0].numel()
            t0 = time.perf_counter()
            try:
                verify_received(in_set, inbound.plan, recv[2], src)
            finally:
                stats.checksum_s += time.perf_counter() - t0
            stats.verified_regions = len(inbound.plan.regions) if recv[2] is not None else 0
            _, others_in, refs = self._peer(src).others
            # rebuild() deep-copies objects with memo {id(ref i): staged tensor i}.
            return rebuild(inbound.plan.tokens, in_set.handout(), refs, others_in)
        except BaseException as exc:
            if not posted:
                # The partner has posted its side of the buffer exchange; this side never will.
                # A later call would pair its header with the partner's stale chunks.
                link.broken = link.broken or (
                    f"replicate() failed between the metadata and the buffer ({type(exc).__name__}: {exc})"
                )
            raise
        finally:
            if in_set is not None:
                in_set.done()
