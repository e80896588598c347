"""Integrity: a checksum for every staged region and every saved tensor, verified where bytes return.

The checksum is ``stager-lanes64`` version 1 (:mod:`stager.kernels.lanes64`: a 64-bit,
non-cryptographic checksum over 8-byte lanes, order-independent in parallel, identical on the CPU,
in plain torch and in the Triton kernels). This package holds everything around it that is not a
kernel, one module per concern:

* :mod:`~stager.integrity.checksums`: the checksums of host buffers and of tensors' elements;
* :mod:`~stager.integrity.staged`: staged copies (in-memory restore, replicas): the checksum of
  every region of a staged set, stored on it, found from a staged tensor, verified again;
* :mod:`~stager.integrity.sidecar`: the JSON sidecar a saved checkpoint carries per rank;
* :mod:`~stager.integrity.writer`: :class:`ChecksumWriter`, DCP's ``FileSystemWriter`` that also
  writes the sidecar (reusing the checksums taken at staging, hashing the rest on the writer
  thread); it imports ``torch.distributed.checkpoint``, so it is loaded on first use
  (``stager.integrity.ChecksumWriter``);
* :mod:`~stager.integrity.load`: verifying a state dict ``dcp.load`` has filled, or every tensor
  of a checkpoint (``python -m stager verify``).

Importing this package imports no Triton and no ``torch.distributed.checkpoint``.
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
