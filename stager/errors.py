"""Every exception the stager raises, each a subclass of the builtin a caller would catch.

Messages follow one shape: what went wrong (with the state-dict key path or the knob), what was
got, what was expected, and what to do about it.

Every error class here subclasses :class:`StagerError` except one: the kernels' error class,
:class:`RegionTableError`, lives with the kernels (``stager.kernels.errors``, since the kernels
import nothing else from ``stager``) and is re-exported here; it is a ``ValueError`` only, so
catch it as ``RegionTableError`` or ``ValueError``, not as ``StagerError``.
"""

from __future__ import annotations

from stager.kernels.errors import RegionTableError

__all__ = [
    "StagerError", "StagingInputError", "StagerConfigError", "StagingMemoryError", "LeaseTimeoutError",
    "StagerClosedError", "SourceModifiedError", "RegionTableError", "RestoreMismatchError",
    "CheckpointWriteError", "ReplicationError", "ReplicationTimeoutError", "PartnerFailedError",
    "StagerConfigWarning", "IntegrityError",
]


class StagerError(Exception):
    """Base class of every error raised by ``stager``."""


class StagingInputError(StagerError, ValueError):
    """A leaf of the state dict cannot be staged (meta, sparse, unsupported subclass, ...).

    Raised while planning, before any byte is copied, with the leaf's key path.
    """

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        self.path = path
        self.problem = problem
        msg = f"cannot stage state_dict{path}: {problem}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class StagerConfigError(StagerError, ValueError):
    """A configuration value (keyword, ``STAGER_*`` variable or profile entry) is invalid."""


class StagingMemoryError(StagerError, MemoryError):
    """Staging would exceed the host or device memory the stager may use."""


class LeaseTimeoutError(StagerError, TimeoutError):
    """A staged copy still held by its consumer did not come free within the lease timeout."""


class StagerClosedError(StagerError, RuntimeError):
    """The stager was used after ``close()``."""


class SourceModifiedError(StagerError, RuntimeError):
    """A source tensor was written while an asynchronous ``stage()`` was copying it.

    DCP's contract is that the caller leaves the sources alone until the staging ``Future``
    resolves (``response.staging_completion`` or ``stager.synchronize_staging()`` before the
    next optimizer step). The staged copy of that call is not handed out; the message names
    the key path of the first tensor found written.
    """


class RestoreMismatchError(StagerError, ValueError):
    """The staged copy and the restore target differ in structure, shape or dtype.

    Raised before any byte is copied, naming the key path of the first difference.
    """


class CheckpointWriteError(StagerError, RuntimeError):
    """A checkpoint write (or its staging) failed in the background; raised on the next call."""


class ReplicationError(StagerError, RuntimeError):
    """Replication with a partner rank failed; the message names the rank and the phase."""


class ReplicationTimeoutError(ReplicationError, TimeoutError):
    """The partner rank did not answer within the replicator's timeout."""


class PartnerFailedError(ReplicationError):
    """The partner rank reported that it could not stage or send (its message is included)."""


class IntegrityError(StagerError, ValueError):
    """Bytes do not match the checksum taken when they were staged or saved.

    Raised by ``load_checkpoint`` (a tensor read from a checkpoint file), by in-memory restore
    (the staged copy changed in host memory; nothing is written) and by the replicator (a replica
    changed in transit or in its holder's memory). The message and the attributes name the key
    path, the file when there is one, and the expected and found checksums.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        file: str | None = None,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        """Key path of the tensor (``state_dict['model']['fc.weight']``) or DCP's fqn."""
        self.file = file
        """The checkpoint data file the bytes came from, when they came from one."""
        self.expected = expected
        """The stored checksum, as ``0x`` and 16 hex digits."""
        self.found = found
        """The checksum of the bytes found."""


class StagerConfigWarning(UserWarning):
    """A ``STAGER_*`` variable is set that no part of the stager reads (a misspelling, most often).

    Issued once per process and name when a config resolves; the message names the closest
    variable that exists.
    """
