"""Region checksums on the device: the ``stager-lanes64`` kernel, its launcher and its reference.

The regions are the rows of a region table (:mod:`stager.kernels.table`; ``offset`` is not used);
the result is an ``int64`` tensor of ``n`` checksums on the regions' device, one per row, holding
the ``uint64`` value of :mod:`stager.kernels.lanes64` (same bits); a zero-length region has one
too (that of no bytes). A :class:`ChecksumTable` is what a launch reads besides the pack table's
launch rows: per row, its region and the index of its first lane there (rows are chunks of at most
``BLOCK`` bytes, a multiple of 8, so every chunk starts on a lane), and a buffer for one partial
sum per row. :func:`prepare_checksum_table` builds it once, before CUDA-graph capture: a launch
with a prepared table allocates nothing and copies nothing from the host.

Kernel: one program per launch row reads its chunk as lanes (8-byte words when the chunk's address
is 8-byte aligned, else bytes assembled little-endian), hashes each lane with its index in the
region and stores the sum as the row's partial; the partials are added per region (``index_add_``:
integer addition, so the result is deterministic in any order) and finalised with the byte count
by plain torch ops on the device. Address arithmetic is int64, every load is masked, the hash is
``uint64`` (wrapping). The per-chunk routine (``_chunk_hash_sum``) also runs inside the pack
kernel (``pack_gather(..., checksums=out)``), so packed regions get their checksums at no extra
pass over device memory. The backends are the pack kernel's (:mod:`stager.kernels.backend`);
:func:`region_checksums_reference` is the bit-identical plain-torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from stager.kernels import lanes64
from stager.kernels.backend import device_context, jit_helper, jit_kernel, tl, triton, use_kernel
from stager.kernels.errors import RegionTableError
from stager.kernels.reference import bytes_at
from stager.kernels.table import BLOCK, PackTable, _check_format, prepare_table, tensor_text, validate_table

__all__ = ["ChecksumTable", "prepare_checksum_table", "region_checksums", "region_checksums_reference"]

#: Warps per program.
NUM_WARPS = 4
#: Lanes one iteration of the checksum's per-chunk loop hashes (``BLOCK // 8`` per chunk).
LANE_TILE = 512

# The per-chunk routine (see stager.kernels.lanes64 for the definition), shared by the checksum
# kernel and the pack kernel's fused checksum.

if triton is not None:
    _LANE_KEY = tl.constexpr(lanes64.LANE_KEY)
    _MIX1 = tl.constexpr(lanes64.MIX1)
    _MIX2 = tl.constexpr(lanes64.MIX2)


@jit_helper
def _fmix(z):
    # SplitMix64's finaliser on uint64 (logical shifts, wrapping multiplies)
    z = z ^ (z >> 30)
    z = z * _MIX1
    z = z ^ (z >> 27)
    z = z * _MIX2
    return z ^ (z >> 31)


@jit_helper
def _chunk_hash_sum(addr, nbytes, lane0, LANE_TILE: tl.constexpr):
    """Sum over a chunk's lanes of fmix(lane + (lane0 + j + 1) * LANE_KEY), as uint64.

    ``addr``: int64 address of the chunk's first byte; ``nbytes``: its length (0 gives 0);
    ``lane0``: index in its region of the chunk's first lane. Lanes are 8-byte loads when the
    chunk is 8-byte aligned, else bytes assembled little-endian; the last 1..7 bytes form one
    more lane, zeros above them (the tail rule).
    """
    src = addr.to(tl.pointer_type(tl.uint8))
    n_full = nbytes // 8
    j = tl.arange(0, LANE_TILE)
    k = tl.arange(0, 8)
    shifts = (k * 8).to(tl.uint64)
    acc = tl.zeros((LANE_TILE,), dtype=tl.uint64)
    if addr % 8 == 0:
        words = src.to(tl.pointer_type(tl.uint64))
        for start in range(0, n_full, LANE_TILE):
            lane = start + j
            m = lane < n_full
            w = tl.load(words + lane, mask=m, other=0)
            z = w + (lane0 + lane + 1).to(tl.uint64) * _LANE_KEY
            acc += tl.where(m, _fmix(z), 0)
    else:
        for start in range(0, n_full, LANE_TILE):
            lane = start + j
            m = lane < n_full
            pos = lane[:, None] * 8 + k[None, :]
            b = tl.load(src + pos, mask=m[:, None], other=0).to(tl.uint64)
            w = tl.sum(b << shifts[None, :], axis=1)
            z = w + (lane0 + lane + 1).to(tl.uint64) * _LANE_KEY
            acc += tl.where(m, _fmix(z), 0)
    rest = nbytes - n_full * 8
    tb = tl.load(src + n_full * 8 + k, mask=k < rest, other=0).to(tl.uint64)
    tw = tl.sum(tb << shifts, axis=0)
    tz = _fmix(tw + (lane0 + n_full + 1).to(tl.uint64) * _LANE_KEY)
    total = tl.sum(acc, axis=0)
    return tl.where(rest > 0, total + tz, total)


@jit_kernel
def _checksum_kernel(
    # launch table: (n_blocks, 4) int64 rows (address, offset, nbytes, wide), one per program
    blocks_ptr,
    # checksum rows: (n_blocks, 2) int64 (region, first lane in the region)
    aux_ptr,
    n_blocks,
    # output: one int64 partial sum per launch row
    partials_ptr,
    # sizes
    LANE_TILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    live = pid < n_blocks
    addr = tl.load(blocks_ptr + pid * 4, mask=live, other=0)
    nbytes = tl.load(blocks_ptr + pid * 4 + 2, mask=live, other=0)
    lane0 = tl.load(aux_ptr + pid * 2 + 1, mask=live, other=0)
    part = _chunk_hash_sum(addr, nbytes, lane0, LANE_TILE)
    tl.store(partials_ptr + pid, part.to(tl.int64, bitcast=True), mask=live)


@dataclass(frozen=True, eq=False)
class ChecksumTable:
    """A :class:`~stager.kernels.table.PackTable` with what the checksum needs besides it.

    Build it with :func:`prepare_checksum_table` once, then launch as often as needed (also under
    CUDA-graph capture): no allocation and no host-to-device copy per launch.
    """

    pack: PackTable
    """The regions and their launch rows."""
    aux: torch.Tensor
    """``(n_blocks, 2)`` int64 on the device: per launch row, its region and its first lane."""
    block_region: torch.Tensor
    """``aux[:, 0]`` as a contiguous ``(n_blocks,)`` tensor (the ``index_add_`` index)."""
    partials: torch.Tensor
    """``(n_blocks,)`` int64 on the device: one partial sum per launch row (overwritten)."""
    nbytes: torch.Tensor
    """``(n_regions,)`` int64 on the device: each region's length, for the final mix."""

    @property
    def device(self) -> torch.device:
        """Where the regions and every tensor of the table live."""
        return self.pack.device

    @property
    def n_regions(self) -> int:
        """Rows of the region table: the length of the output."""
        return self.pack.n_regions


AnyTable = Union[torch.Tensor, PackTable, ChecksumTable]
"""What the checksum launchers take: a region table, a prepared pack table or a checksum table."""
DeviceLike = Union[torch.device, str, int, None]


def _aux_rows(host: torch.Tensor) -> torch.Tensor:
    """Per launch row (regions cut in BLOCK-byte chunks, in order): (region, first lane)."""
    nbytes = host[:, 2].clamp(min=0)
    counts = torch.where(nbytes > 0, (nbytes + (BLOCK - 1)) // BLOCK, 0)
    total = int(counts.sum())
    region = torch.repeat_interleave(torch.arange(host.shape[0]), counts)
    first = torch.cumsum(counts, 0) - counts
    lane0 = (torch.arange(total) - first[region]) * (BLOCK // 8)
    return torch.stack([region, lane0], dim=1).contiguous()


def _regions_only(table: object) -> torch.Tensor:
    """The host region table with its offset column laid out back to back: a checksum reads no
    packed buffer, so only the addresses and lengths are checked (by ``validate_table``)."""
    host = _check_format(table).clone()
    nbytes = host[:, 2].clamp(min=0)
    host[:, 1] = torch.cumsum(nbytes, 0) - nbytes
    return host


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # from pinned memory, without blocking (see prepare_table)
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def prepare_checksum_table(
    table: torch.Tensor | PackTable, device: DeviceLike = None, *, validate: bool = True
) -> ChecksumTable:
    """Everything a checksum launch needs, on ``device`` (a PackTable's own device by default).

    ``table`` is a region table (prepared here with :func:`prepare_table`) or a prepared
    :class:`~stager.kernels.table.PackTable` (reused as it is: its launch rows are the chunks).
    """
    if isinstance(table, PackTable):
        pt = table
        if device is not None and torch.device(device) != pt.device:
            raise RegionTableError(
                f"the prepared table is for {pt.device}, not {torch.device(device)}; prepare it on the device"
            )
    else:
        if device is None:
            raise RegionTableError("prepare_checksum_table needs device= for a raw region table")
        pt = prepare_table(_regions_only(table), device, validate=validate)
    aux = _aux_rows(pt.regions)
    if aux.shape[0] != pt.n_blocks:  # pragma: no cover - the two chunkings are the same rule
        raise RegionTableError(f"checksum rows ({aux.shape[0]}) do not match the launch rows ({pt.n_blocks})")
    dev = pt.device
    aux_d, nbytes = (_to_device(t, dev) for t in (aux, pt.regions[:, 2].clamp(min=0).contiguous()))
    return ChecksumTable(
        pack=pt,
        aux=aux_d,
        block_region=aux_d[:, 0].contiguous(),
        partials=torch.zeros(pt.n_blocks, dtype=torch.int64, device=dev),
        nbytes=nbytes,
    )


def check_out(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.int64, device=device)
    if (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.int64
        or out.shape != (n,)
        or out.device != device
    ):
        raise RegionTableError(
            f"the checksum output must be an int64 tensor of shape ({n},) on {device}, one per region; "
            f"got {tensor_text(out)}"
        )
    if not out.is_contiguous():
        raise RegionTableError(f"the checksum output must be contiguous; got stride {out.stride()}")
    return out


def combine_partials(ct: ChecksumTable, out: torch.Tensor) -> torch.Tensor:
    """Add the launch rows' partial sums per region and finalise them into ``out`` (in place)."""
    sums = torch.zeros(ct.n_regions, dtype=torch.int64, device=ct.device)
    if ct.pack.n_blocks:
        sums.index_add_(0, ct.block_region, ct.partials)
    out.copy_(lanes64.finalize_torch(sums, ct.nbytes))
    return out


def _launch(ct: ChecksumTable) -> None:
    if ct.pack.n_blocks == 0:
        return
    with device_context(ct.device):
        _checksum_kernel[(ct.pack.n_blocks,)](
            blocks_ptr=ct.pack.blocks,
            aux_ptr=ct.aux,
            n_blocks=ct.pack.n_blocks,
            partials_ptr=ct.partials,
            LANE_TILE=LANE_TILE,
            num_warps=NUM_WARPS,
        )


def _device_of(table: AnyTable, device: DeviceLike) -> torch.device:
    if isinstance(table, (ChecksumTable, PackTable)):
        return table.device
    if device is None:
        raise RegionTableError(
            "region_checksums needs device= with a raw region table (where the regions live)"
        )
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def region_checksums_reference(
    table: AnyTable, out: torch.Tensor | None = None, *, device: DeviceLike = None, validate: bool = True
) -> torch.Tensor:
    """Plain-torch :func:`region_checksums`: one region at a time, on the current stream.

    The oracle of the kernel tests and the fallback where Triton cannot run.
    """
    dev = _device_of(table, device)
    if isinstance(table, ChecksumTable):
        host = table.pack.regions
    elif isinstance(table, PackTable):
        host = table.regions
    else:
        host = _regions_only(table)
        if validate:
            validate_table(host)
    out = check_out(out, int(host.shape[0]), dev)
    values = []
    with device_context(dev):
        for address, _, nbytes in host.tolist():
            if nbytes > 0:
                data = bytes_at(address, nbytes, dev)
            else:
                data = torch.empty(0, dtype=torch.uint8, device=dev)
            values.append(lanes64.to_signed(lanes64.checksum_tensor_torch(data)))
    out.copy_(torch.tensor(values, dtype=torch.int64).reshape(-1))
    return out


def region_checksums(
    table: AnyTable,
    out: torch.Tensor | None = None,
    *,
    device: DeviceLike = None,
    validate: bool = True,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """The ``stager-lanes64`` checksum of every region of ``table``, in one kernel launch.

    ``table`` is a region table (with ``device=``, where the regions live), a prepared
    :class:`~stager.kernels.table.PackTable`, or a :class:`ChecksumTable` (prepare one for
    repeated launches and CUDA-graph capture). ``out``: an ``int64`` tensor of one element per
    region on the regions' device (allocated when None). Queued on the current stream; returns
    ``out``. ``use_triton`` as for ``pack_gather``.

    Raises :class:`~stager.kernels.errors.RegionTableError` for a malformed table or output.
    """
    dev = _device_of(table, device)
    kernel = use_kernel(use_triton, dev)
    if not kernel:
        return region_checksums_reference(table, out, device=dev, validate=validate)
    if isinstance(table, ChecksumTable):
        ct = table
    elif isinstance(table, PackTable):
        ct = prepare_checksum_table(table)
    else:
        ct = prepare_checksum_table(table, dev, validate=validate)
    out = check_out(out, ct.n_regions, dev)
    _launch(ct)
    return combine_partials(ct, out)
