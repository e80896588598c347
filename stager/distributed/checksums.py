"""Replica integrity: one checksum per sent region, and their check on receipt (README.md, "Integrity").

With ``STAGER_CHECKSUM`` not ``off``, the sender sends after the buffer the checksums stored with
the staged copy (no pass over the bytes), else, with ``on``, ones computed just before sending;
the receiver hashes what it received, compares, and stores the verified values with the replica.
"""

from __future__ import annotations

import time

import torch

from stager.distributed.layout import Outbound
from stager.envs import Mode
from stager.errors import IntegrityError
from stager.integrity import (
    clear_checksums,
    compute_set_checksums,
    format_checksum,
    region_checksums,
    region_of,
    store_checksums,
)
from stager.plan import Plan
from stager.staged_set import StagedSet


def outbound_checksums(entry: Outbound, tensors: list[torch.Tensor], mode: Mode) -> torch.Tensor | None:
    """One checksum per sent region, or None to send none.

    A region that is exactly a staged region with a stored checksum takes it; the rest are
    computed from their bytes now when ``mode`` is ``on``, or when some regions have stored
    checksums (``auto``: complete what the staging kernels left out).
    """
    if mode is Mode.OFF or not entry.sizes:
        return None
    values: list[int | None] = []
    for (i, off), size in zip(entry.anchors, entry.sizes):
        v = None
        if i >= 0 and off == 0 and tensors[i].untyped_storage().nbytes() == size:
            hit = region_of(tensors[i])
            if hit is not None and hit[0].plan.regions[hit[1]].nbytes == size:
                v = int(hit[0].checksums[hit[1]])
        values.append(v)
    missing = [r for r, v in enumerate(values) if v is None]
    if missing and mode is not Mode.ON and len(missing) == len(values):
        return None
    if missing:
        if any(entry.anchors[r][0] < 0 for r in missing):  # pragma: no cover - every region has a leaf
            return None
        computed = region_checksums([entry.region_bytes(tensors, r) for r in missing]).tolist()
        for r, v in zip(missing, computed):
            values[r] = v
    return torch.tensor(values, dtype=torch.int64)


def verify_received(in_set: StagedSet, plan: Plan, sums: torch.Tensor | None, src: int) -> None:
    """Hash the received regions and compare with the checksums ``src`` sent; keep them with the
    replica (or forget stale ones when none came)."""
    if sums is None:
        clear_checksums(in_set)
        return
    t0 = time.perf_counter()
    found = compute_set_checksums(in_set)
    bad = torch.nonzero(found != sums).flatten().tolist()
    if bad:
        clear_checksums(in_set)
        i = bad[0]
        path = next((leaf.path for leaf in plan.leaves if leaf.region == i), "")
        more = f", and {len(bad) - 1} more region(s) too" if len(bad) > 1 else ""
        raise IntegrityError(
            f"the replica from rank {src} arrived damaged: state_dict{path} does not match the checksum rank "
            f"{src} sent with it (region {i}, {plan.regions[i].nbytes} bytes: expected "
            f"{format_checksum(int(sums[i]))}, found {format_checksum(int(found[i]))}){more}; it changed in "
            f"transit or in rank {src}'s memory after its checksums were taken. The replica was not kept; "
            "replicate again (this Replicator is still usable)",
            path=f"state_dict{path}",
            expected=format_checksum(int(sums[i])),
            found=format_checksum(int(found[i])),
        )
    store_checksums(in_set, sums, seconds=time.perf_counter() - t0)

