"""Integrity: a checksum for every staged region and every saved tensor, verified where bytes return.

The checksum is ``stager-lanes64`` (:mod:`stager.kernels.lanes64`); this package holds everything
around it that is not a kernel, one module per concern. What is checked where: README.md,
"Integrity". :class:`ChecksumWriter` imports ``torch.distributed.checkpoint``, so it is loaded on
first use; importing this package imports no Triton and no ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from stager.integrity.checksums import region_checksums, tensor_checksums
from stager.integrity.load import IntegrityReport, Mismatch, verify_checkpoint, verify_state_dict
from stager.integrity.sidecar import SIDECAR_SUFFIX, read_checksums
from stager.integrity.staged import (
    StagedVerification,
    checksum_staged_set,
    clear_checksums,
    compute_set_checksums,
    region_of,
    staged_checksum,
    store_checksums,
    verify_staged_tensors,
)
from stager.kernels.lanes64 import ALGORITHM, VERSION, format_checksum

__all__ = [
    "ALGORITHM", "VERSION", "SIDECAR_SUFFIX", "IntegrityReport", "Mismatch", "StagedVerification",
    "checksum_staged_set", "clear_checksums", "compute_set_checksums", "format_checksum", "read_checksums",
    "region_checksums", "region_of", "staged_checksum", "store_checksums", "tensor_checksums",
    "verify_checkpoint", "verify_staged_tensors", "verify_state_dict",
]


def __getattr__(name: str) -> type:
    # ChecksumWriter subclasses DCP's FileSystemWriter: importing it imports DCP.
    if name in ("ChecksumWriter", "WriteChecksumStats"):
        from stager.integrity import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
