"""The region checksum ``stager-lanes64`` version 1: its definition and its host implementations.

A region is a sequence of ``n >= 0`` bytes. Cut it into ``L = ceil(n / 8)`` *lanes*: lane ``i``
is bytes ``8i .. 8i+7`` read as a little-endian unsigned 64-bit integer; the last lane, when ``n``
is not a multiple of 8, takes the remaining ``n % 8`` bytes and zeros above them (the *tail
rule*). All arithmetic is modulo ``2**64``::

    fmix(z)    = z ^= z >> 30; z *= MIX1; z ^= z >> 27; z *= MIX2; z ^= z >> 31      (logical >>)
    h_i        = fmix(lane_i + (i + 1) * LANE_KEY)
    S          = h_0 + h_1 + ... + h_{L-1}
    checksum   = fmix(S ^ ((n + 1) * LENGTH_KEY))

``fmix`` is the finaliser of SplitMix64 (a bijection on 64-bit words), so a change confined to one
lane, every single-bit and single-byte error included, always changes the checksum; other
corruption goes unnoticed with a chance of about ``2**-64`` (the usual heuristic for a good mixing
function, not a proof). Lanes are independent until the sum, so the checksum parallelises over
any split of a region: each piece adds its ``h_i`` with ``i`` counted from the region's start, and
partial sums add up in any order. It is not cryptographic: it finds corruption, not tampering.

Host implementations, bit-identical to the definition and to the Triton kernel
(:mod:`stager.kernels.checksum`): :func:`checksum_bytes` (pure Python, the executable
specification); :func:`checksum_tensor_torch` (plain torch on any device: ``int64`` arithmetic
wraps, a logical right shift is an arithmetic one masked to the bits that stay; the kernel's
reference); :func:`span_checksums` (vectorised numpy over many regions of one host buffer, a few
lanes chunk at a time so chunks stay in cache, per-region sums by ``np.add.reduceat``: the CPU
path of :mod:`stager.integrity`).

Checksums are ``uint64`` values; tensors hold them as ``int64`` with the same bits
(:func:`to_signed`, :func:`to_unsigned`) and messages print them as 16 hex digits
(:func:`format_checksum`). Importing this module imports no Triton.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "ALGORITHM", "VERSION", "LANE_KEY", "MIX1", "MIX2", "LENGTH_KEY", "checksum_bytes",
    "checksum_tensor_torch", "finalize_torch", "fmix_torch", "format_checksum", "span_checksums", "to_signed",
    "to_unsigned",
]

ALGORITHM = "stager-lanes64"
"""Name of the checksum, stored with every checksum that leaves the process."""
VERSION = 1
"""Version of :data:`ALGORITHM`; a change of any constant or rule is a new version."""

LANE_KEY = 0x9E3779B97F4A7C15
"""Added ``(i + 1)`` times to lane ``i`` (the golden-ratio increment of SplitMix64)."""
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
LENGTH_KEY = 0xD6E8FEB86659FD93
"""Mixes the byte count in, so that a region and the same region with zeros appended differ."""

_MASK = (1 << 64) - 1


def to_signed(u: int) -> int:
    """The ``int64`` with the bits of the ``uint64`` ``u`` (how tensors store a checksum)."""
    u &= _MASK
    return u - (1 << 64) if u >> 63 else u


def to_unsigned(s: int) -> int:
    """The ``uint64`` with the bits of the ``int64`` ``s``."""
    return int(s) & _MASK


def format_checksum(value: int) -> str:
    """``0x`` and 16 hex digits, whatever the sign the value is held with."""
    return f"0x{to_unsigned(value):016x}"


def _fmix(z: int) -> int:
    z ^= z >> 30
    z = (z * MIX1) & _MASK
    z ^= z >> 27
    z = (z * MIX2) & _MASK
    return z ^ (z >> 31)


def checksum_bytes(data: bytes | bytearray | memoryview) -> int:
    """The checksum of ``data`` as an unsigned int, straight from the definition (slow: tests)."""
    raw = bytes(data)
    n = len(raw)
    total = 0
    for i in range(0, n, 8):
        lane = int.from_bytes(raw[i : i + 8].ljust(8, b"\0"), "little")
        total += _fmix((lane + (i // 8 + 1) * LANE_KEY) & _MASK)
    return _fmix((total & _MASK) ^ (((n + 1) * LENGTH_KEY) & _MASK))


_S_LANE_KEY = to_signed(LANE_KEY)
_S_MIX1 = to_signed(MIX1)
_S_MIX2 = to_signed(MIX2)
_S_LENGTH_KEY = to_signed(LENGTH_KEY)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits: the arithmetic shift with the copied sign bits cleared."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def fmix_torch(z: torch.Tensor) -> torch.Tensor:
    """:func:`fmix` over an ``int64`` tensor (wrapping arithmetic), as a new tensor."""
    z = z ^ _lsr(z, 30)
    z = z * _S_MIX1
    z = z ^ _lsr(z, 27)
    z = z * _S_MIX2
    return z ^ _lsr(z, 31)


def finalize_torch(sums: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """Checksums from per-region lane-hash sums and byte counts (``int64`` tensors, one device)."""
    return fmix_torch(sums ^ ((nbytes + 1) * _S_LENGTH_KEY))


def checksum_tensor_torch(data: torch.Tensor) -> int:
    """The checksum of a 1-D ``uint8`` tensor's bytes, in plain torch on its device; returns the
    unsigned value."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(
            f"checksum_tensor_torch needs a 1-D uint8 tensor; got dtype={data.dtype}, "
            f"shape={tuple(data.shape)}; pass tensor.contiguous().view(-1).view(torch.uint8)"
        )
    n = data.numel()
    full = n // 8
    tail = n - full * 8
    padded = torch.zeros((full + (1 if tail else 0)) * 8, dtype=torch.uint8, device=data.device)
    padded[:n] = data
    lanes = padded.view(torch.int64)
    if torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0].item() != 1:  # pragma: no cover
        raise RuntimeError("stager-lanes64 reads lanes little-endian; this host is big-endian")
    index = torch.arange(1, lanes.numel() + 1, dtype=torch.int64, device=data.device)
    total = fmix_torch(lanes + index * _S_LANE_KEY).sum()
    out = finalize_torch(total.reshape(1), torch.tensor([n], dtype=torch.int64, device=data.device))
    return to_unsigned(int(out.item()))


_U = np.uint64
_CHUNK_LANES = 1 << 15  # 256 KiB of lanes per step: the temporaries stay in a core's cache
_RAMP: np.ndarray | None = None


def _ramp() -> np.ndarray:
    global _RAMP
    if _RAMP is None:
        _RAMP = np.arange(_CHUNK_LANES, dtype=_U) * _U(LANE_KEY)
    return _RAMP


def _fmix_np(z: np.ndarray, t: np.ndarray) -> None:
    """:func:`fmix` in place over ``z`` (uint64), with ``t`` as scratch of the same size."""
    np.right_shift(z, _U(30), out=t)
    np.bitwise_xor(z, t, out=z)
    np.multiply(z, _U(MIX1), out=z)
    np.right_shift(z, _U(27), out=t)
    np.bitwise_xor(z, t, out=z)
    np.multiply(z, _U(MIX2), out=z)
    np.right_shift(z, _U(31), out=t)
    np.bitwise_xor(z, t, out=z)


def _full_lane_sums(
    lanes: np.ndarray, a: np.ndarray, b: np.ndarray, corr: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    """Per region, the sum of ``h_i`` over its full lanes inside global lanes ``[lo, hi)``.

    ``a``/``b``: first and one-past-last full lane of each region (sorted, disjoint, ``b > a``);
    ``corr``: ``(1 - a) * LANE_KEY`` per region, so lane ``g`` of region ``r`` adds
    ``g * LANE_KEY + corr[r] = (g - a[r] + 1) * LANE_KEY``.
    """
    out = np.zeros(a.size, dtype=_U)
    ramp = _ramp()
    z = np.empty(_CHUNK_LANES + 1, dtype=_U)
    t = np.empty(_CHUNK_LANES + 1, dtype=_U)
    c0 = lo
    while c0 < hi:
        # Skip gaps between regions (padding, or regions of no full lane): start at a region.
        r0 = int(np.searchsorted(b, c0, side="right"))
        if r0 >= a.size:
            break
        c0 = max(c0, int(a[r0]))
        if c0 >= hi:
            break
        c1 = min(c0 + _CHUNK_LANES, hi)
        m = c1 - c0
        r1 = int(np.searchsorted(a, c1, side="left"))
        s = np.clip(a[r0:r1], c0, c1) - c0
        e = np.clip(b[r0:r1], c0, c1) - c0
        zc = z[:m]
        np.add(lanes[c0:c1], ramp[:m], out=zc)
        if r1 - r0 == 1:
            np.add(zc, _U((c0 * LANE_KEY + int(corr[r0])) & _MASK), out=zc)
        else:
            np.add(zc, _U((c0 * LANE_KEY) & _MASK), out=zc)
            counts = np.diff(np.concatenate(([0], s[1:], [m])))
            np.add(zc, np.repeat(corr[r0:r1], counts), out=zc)
        _fmix_np(zc, t[:m])
        z[m] = 0  # so that a segment ending at the chunk's end has a valid reduceat index
        idx = np.empty(2 * s.size, dtype=np.int64)
        idx[0::2] = s
        idx[1::2] = e
        sums = np.add.reduceat(z[: m + 1], idx)[0::2]
        sums[s == e] = 0  # reduceat gives z[s] for an empty segment
        out[r0:r1] += sums
        c0 = c1
    return out


def span_checksums(
    buf: np.ndarray,
    starts: Sequence[int] | np.ndarray,
    nbytes: Sequence[int] | np.ndarray,
    *,
    threads: int = 1,
) -> np.ndarray:
    """Checksums of the regions ``buf[starts[r] : starts[r] + nbytes[r]]``, as ``uint64``.

    ``buf`` is a 1-D ``uint8`` array; every start is a multiple of 8 (lanes of all regions share
    one grid over ``buf``) and the regions are sorted by start and do not overlap (padding between
    them is skipped; its bytes never count). One pass over the regions' bytes, in chunks of
    ``_CHUNK_LANES`` lanes; ``threads > 1`` splits the lanes over that many threads (numpy drops
    the GIL inside each operation).
    """
    st = np.asarray(starts, dtype=np.int64)
    nb = np.asarray(nbytes, dtype=np.int64)
    n = st.size
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"span_checksums needs a 1-D uint8 array; got dtype={buf.dtype}, shape={buf.shape}")
    if n == 0:
        return np.zeros(0, dtype=_U)
    if np.any(st % 8) or np.any(nb < 0) or np.any(st < 0) or np.any(st + nb > buf.size):
        raise ValueError(
            "span_checksums: every region needs a start that is a multiple of 8 and must lie in buf"
        )
    if np.any(st[1:] < st[:-1] + nb[:-1]):
        raise ValueError("span_checksums: regions must be sorted by start and must not overlap")
    full = nb // 8
    a = st // 8
    b = a + full
    sums = np.zeros(n, dtype=_U)
    has = np.flatnonzero(full > 0)
    if has.size:
        lanes = buf[: (buf.size // 8) * 8].view(_U)
        ah, bh = a[has], b[has]
        corr = (_U(1) - ah.astype(_U)) * _U(LANE_KEY)
        lo, hi = int(ah[0]), int(bh[-1])
        parts = max(1, min(int(threads), (hi - lo) // _CHUNK_LANES))
        if parts == 1:
            sums[has] = _full_lane_sums(lanes, ah, bh, corr, lo, hi)
        else:
            bounds = [lo + (hi - lo) * k // parts for k in range(parts + 1)]
            with ThreadPoolExecutor(parts) as pool:
                partial = list(
                    pool.map(
                        lambda k: _full_lane_sums(lanes, ah, bh, corr, bounds[k], bounds[k + 1]),
                        range(parts),
                    )
                )
            acc = np.zeros(has.size, dtype=_U)
            for p in partial:
                acc += p
            sums[has] = acc
    tail = nb - full * 8
    tails = np.flatnonzero(tail > 0)
    if tails.size:
        k = np.arange(8, dtype=np.int64)
        pos = st[tails, None] + full[tails, None] * 8 + k
        keep = k < tail[tails, None]
        raw = np.where(keep, buf[np.minimum(pos, buf.size - 1)], 0).astype(_U)
        lane = np.bitwise_or.reduce(raw << (k.astype(_U) * _U(8)), axis=1)
        z = lane + (full[tails].astype(_U) + _U(1)) * _U(LANE_KEY)
        _fmix_np(z, np.empty_like(z))
        sums[tails] += z
    z = sums ^ ((nb.astype(_U) + _U(1)) * _U(LENGTH_KEY))
    _fmix_np(z, np.empty_like(z))
    return z
