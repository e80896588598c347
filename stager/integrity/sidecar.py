"""The checksum sidecar: one JSON file per rank beside a DCP checkpoint, written and read here.

``__<rank>_stager-checksums.json``, one entry per tensor item the rank saved (README's "Integrity"
says what it holds and when it is believed)::

    {"format": "stager-checksums", "format_version": 1,
     "algorithm": "stager-lanes64", "version": 1,
     "save_id": "<DCP's save id of this save>", "rank": 0, "prefix": "__0_",
     "entries": [{"fqn": "model.fc.weight", "offsets": [0, 0], "sizes": [8, 4],
                  "dtype": "float32", "checksum": "0x0123456789abcdef", "file": "__0_0.distcp"}, ...]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from stager.kernels.lanes64 import ALGORITHM, VERSION, format_checksum

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = [
    "SIDECAR_SUFFIX", "CheckpointChecksums", "SavedChecksum", "dtype_name", "read_checksums",
    "sidecar_document", "sidecar_entry",
]

SIDECAR_SUFFIX = "stager-checksums.json"
"""A rank's sidecar is ``<DCP's file prefix for the rank><SIDECAR_SUFFIX>``: ``__0_stager-checksums.json``."""
_SIDECAR_FORMAT = "stager-checksums"
_SIDECAR_FORMAT_VERSION = 1


def sidecar_entry(
    fqn: str, offsets: Sequence[int], sizes: Sequence[int], dtype: torch.dtype, checksum: int
) -> dict[str, Any]:
    """One saved chunk's entry (its ``file`` is added once DCP has written the chunk)."""
    return {
        "fqn": fqn,
        "offsets": [int(o) for o in offsets],
        "sizes": [int(s) for s in sizes],
        "dtype": dtype_name(dtype),
        "checksum": format_checksum(int(checksum)),
    }


def sidecar_document(save_id: str, rank: int, prefix: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A rank's whole sidecar, as written."""
    return {
        "format": _SIDECAR_FORMAT,
        "format_version": _SIDECAR_FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "version": VERSION,
        "save_id": save_id,
        "rank": rank,
        "prefix": prefix,
        "entries": entries,
    }


@dataclass(frozen=True)
class SavedChecksum:
    """One saved tensor chunk's checksum, as a sidecar records it."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str
    checksum: int
    """``uint64`` value."""
    file: str
    """The data file DCP wrote the chunk to (relative to the checkpoint)."""
    rank: int | None
    sidecar: str


@dataclass
class CheckpointChecksums:
    """Every checksum the sidecars of a checkpoint hold for its current save."""

    entries: dict[tuple[str, tuple[int, ...]], SavedChecksum] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Sidecars ignored, and why (another save's, another algorithm version, unreadable)."""


def read_checksums(path: str | os.PathLike[str], metadata: Metadata | None = None) -> CheckpointChecksums:
    """The checksums stored beside the checkpoint at ``path`` (empty when written without them).

    Only sidecars written by the save that DCP's metadata describes are used (their save id
    matches); others, and sidecars of an algorithm or version this stager does not know, are
    listed in ``notes`` and ignored.
    """
    path = os.fspath(path)
    if metadata is None:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(path).read_metadata()
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    out = CheckpointChecksums()
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(SIDECAR_SUFFIX) and not n.endswith(".tmp"))
    except OSError:
        names = []
    for name in names:
        full = os.path.join(path, name)
        try:
            with open(full, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            out.notes.append(f"{name}: unreadable ({exc}); its tensors are unverifiable")
            continue
        if doc.get("format") != _SIDECAR_FORMAT:
            out.notes.append(f"{name}: not a stager checksum file; ignored")
            continue
        if doc.get("algorithm") != ALGORITHM or doc.get("version") != VERSION:
            out.notes.append(
                f"{name}: written with {doc.get('algorithm')} v{doc.get('version')}, this stager checks "
                f"{ALGORITHM} v{VERSION}; its tensors are unverifiable"
            )
            continue
        if save_id is None or doc.get("save_id") != save_id:
            out.notes.append(f"{name}: from another save into this directory (save id differs); ignored")
            continue
        for e in doc.get("entries", ()):
            key = (e["fqn"], tuple(e["offsets"]))
            out.entries[key] = SavedChecksum(
                fqn=e["fqn"],
                offsets=tuple(e["offsets"]),
                sizes=tuple(e["sizes"]),
                dtype=e["dtype"],
                checksum=int(e["checksum"], 16),
                file=e.get("file", ""),
                rank=doc.get("rank"),
                sidecar=name,
            )
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
