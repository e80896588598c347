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

The replica is an ordinary staged dict: CPU tensors over per-region storages of a host arena
(shared when ``STAGER_SHARED_MEMORY=1``), DTensors with the sender's mesh and placements,
non-tensor leaves as sent. It can be written by DCP, sent back with :meth:`Replicator.send`, or
copied into live tensors with :func:`stager.restore.restore_state`. With ``STAGER_CHECKSUM`` not
``off`` it is verified on receipt (:mod:`~stager.distributed.checksums`).

Failures. A rank whose staging failed calls :meth:`Replicator.abort` (``stage_and_replicate`` does
it for you); its partner's ``replicate`` then raises :class:`PartnerFailedError` with that rank's
message at once, and both replicators stay usable. A rank that never arrives makes its partner
raise :class:`ReplicationTimeoutError` naming it after ``timeout`` seconds; the replicator is then
unusable (its group may hold unmatched messages): create a new one.

Modules: :mod:`~stager.distributed.replicator` (what is sent when),
:mod:`~stager.distributed.wire` (the four message rounds and their encoding),
:mod:`~stager.distributed.layout` (the sent buffer's layout), :mod:`~stager.distributed.checksums`.
"""

from __future__ import annotations

from stager.distributed.replicator import DEFAULT_CHUNK_BYTES, ReplicationStats, Replicator
from stager.errors import PartnerFailedError, ReplicationError, ReplicationTimeoutError

__all__ = [
    "Replicator", "ReplicationStats", "ReplicationError", "ReplicationTimeoutError", "PartnerFailedError",
    "DEFAULT_CHUNK_BYTES",
]
