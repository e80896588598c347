"""Checksums of bytes: ``stager-lanes64`` over host buffers and over tensors' elements.

One vectorised pass over many buffers at once (in place over a live host arena when they all lie
in one); a tensor's checksum is that of its elements as a contiguous array, as DCP saves it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from stager.integrity.staged import staged_checksum
from stager.kernels import lanes64

__all__ = ["as_flat_bytes", "fill_checksums", "region_checksums", "tensor_checksums"]

_IN_PLACE_MIN = 64 << 10  # a buffer this large is hashed where it lies; smaller ones are packed first


def as_flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a contiguous 1-D uint8 CPU tensor (a view when already so)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def region_checksums(buffers: Sequence[torch.Tensor], *, threads: int = 1) -> torch.Tensor:
    """The ``stager-lanes64`` checksum of each 1-D ``uint8`` CPU tensor, as an ``int64`` tensor.

    One vectorised pass: buffers that lie, 8-byte aligned and without overlapping, in one live
    host arena (a staged set's regions) are hashed together in place over the arena; otherwise
    each large aligned buffer is hashed in place and the small or misaligned ones are first
    packed into one aligned scratch buffer. ``threads > 1`` splits the lanes over threads.
    """
    n = len(buffers)
    for i, b in enumerate(buffers):
        if b.device.type != "cpu" or b.dtype != torch.uint8 or b.dim() != 1 or not b.is_contiguous():
            raise ValueError(
                f"region_checksums: buffer {i} must be a contiguous 1-D uint8 CPU tensor; got "
                f"dtype={b.dtype}, shape={tuple(b.shape)}, device={b.device}"
            )
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    ptrs = np.fromiter((b.data_ptr() for b in buffers), dtype=np.int64, count=n)
    sizes = np.fromiter((b.numel() for b in buffers), dtype=np.int64, count=n)
    if not _in_one_arena(ptrs, sizes, out, threads):
        _one_by_one(buffers, ptrs, sizes, out, threads)
    return torch.from_numpy(out.view(np.int64).copy())


def _in_one_arena(ptrs: np.ndarray, sizes: np.ndarray, out: np.ndarray, threads: int) -> bool:
    """Hash every buffer in place over the live arena that holds them all; False if it cannot."""
    from stager.segments import find_segment

    order = np.lexsort((sizes, ptrs))
    p, s = ptrs[order], sizes[order]
    keep = np.ones(p.size, dtype=bool)
    keep[1:] = (p[1:] != p[:-1]) | (s[1:] != s[:-1])  # the same bytes twice: hash them once
    up, us = p[keep], s[keep]
    if np.any(up % 8) or np.any(up[1:] < up[:-1] + us[:-1]):
        return False
    lo, hi = int(up[0]), int((up + us).max())
    seg = find_segment(lo, max(hi - lo, 1))
    arr = seg.array() if seg is not None else None
    if arr is None or seg.base % 8:
        return False
    sums = lanes64.span_checksums(arr, up - seg.base, us, threads=threads)
    group = np.cumsum(keep) - 1  # index into the unique buffers, per sorted buffer
    out[order] = sums[group]
    return True


def _one_by_one(
    buffers: Sequence[torch.Tensor], ptrs: np.ndarray, sizes: np.ndarray, out: np.ndarray, threads: int
) -> None:
    small = [i for i in range(len(buffers)) if sizes[i] < _IN_PLACE_MIN or ptrs[i] % 8]
    for i in range(len(buffers)):
        if sizes[i] >= _IN_PLACE_MIN and ptrs[i] % 8 == 0:
            out[i] = lanes64.span_checksums(buffers[i].numpy(), [0], [int(sizes[i])], threads=threads)[0]
    if not small:
        return
    starts = np.zeros(len(small), dtype=np.int64)
    cursor = 0
    for k, i in enumerate(small):
        starts[k] = cursor
        cursor += (int(sizes[i]) + 7) // 8 * 8
    scratch = np.empty(max(cursor, 8), dtype=np.uint8)
    dst = torch.from_numpy(scratch)
    torch._foreach_copy_(
        [dst[int(starts[k]) : int(starts[k]) + int(sizes[i])] for k, i in enumerate(small)],
        [buffers[i] for i in small],
    )
    out[small] = lanes64.span_checksums(scratch, starts, sizes[small], threads=threads)


def tensor_checksums(tensors: Sequence[torch.Tensor], *, reuse_staged: bool = True) -> list[int]:
    """The checksum of each tensor's elements as a contiguous array (``int64`` bits).

    With ``reuse_staged``, a staged tensor that is exactly its region (contiguous, from the
    region's first byte, all of its bytes) takes the checksum stored for the region, if any;
    the others are hashed now (non-contiguous or device tensors through a contiguous host copy).
    """
    values: list[int | None] = [staged_checksum(t) if reuse_staged else None for t in tensors]
    fill_checksums(tensors, values)
    return values  # type: ignore[return-value]


def fill_checksums(tensors: Sequence[torch.Tensor], values: list[int | None]) -> int:
    """Hash the tensors whose value is ``None`` (in one :func:`region_checksums` pass) and put
    their checksums into ``values``; returns how many were hashed."""
    todo = [i for i, v in enumerate(values) if v is None]
    if todo:
        fresh = region_checksums([as_flat_bytes(tensors[i]) for i in todo]).tolist()
        for i, v in zip(todo, fresh):
            values[i] = v
    return len(todo)
