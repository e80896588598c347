"""The replication wire protocol: four message rounds per direction, and how each is encoded.

Every round posts an ``isend``/``irecv`` pair per peer, receive first, so no ordering of ranks
can deadlock, and every wait has the replicator's timeout (:class:`Link`):

1. :func:`exchange_headers`: a :class:`Header` (10 int64: magic, status, plan key, buffer bytes,
   chunk bytes, lengths of the pickled plan, the pickled non-tensor leaves and an error message,
   whether the leaves changed, and how many checksums follow the buffer);
2. :func:`exchange_replies`: one int64 from receiver to sender, which of plan and leaves the
   receiver needs (``NEED_PLAN | NEED_OTHERS``), or ``ABORTED`` when it will not take the buffer;
3. :func:`exchange_metadata`: those bytes in one message (the plan only when the receiver does
   not have it), or a failed sender's error message;
4. :func:`exchange_buffers`: the buffer in chunks of at most the sender's chunk bytes, then the
   region checksums when the header announced them.

The non-tensor leaves travel pickled, each staged tensor replaced by its index
(:func:`encode_leaves`, :func:`decode_leaves`).
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
from dataclasses import astuple, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stager.errors import ReplicationError, ReplicationTimeoutError
from stager.tree import Token, consumes

MAGIC = 0x53544752  # "STGR"
NEED_PLAN, NEED_OTHERS, ABORTED = 1, 2, 4


@dataclass
class Header:
    """Round 1: what a sender announces. On the wire: ``MAGIC``, then these fields as int64."""

    failed: bool = False
    plan_key: int = 0
    buffer_bytes: int = 0
    chunk_bytes: int = 1
    plan_len: int = 0
    leaves_len: int = 0
    error_len: int = 0
    leaves_changed: bool = False
    """Whether the leaves differ from those last sent to this receiver (it then needs them)."""
    checksums: int = 0
    """Region checksums that follow the buffer (0: none)."""

    def encode(self) -> torch.Tensor:
        return torch.tensor([MAGIC, *map(int, astuple(self))], dtype=torch.int64)

    @classmethod
    def decode(cls, t: torch.Tensor, src: int) -> Header:
        h = t.tolist()
        if h[0] != MAGIC or h[4] < 1 or h[3] < 0:
            raise ReplicationError(f"rank {src} sent something that is not a stager replication header: {h}")
        return cls(bool(h[1]), *h[2:8], bool(h[8]), h[9])


_HEADER_LEN = 1 + len(Header.__dataclass_fields__)
_Post = tuple[torch.Tensor | None, int | None]  # (tensor, peer): posted when both are there


class Link:
    """Posts isend/irecv pairs receive-first and waits for them with one timeout.

    A failed post or wait sets :attr:`broken` (the group may then hold unmatched messages).
    """

    def __init__(self, group: dist.ProcessGroup, timeout: timedelta) -> None:
        self.group = group
        self.timeout = timeout
        self.messages = 0
        self.broken: str | None = None

    def run(self, phase: str, *, recv: _Post, send: _Post) -> None:
        (t_in, src), (t_out, dst) = recv, send
        r = [(t_in, src)] if t_in is not None and src is not None else []
        s = [(t_out, dst)] if t_out is not None and dst is not None else []
        self.run_many(phase, r, s)

    def run_many(
        self, phase: str, recvs: list[tuple[torch.Tensor, int]], sends: list[tuple[torch.Tensor, int]]
    ) -> None:
        works: list[tuple[dist.Work, int, str]] = []
        try:
            for t, peer in recvs:
                works.append((dist.irecv(t, src=peer, group=self.group), peer, "receive"))
            for t, peer in sends:
                works.append((dist.isend(t, dst=peer, group=self.group), peer, "send"))
        except RuntimeError as exc:
            peer = (recvs or sends)[0][1]
            self.broken = self.broken or f"posting the {phase} messages failed ({exc})"
            text = f"could not post the {phase} messages to/from rank {peer}: {exc}"
            raise ReplicationError(text) from None
        self.messages += len(works)
        for w, peer, what in works:
            try:
                w.wait(self.timeout)
            except RuntimeError as exc:
                self._failed(exc, phase, peer, what)

    def _failed(self, exc: RuntimeError, phase: str, peer: int, what: str) -> None:
        text = str(exc)
        first = text.splitlines()[0] if text else repr(exc)
        me = dist.get_rank()
        self.broken = self.broken or f"the {phase} {what} with rank {peer} failed ({first})"
        if "timeout" in text.lower() or "timed out" in text.lower():
            raise ReplicationTimeoutError(
                f"rank {me}: rank {peer} did not {'send' if what == 'receive' else 'receive'} the "
                f"replication {phase} within {self.timeout.total_seconds():g} s; it may have "
                "failed before replicating (see its log) or be stuck. This Replicator is now "
                "unusable: create a new one"
            ) from None
        text = f"rank {me}: replication {phase} {what} with rank {peer} failed: {first}"
        raise ReplicationError(text) from None


def exchange_headers(link: Link, out: Header | None, dst: int | None, src: int | None) -> Header | None:
    """Round 1: send ``out`` to ``dst``; the header ``src`` sent (None without a source)."""
    h_in = torch.zeros(_HEADER_LEN, dtype=torch.int64) if src is not None else None
    link.run("header", recv=(h_in, src), send=(out.encode() if out is not None else None, dst))
    return Header.decode(h_in, src) if h_in is not None and src is not None else None


def exchange_replies(link: Link, need: int | None, dst: int | None, src: int | None) -> int:
    """Round 2: tell ``src`` what this receiver needs; what ``dst`` needs (0 without one)."""
    reply_in = torch.zeros(1, dtype=torch.int64) if dst is not None else None
    need_out = torch.tensor([need], dtype=torch.int64) if need is not None else None
    link.run("reply", recv=(reply_in, dst), send=(need_out, src))
    return int(reply_in.item()) if reply_in is not None else 0


def blob_parts(sender_failed: bool, reply: int, changed: bool) -> tuple[bool, bool]:
    """(plan sent, leaves sent) for one direction, as both ends compute it."""
    if sender_failed or reply & ABORTED:
        return False, False
    return bool(reply & NEED_PLAN), bool(reply & NEED_OTHERS) or changed


@dataclass
class Metadata:
    """What round 3 brought from the source (each None when it did not come)."""

    plan: bytes | None = None
    leaves: bytes | None = None
    error: str | None = None
    """The message of a source that failed."""
    plan_sent: bool = False
    """Whether this rank sent its plan to its destination."""


def exchange_metadata(
    link: Link, out: tuple[Header, int, bytes, bytes, bytes] | None, dst: int | None,
    h_in: Header | None, need: int, src: int | None,
) -> Metadata:
    """Round 3. ``out`` is (header sent, reply received, plan, leaves, error message) toward
    ``dst``; ``h_in`` and ``need`` are the header received from ``src`` and the reply sent."""
    got = Metadata()
    blob_out = None
    if out is not None:
        header, reply, plan, leaves, error = out
        send_plan, send_leaves = blob_parts(header.failed, reply, header.leaves_changed)
        blob_out = error if header.failed else (plan if send_plan else b"") + (leaves if send_leaves else b"")
        got.plan_sent = send_plan
    plan_len = size = 0
    want_leaves = False
    if h_in is not None:
        want_plan, want_leaves = blob_parts(h_in.failed, need, h_in.leaves_changed)
        plan_len = h_in.plan_len if want_plan else 0
        size = h_in.error_len if h_in.failed else plan_len + (h_in.leaves_len if want_leaves else 0)
    blob_in = torch.empty(size, dtype=torch.uint8) if size else None
    blob_out_t = torch.frombuffer(bytearray(blob_out), dtype=torch.uint8) if blob_out else None
    link.run("metadata", recv=(blob_in, src), send=(blob_out_t, dst))
    raw = blob_in.numpy().tobytes() if blob_in is not None else b""
    if h_in is not None and h_in.failed:
        got.error = raw.decode(errors="replace")
    else:
        got.plan = raw[:plan_len] if plan_len else None
        got.leaves = raw[plan_len:] if want_leaves else None
    return got


def exchange_buffers(
    link: Link, recv: tuple[torch.Tensor, int, torch.Tensor | None] | None, src: int | None,
    send: tuple[torch.Tensor, int, torch.Tensor | None] | None, dst: int | None,
) -> None:
    """Round 4. ``recv`` and ``send`` are (buffer, chunk bytes, checksums or None); the buffers
    go in chunks, then the checksums."""
    recvs: list[tuple[torch.Tensor, int]] = []
    sends: list[tuple[torch.Tensor, int]] = []
    for spec, peer, posts in ((recv, src, recvs), (send, dst, sends)):
        if spec is None or peer is None:
            continue
        buf, chunk, sums = spec
        posts += [(buf[i : i + chunk], peer) for i in range(0, buf.numel(), chunk)]
        if sums is not None:
            posts.append((sums, peer))
    link.run_many("buffer", recvs, sends)


class Ref:
    """Stands for staged tensor ``i`` inside pickled non-tensor leaves (and carries a subclass's
    attributes in its ``__dict__``)."""

    __slots__ = ("i", "__dict__")

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled itself
        raise TypeError("Ref is a placeholder")


class _LeavesPickler(pickle.Pickler):
    def __init__(self, buf: io.BytesIO, ids: dict[int, int]) -> None:
        super().__init__(buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.ids = ids

    def persistent_id(self, obj: Any) -> int | None:
        found = self.ids.get(id(obj))
        if found is None and isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor:
            dtensor = sys.modules.get("torch.distributed.tensor")
            if dtensor is not None and isinstance(obj, dtensor.DTensor):
                raise ReplicationError(
                    "a DTensor inside an object (not a dict, list or tuple) cannot be replicated: its local "
                    "shard would travel by value; keep DTensors directly in the state dict's containers"
                )
        return found


class _LeavesUnpickler(pickle.Unpickler):
    def __init__(self, buf: io.BytesIO, refs: list[Ref]) -> None:
        super().__init__(buf)
        self.refs = refs

    def persistent_load(self, pid: int) -> Ref:
        return self.refs[pid]


def encode_leaves(tensors: list[torch.Tensor], others: list[Any], tokens: list[tuple]) -> bytes:
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
    buf = io.BytesIO()
    try:
        _LeavesPickler(buf, {id(t): i for i, t in enumerate(tensors)}).dump((others, subclass_attrs))
    except ReplicationError:
        raise
    except Exception as exc:
        raise ReplicationError(
            "a non-tensor leaf of the staged dict cannot be pickled for the partner "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return buf.getvalue()


def decode_leaves(raw: bytes, n_tensors: int) -> tuple[list[Any], list[Ref]]:
    """The non-tensor leaves :func:`encode_leaves` made, and the placeholders of the tensors."""
    refs = [Ref(i) for i in range(n_tensors)]
    if not raw:
        return [], refs
    others, attrs = _LeavesUnpickler(io.BytesIO(raw), refs).load()
    for i, d in attrs.items():
        refs[i].__dict__.update(d)
    return others, refs
