"""Many ranks: peer replication of a staged copy as the packed arena, in a few large messages.

:class:`Replicator` sends a staged dict to a partner rank's host memory and receives the
partner's (README.md, "Many ranks": partners, the replica, failures). PyTorch's experimental
``_ReplicationStager`` (over ``PGTransport``) sends one message per tensor; here a staged dict goes
as its host arena, in chunks of at most ``chunk_bytes``, straight into the partner's receive arena.
Rank ``r`` sends to ``(r + world // 2) % world`` (its *partner*) and receives from
``(r - world // 2) % world`` (its *source*). The replica is an ordinary staged dict, verified on
receipt unless ``STAGER_CHECKSUM=off`` (:mod:`~stager.distributed.checksums`).
"""

from __future__ import annotations

from stager.distributed.replicator import DEFAULT_CHUNK_BYTES, ReplicationStats, Replicator
from stager.errors import PartnerFailedError, ReplicationError, ReplicationTimeoutError

__all__ = [
    "Replicator", "ReplicationStats", "ReplicationError", "ReplicationTimeoutError", "PartnerFailedError",
    "DEFAULT_CHUNK_BYTES",
]
