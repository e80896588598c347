"""``ChecksumWriter``: DCP's ``FileSystemWriter`` that writes each rank's tensor checksums beside the data.

Each rank writes one sidecar (:mod:`stager.integrity.sidecar`) with the checksum of every tensor
item it saved. The save id in it is the one DCP's metadata records: the coordinator's writer hands
it to every rank inside the storage prefix of its plan. Sidecars are written (temporary file, then
rename) before DCP writes its metadata, which therefore still marks the checkpoint complete.
Reading and verifying are in :mod:`stager.integrity.load`.
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
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from stager.integrity.checksums import fill_checksums
from stager.integrity.sidecar import SIDECAR_SUFFIX, sidecar_document, sidecar_entry
from stager.integrity.staged import staged_checksum

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

    def __init__(
        self, path: str | os.PathLike[str], *args: Any, checksum: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(path, *args, **kwargs)
        self.checksum = checksum
        self.last_checksum_stats: WriteChecksumStats | None = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """DCP's, with this save's id in the rank-local storage prefix (no-collectives saves)."""
        plan = super().prepare_local_plan(plan)
        sd = _with_token(plan.storage_data, self.save_id)
        return plan if sd is plan.storage_data else dataclasses.replace(plan, storage_data=sd)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """DCP's, with the coordinator's save id (the one the metadata records) in every prefix."""
        out = []
        for p in super().prepare_global_plan(plans):
            sd = _with_token(p.storage_data, self.save_id)
            out.append(p if sd is p.storage_data else dataclasses.replace(p, storage_data=sd))
        return out

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
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
                stats.items, stats.computed = len(items), fill_checksums(tensors, values)
                stats.reused = stats.items - stats.computed
                entries = [
                    sidecar_entry(
                        wi.index.fqn, wi.tensor_data.chunk.offsets, wi.tensor_data.chunk.sizes,
                        wi.tensor_data.properties.dtype, v,  # type: ignore[arg-type]
                    )
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
        self._write_sidecar(sidecar, sidecar_document(token, self.rank, prefix, entries))
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
