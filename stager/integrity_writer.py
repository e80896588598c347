"""``ChecksumWriter``: DCP's ``FileSystemWriter`` that writes each rank's tensor checksums beside the data.

A checkpoint directory written by it holds, besides DCP's ``.metadata`` and ``__<rank>_<n>.distcp``
files, one JSON sidecar per rank, ``__<rank>_stager-checksums.json``::

    {"format": "stager-checksums", "format_version": 1,
     "algorithm": "stager-lanes64", "version": 1,
     "save_id": "<DCP's save id of this save>", "rank": 0, "prefix": "__0_",
     "entries": [{"fqn": "model.fc.weight", "offsets": [0, 0], "sizes": [8, 4],
                  "dtype": "float32", "checksum": "0x0123456789abcdef", "file": "__0_0.distcp"}, ...]}

one entry per tensor item the rank saved (a whole tensor, or this rank's chunk of a DTensor), its
checksum over the chunk's elements as a contiguous array, as DCP saved it. The save id is the one
DCP's metadata records (``metadata.storage_meta.save_id``): the coordinator's writer hands it to
every rank inside the storage prefix of its plan, so a reader can tell the sidecars of this save
from those an earlier save left in the same directory. Sidecars are written (temporary file, then
rename) before DCP writes its metadata, which therefore still marks the checkpoint complete.

Reading and verifying are in :mod:`stager.integrity`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.planner import WriteItemType

from stager.integrity import (
    _SIDECAR_FORMAT,
    _SIDECAR_FORMAT_VERSION,
    ALGORITHM,
    SIDECAR_SUFFIX,
    VERSION,
    _as_flat_bytes,
    _dtype_name,
    format_checksum,
    region_checksums,
    staged_checksum,
)

__all__ = ["ChecksumWriter", "WriteChecksumStats"]


@dataclass
class _StagerPrefix(_StoragePrefix):
    """DCP's storage prefix of a rank's files, carrying the id of the save to every rank."""

    token: str = ""


@dataclass
class WriteChecksumStats:
    """What one ``write_data`` of a :class:`ChecksumWriter` did about checksums."""

    items: int = 0
    """Tensor items given a checksum."""
    reused: int = 0
    """Of those, checksums stored when the copy was staged (no pass over their bytes)."""
    computed: int = 0
    """Of those, hashed on the writer thread."""
    seconds: float = 0.0
    """Time spent finding and computing the checksums (the sidecar's write not included)."""
    sidecar: str | None = None
    """The sidecar written, relative to the checkpoint; None when none was."""


def _with_token(sd: Any, token: str) -> Any:
    if isinstance(sd, _StoragePrefix) and not isinstance(sd, _StagerPrefix):
        return _StagerPrefix(prefix=sd.prefix, token=token)
    return sd


class ChecksumWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that also writes each rank's tensor checksums beside the data.

    Args:
        path: the checkpoint directory, as for ``FileSystemWriter``.
        checksum: ``True`` writes a sidecar always (hashing on the writer thread every tensor with
            no checksum from staging); ``None`` (default) writes one when the staged copy carries
            checksums (``STAGER_CHECKSUM=on``, or the GPU path's fused ones), reusing them and
            hashing only the rest; ``False`` never, and removes a sidecar this rank left in the
            directory earlier.
        *args, **kwargs: ``FileSystemWriter``'s.

    ``last_checksum_stats`` (:class:`WriteChecksumStats`) says what the last write did.
    """

    def __init__(self, path: str | os.PathLike[str], *args: Any, checksum: bool | None = None, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.checksum = checksum
        self.last_checksum_stats: WriteChecksumStats | None = None

    def prepare_local_plan(self, plan: Any) -> Any:
        """DCP's, with this save's id in the rank-local storage prefix (no-collectives saves)."""
        plan = super().prepare_local_plan(plan)
        sd = _with_token(plan.storage_data, self.save_id)
        return plan if sd is plan.storage_data else dataclasses.replace(plan, storage_data=sd)

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        """DCP's, with the coordinator's save id (the one the metadata records) in every prefix."""
        out = []
        for p in super().prepare_global_plan(plans):
            sd = _with_token(p.storage_data, self.save_id)
            out.append(p if sd is p.storage_data else dataclasses.replace(p, storage_data=sd))
        return out

    def write_data(self, plan: Any, planner: Any) -> Any:
        """DCP's write, then this rank's sidecar (see the module docstring)."""
        stats = self.last_checksum_stats = WriteChecksumStats()
        prefix = getattr(plan.storage_data, "prefix", None)
        token = getattr(plan.storage_data, "token", None)
        sidecar = f"{prefix}{SIDECAR_SUFFIX}" if prefix is not None else None
        items = [wi for wi in plan.items if wi.type != WriteItemType.BYTE_IO]
        entries: list[dict[str, Any]] | None = None
        if self.checksum is not False and token and sidecar is not None:
            t0 = time.perf_counter()
            tensors = [planner.resolve_data(wi) for wi in items]
            values = [staged_checksum(t) for t in tensors]
            if self.checksum or any(v is not None for v in values):
                todo = [i for i, v in enumerate(values) if v is None]
                if todo:
                    fresh = region_checksums([_as_flat_bytes(tensors[i]) for i in todo]).tolist()
                    for i, v in zip(todo, fresh):
                        values[i] = v
                stats.items, stats.computed = len(items), len(todo)
                stats.reused = stats.items - stats.computed
                entries = [
                    {
                        "fqn": wi.index.fqn,
                        "offsets": [int(o) for o in wi.tensor_data.chunk.offsets],
                        "sizes": [int(s) for s in wi.tensor_data.chunk.sizes],
                        "dtype": _dtype_name(wi.tensor_data.properties.dtype),
                        "checksum": format_checksum(int(v)),  # type: ignore[arg-type]
                    }
                    for wi, v in zip(items, values)
                ]
            del tensors
            stats.seconds = time.perf_counter() - t0
        fut = super().write_data(plan, planner)
        if sidecar is None:
            return fut
        if entries is None:
            self._remove(sidecar)
            return fut
        results = fut.wait() if hasattr(fut, "wait") else fut.result()  # torch's Future, or concurrent's
        files = {wr.index: wr.storage_data for wr in results}
        for wi, e in zip(items, entries):
            e["file"] = getattr(files.get(wi.index), "relative_path", "")
        self._write_sidecar(sidecar, {
            "format": _SIDECAR_FORMAT,
            "format_version": _SIDECAR_FORMAT_VERSION,
            "algorithm": ALGORITHM,
            "version": VERSION,
            "save_id": token,
            "rank": self.rank,
            "prefix": prefix,
            "entries": entries,
        })
        stats.sidecar = sidecar
        return fut

    def _write_sidecar(self, name: str, doc: dict[str, Any]) -> None:
        tmp = self.fs.concat_path(self.path, name + ".tmp")
        with self.fs.create_stream(tmp, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
            if self.sync_files:
                try:
                    os.fsync(f.fileno())
                except (AttributeError, OSError, ValueError):  # pragma: no cover - a stream without a file
                    pass
        self._remove(name)
        self.fs.rename(tmp, self.fs.concat_path(self.path, name))

    def _remove(self, name: str) -> None:
        final = self.fs.concat_path(self.path, name)
        if self.fs.exists(final):
            self.fs.rm_file(final)
