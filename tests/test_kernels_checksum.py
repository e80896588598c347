"""Region checksums (``stager-lanes64``): the Triton kernel, the fused pack option, the plain-torch
reference, the vectorised numpy pass and the pure-Python definition agree bit for bit.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest);
the ``cuda`` parametrisations run the compiled kernels on a GPU and are skipped elsewhere. The
pure-Python :func:`checksum_bytes` is the definition; every other implementation is checked
against it or against the reference, which is checked against it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _helpers import ALL_DTYPES, KERNEL_ON_CPU, POISON, random_tensor
from _helpers import KERNEL_DEVICES as DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from stager.errors import RegionTableError
from stager.kernels import (
    BLOCK,
    lanes64,
    pack_gather,
    pack_gather_reference,
    prepare_checksum_table,
    prepare_table,
    region_checksums,
    region_checksums_reference,
    table_from_tensors,
    table_from_triples,
)

# (byte offset of the region in a random buffer, length): odd sizes, every alignment mod 8,
# zero-length, one byte short of / exactly / past a launch row (BLOCK bytes).
REGIONS = [
    pytest.param([(0, 0)], id="empty"),
    pytest.param([(0, 1)], id="size1"),
    pytest.param([(3, 7)], id="size7-addr+3"),
    pytest.param([(0, 8)], id="size8"),
    pytest.param([(5, 9)], id="size9-addr+5"),
    pytest.param([(8, 17)], id="size17"),
    pytest.param([(1, 4095)], id="size4095-addr+1"),
    pytest.param([(0, BLOCK - 1)], id="block-1"),
    pytest.param([(0, BLOCK)], id="block"),
    pytest.param([(7, BLOCK + 1)], id="block+1-addr+7"),
    pytest.param([(16, 2 * BLOCK + 13)], id="three-rows"),
    pytest.param(
        [(2, 3), (0, 0), (40, 100), (9, 31), (1000, 5000), (17, 0), (3, 4093)], id="mixed-overlapping"
    ),
]


def _buffer(nbytes: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)


def _spec(buf: torch.Tensor, regions: list[tuple[int, int]]) -> list[int]:
    host = buf.cpu().numpy()
    return [lanes64.to_signed(lanes64.checksum_bytes(host[s : s + n].tobytes())) for s, n in regions]


def _table(buf: torch.Tensor, regions: list[tuple[int, int]]) -> torch.Tensor:
    base = buf.data_ptr()
    return table_from_triples((base + s if n else 0, 0, n) for s, n in regions)


def test_known_answers_pin_version_1() -> None:
    # A change of any constant or rule is a new version of the algorithm: these must not move.
    assert lanes64.ALGORITHM == "stager-lanes64" and lanes64.VERSION == 1
    assert lanes64.format_checksum(lanes64.checksum_bytes(b"")) == "0xb55a8fa067537a73"
    assert lanes64.format_checksum(lanes64.checksum_bytes(b"a")) == "0xb88bd2b301520e28"
    assert lanes64.format_checksum(lanes64.checksum_bytes(bytes(range(17)))) == "0xf0666dc64308454c"


def test_tail_rule_and_length_are_part_of_the_checksum() -> None:
    seen = {lanes64.checksum_bytes(b"\0" * n) for n in range(0, 25)}
    assert len(seen) == 25  # zeros of every length differ (the tail is zero-padded, n mixed in)


def test_every_single_bit_flip_changes_the_checksum() -> None:
    data = bytearray(random.Random(3).randbytes(45))
    clean = lanes64.checksum_bytes(data)
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            assert lanes64.checksum_bytes(data) != clean, (i, bit)
            data[i] ^= 1 << bit


def test_swapped_lanes_change_the_checksum() -> None:
    data = bytes(range(16))
    assert lanes64.checksum_bytes(data) != lanes64.checksum_bytes(data[8:] + data[:8])


@pytest.mark.parametrize("regions", REGIONS)
def test_torch_reference_and_numpy_pass_match_the_definition(regions: list[tuple[int, int]]) -> None:
    size = max(s + n for s, n in regions) + 16
    buf = _buffer(size, "cpu")
    want = _spec(buf, regions)
    ref = region_checksums_reference(_table(buf, regions), device="cpu")
    assert ref.tolist() == want
    for (s, n), w in zip(regions, want):
        # span_checksums needs 8-aligned, disjoint regions: one region at a time, copied aligned.
        aligned = np.zeros(n + 16, dtype=np.uint8)
        aligned[8 : 8 + n] = buf.numpy()[s : s + n]
        got = lanes64.span_checksums(aligned, [8], [n])
        assert lanes64.to_signed(int(got[0])) == w


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), max_size=12),
    slack=st.integers(0, 9),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_numpy_pass_over_a_layout_matches_the_reference(
    layout: list[tuple[int, int]], slack: int, threads: int, seed: int
) -> None:
    # Regions back to back at multiples of 8 with 0-3 lanes of padding between them.
    starts, cursor = [], 0
    for gap, n in layout:
        cursor += gap * 8
        starts.append(cursor)
        cursor = (cursor + n + 7) // 8 * 8
    buf = _buffer(cursor + slack, "cpu", seed)
    sizes = [n for _, n in layout]
    got = lanes64.span_checksums(buf.numpy(), starts, sizes, threads=threads)
    assert [lanes64.to_signed(int(v)) for v in got] == _spec(buf, list(zip(starts, sizes)))


def test_numpy_pass_over_large_regions_splits_into_chunks_and_threads() -> None:
    buf = _buffer((3 << 20) + 64, "cpu")
    starts = [0, 8, (1 << 20) + 16, (1 << 20) + (1 << 19) + 24]
    sizes = [3, (1 << 20) + 5, 1 << 19, (1 << 20) + 1]
    want = region_checksums_reference(_table(buf, list(zip(starts, sizes))), device="cpu").tolist()
    for threads in (1, 3):
        got = lanes64.span_checksums(buf.numpy(), starts, sizes, threads=threads)
        assert [lanes64.to_signed(int(v)) for v in got] == want


def test_numpy_pass_refuses_misaligned_or_overlapping_regions() -> None:
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        lanes64.span_checksums(buf, [3], [4])
    with pytest.raises(ValueError, match="overlap"):
        lanes64.span_checksums(buf, [0, 8], [16, 8])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regions", REGIONS)
def test_kernel_matches_reference_and_definition(regions: list[tuple[int, int]], device: str) -> None:
    size = max(s + n for s, n in regions) + 16
    buf = _buffer(size, device)
    table = _table(buf, regions)
    out = torch.full((len(regions),), -1, dtype=torch.int64, device=device)
    region_checksums(table, out, device=device, use_triton=True)
    ref = region_checksums_reference(table, device=device)
    assert torch.equal(out, ref)
    assert out.tolist() == _spec(buf, regions)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_kernel_over_tensors_of_every_dtype(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = [random_tensor((n,), dtype, gen).to(device) for n in (0, 1, 3, 5, 77, 1031)]
    tensors.append(random_tensor((33, 7), dtype, gen).to(device)[1:])  # a view at an element offset
    table = table_from_tensors(tensors)
    got = region_checksums(table, device=device, use_triton=True)
    ref = region_checksums_reference(table, device=device)
    assert torch.equal(got, ref)
    data = [t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors]
    want = [lanes64.to_signed(lanes64.checksum_bytes(b)) for b in data]
    assert got.tolist() == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regions", REGIONS)
def test_fused_pack_copies_exactly_and_checksums_what_it_copied(
    regions: list[tuple[int, int]], device: str
) -> None:
    size = max(s + n for s, n in regions) + 16
    buf = _buffer(size, device)
    base = buf.data_ptr()
    rows, cursor = [], 8
    for s, n in regions:
        rows.append((base + s if n else 0, cursor, n))
        cursor += n + 3  # odd gaps: poison between the regions must survive
    table = table_from_triples(rows)
    out = torch.full((cursor + 8,), POISON, dtype=torch.uint8, device=device)
    want_out = torch.full_like(out, POISON)
    for (s, n), (_, o, _) in zip(regions, rows):
        want_out[o : o + n] = buf[s : s + n]
    checksums = torch.full((len(regions),), -1, dtype=torch.int64, device=device)

    pack_gather(table, out, use_triton=True, checksums=checksums)

    assert torch.equal(out, want_out)
    assert checksums.tolist() == _spec(buf, regions)
    ref_out = torch.full_like(out, POISON)
    ref_checksums = torch.empty_like(checksums)
    pack_gather_reference(table, ref_out, checksums=ref_checksums)
    assert torch.equal(ref_out, want_out) and torch.equal(ref_checksums, checksums)


@pytest.mark.parametrize("device", DEVICES)
def test_prepared_checksum_table_serves_repeated_launches(device: str) -> None:
    buf = _buffer(5 * BLOCK, device)
    regions = [(0, 100), (128, 3 * BLOCK + 5), (4 * BLOCK, 0), (4 * BLOCK + 8, 1001)]
    rows, cursor = [], 0
    for s, n in regions:
        rows.append((buf.data_ptr() + s if n else 0, cursor, n))
        cursor += (n + 15) // 16 * 16
    ct = prepare_checksum_table(prepare_table(table_from_triples(rows), device))
    out = torch.empty(cursor, dtype=torch.uint8, device=device)
    first = torch.empty(len(regions), dtype=torch.int64, device=device)
    pack_gather(ct, out, checksums=first, use_triton=True)
    buf[130] ^= 1  # region 1 changes between launches: the second launch must see it
    second = torch.empty_like(first)
    pack_gather(ct, out, checksums=second, use_triton=True)
    alone = region_checksums(ct, use_triton=True)
    assert first.tolist() == _spec(buf.clone().index_put_((torch.tensor([130]),), buf[130:131] ^ 1), regions)
    assert second.tolist() == _spec(buf, regions) == alone.tolist()
    assert first[1] != second[1] and first[[0, 2, 3]].tolist() == second[[0, 2, 3]].tolist()


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 40), st.integers(0, 3 * BLOCK)), min_size=0, max_size=8),
    shifts=st.lists(st.integers(0, 15), min_size=8, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_kernel_and_fused_pack_match_reference_on_random_tables(
    sizes: list[int], shifts: list[int], seed: int
) -> None:
    if not KERNEL_ON_CPU:
        pytest.skip("the interpreter is off (a GPU is present); the cuda cases cover the kernel")
    regions, cursor = [], 0
    for n, shift in zip(sizes, shifts):
        cursor += shift
        regions.append((cursor, n))
        cursor += n
    buf = _buffer(cursor + 16, "cpu", seed)
    table = _table(buf, regions)
    ref = region_checksums_reference(table, device="cpu")
    assert torch.equal(region_checksums(table, device="cpu", use_triton=True), ref)
    packed = torch.zeros(cursor + 16 * len(regions) + 16, dtype=torch.uint8)
    rows, off = [], 0
    for s, n in regions:
        rows.append((buf.data_ptr() + s if n else 0, off, n))
        off += n + 16
    fused = torch.empty(len(regions), dtype=torch.int64)
    pack_gather(table_from_triples(rows), packed, checksums=fused, use_triton=True)
    assert torch.equal(fused, ref)


def test_bad_outputs_and_tables_are_refused_with_what_was_given() -> None:
    buf = _buffer(64, "cpu")
    table = _table(buf, [(0, 8), (8, 8)])
    with pytest.raises(RegionTableError, match=r"int64 tensor of shape \(2,\)"):
        region_checksums(table, torch.empty(3, dtype=torch.int64), device="cpu")
    with pytest.raises(RegionTableError, match="dtype=torch.int32"):
        region_checksums(table, torch.empty(2, dtype=torch.int32), device="cpu")
    with pytest.raises(RegionTableError, match="needs device="):
        region_checksums(table)
    with pytest.raises(RegionTableError, match="nbytes is negative"):
        region_checksums(table_from_triples([(buf.data_ptr(), 0, -1)]), device="cpu")
    with pytest.raises(RegionTableError, match=r"shape \(2,\)"):
        two = table_from_triples([(buf.data_ptr(), 0, 8), (buf.data_ptr(), 8, 8)])
        pack_gather(two, torch.empty(16, dtype=torch.uint8), checksums=torch.empty(1, dtype=torch.int64))


def test_reference_is_used_where_the_kernel_cannot_run() -> None:
    buf = _buffer(100, "cpu")
    table = _table(buf, [(1, 50), (60, 33)])
    got = region_checksums(table, device="cpu", use_triton=False)
    assert got.tolist() == _spec(buf, [(1, 50), (60, 33)])
