"""Region tables: the launch table a prepared table holds, and every malformed table or buffer
rejected before a byte is copied, by the kernel launchers and the references alike."""

from __future__ import annotations

import pytest
import torch
from _helpers import KERNEL_ON_CPU, POISON

from stager.errors import RegionTableError
from stager.kernels import BLOCK, WIDE_MIN, PackTable
from stager.kernels.pack import pack_gather, unpack_scatter
from stager.kernels.reference import pack_gather_reference, unpack_scatter_reference
from stager.kernels.table import (
    packed_size,
    prepare_table,
    table_from_tensors,
    table_from_triples,
    validate_table,
)


def test_launch_table_splits_blocks_and_marks_wide_words() -> None:
    # Synthetic addresses: preparing a table never touches the memory.
    table = table_from_triples(
        [
            (0x10005, 5, 2 * BLOCK + 100),  # same misalignment on both sides: head 11, then words
            (0x20003, 1 << 20, 100),  # different misalignment: bytes only
            (0x30000, 1 << 21, 0),  # empty: no block
            (0x40000, 1 << 22, WIDE_MIN - 1),  # aligned but short: bytes only
            (0x50000, 1 << 23, WIDE_MIN + 4),  # aligned: words and a 4-byte tail
        ]
    )
    prepared = prepare_table(table, "cpu")
    expected = torch.tensor(
        [
            [0x10005, 5, BLOCK, BLOCK - 16],
            [0x10005 + BLOCK, 5 + BLOCK, BLOCK, BLOCK - 16],
            [0x10005 + 2 * BLOCK, 5 + 2 * BLOCK, 100, 80],
            [0x20003, 1 << 20, 100, 0],
            [0x40000, 1 << 22, WIDE_MIN - 1, 0],
            [0x50000, 1 << 23, WIDE_MIN + 4, WIDE_MIN],
        ],
        dtype=torch.int64,
    )
    assert isinstance(prepared, PackTable)
    assert torch.equal(prepared.blocks, expected)
    assert prepared.n_blocks == 6 and prepared.n_regions == 5
    assert prepared.nbytes == 2 * BLOCK + 200 + 2 * WIDE_MIN + 3
    assert prepared.wide_nbytes == 2 * BLOCK - 32 + 80 + WIDE_MIN
    assert prepared.packed_nbytes == (1 << 23) + WIDE_MIN + 4
    assert prepared.scatter_conflict is None


def _triples(*rows: tuple[int, int, int]) -> torch.Tensor:
    return table_from_triples(rows)


ADDR = 0x7000_0000  # synthetic: every table below is rejected before any byte is read

BAD_TABLES = [
    pytest.param(torch.zeros(2, 3, dtype=torch.int32), "dtype=torch.int32", id="int32"),
    pytest.param(torch.zeros(2, 3, dtype=torch.float64), "dtype=torch.float64", id="float64"),
    pytest.param(torch.zeros(2, 4, dtype=torch.int64), r"shape=\(2, 4\)", id="four-columns"),
    pytest.param(torch.zeros(6, dtype=torch.int64), r"shape=\(6,\)", id="one-dimensional"),
    pytest.param([[ADDR, 0, 4]], "got list", id="not-a-tensor"),
    pytest.param(
        _triples((ADDR, 0, 4), (ADDR + 8, 8, 4), (ADDR + 16, -3, 4)),
        r"row 2 \(address=0x70000010, offset=-3, nbytes=4\): offset is negative",
        id="negative-offset",
    ),
    pytest.param(
        _triples((ADDR, 0, 4), (ADDR + 8, 8, -1)),
        r"row 1 .*nbytes=-1\): nbytes is negative",
        id="negative-nbytes",
    ),
    pytest.param(
        _triples((ADDR, 0, 4), (0, 8, 4)), r"row 1 .*: address is null", id="null-address"
    ),
    pytest.param(_triples((-16, 0, 4)), r"row 0 .*: address is negative", id="negative-address"),
    pytest.param(
        _triples((ADDR, (1 << 63) - 2, 4)),
        r"row 0 .*offset \+ nbytes overflows",
        id="offset-overflow",
    ),
    pytest.param(
        _triples((ADDR, 0, 4), (ADDR + 8, 60, 8)),
        r"row 1 .*ends at byte 68, past the end of the packed buffer \(64 bytes\)",
        id="past-the-end",
    ),
    pytest.param(
        _triples((ADDR, 0, 8), (ADDR + 8, 16, 8), (ADDR + 16, 32, 8), (ADDR + 24, 20, 8)),
        r"row 3 \(.*offset=20.*\) overlaps row 1 \(.*offset=16.*\) in the packed buffer",
        id="overlap-in-packed-buffer",
    ),
]


@pytest.mark.parametrize("table, match", BAD_TABLES)
@pytest.mark.parametrize(
    "launch",
    [pack_gather, unpack_scatter, pack_gather_reference, unpack_scatter_reference],
    ids=["pack_gather", "unpack_scatter", "pack_gather_reference", "unpack_scatter_reference"],
)
def test_bad_table_is_rejected_naming_the_row(launch: object, table: object, match: str) -> None:
    buf = torch.full((64,), POISON, dtype=torch.uint8)
    with pytest.raises(RegionTableError, match=match):
        launch(table, buf)  # type: ignore[operator]
    assert bool((buf == POISON).all())


def test_prepare_table_rejects_bad_table_before_launch() -> None:
    with pytest.raises(RegionTableError, match="row 1 .*offset is negative"):
        prepare_table(_triples((ADDR, 0, 4), (ADDR, -1, 4)), "cpu")


def test_validation_is_vectorised_over_large_tables() -> None:
    n = 100_000
    rows = torch.arange(n, dtype=torch.int64)
    table = torch.stack([ADDR + rows * 64, rows * 64, torch.full_like(rows, 64)], dim=1)
    validate_table(table, packed_nbytes=n * 64, for_scatter=True)
    table[n - 2, 1] = (n - 3) * 64 + 8
    with pytest.raises(RegionTableError, match=f"row {n - 2} .* overlaps row {n - 3} "):
        validate_table(table)


def test_unpack_refuses_regions_that_overlap_at_their_address() -> None:
    source = torch.arange(32, dtype=torch.uint8)
    table = _triples((source.data_ptr(), 0, 16), (source.data_ptr() + 8, 16, 16))
    out = torch.full((32,), POISON, dtype=torch.uint8)
    pack_gather(table, out, use_triton=KERNEL_ON_CPU)  # reading one byte twice is fine
    assert torch.equal(out, torch.cat([source[:16], source[8:24]]))
    prepared = prepare_table(table, "cpu")
    assert prepared.scatter_conflict is not None
    for launch in (unpack_scatter, unpack_scatter_reference):
        for t in (table, prepared):
            with pytest.raises(RegionTableError, match="row 1 .* overlaps row 0 .* at its address"):
                launch(t, out)  # type: ignore[operator]


BAD_BUFFERS = [
    pytest.param(torch.zeros(64, dtype=torch.int8), "dtype=torch.int8", id="int8"),
    pytest.param(torch.zeros(128, dtype=torch.uint8)[::2], r"stride=\(2,\)", id="non-contiguous"),
    pytest.param(
        torch.zeros(3, dtype=torch.uint8), r"row 0 .*past the end .*\(3 bytes\)", id="too-small"
    ),
    pytest.param(
        torch.zeros(64, dtype=torch.uint8, device="meta"),
        "is for cpu but out is on meta",
        id="other-device",
    ),
]


@pytest.mark.parametrize("buf, match", BAD_BUFFERS)
def test_bad_buffer_is_rejected_for_prepared_tables(buf: torch.Tensor, match: str) -> None:
    source = torch.arange(16, dtype=torch.uint8)
    prepared = prepare_table(_triples((source.data_ptr(), 0, 16)), "cpu")
    with pytest.raises(RegionTableError, match=match):
        pack_gather(prepared, buf)


@pytest.mark.cuda
def test_table_on_another_device_is_rejected() -> None:
    table = _triples((ADDR, 0, 4)).to("cuda")
    with pytest.raises(RegionTableError, match="the region table is on cuda:0 but out is on cpu"):
        pack_gather(table, torch.zeros(8, dtype=torch.uint8))


def test_table_from_tensors_rejects_what_it_cannot_describe() -> None:
    base = torch.zeros(4, 4)
    with pytest.raises(RegionTableError, match=r"row 1: tensor of shape \(4,\) .* not contiguous"):
        table_from_tensors([base[0], base[:, 0]])
    with pytest.raises(RegionTableError, match="one device"):
        table_from_tensors([base, torch.zeros(2, device="meta")])
    with pytest.raises(RegionTableError, match="got 2 tensors but 1 offsets"):
        table_from_tensors([base, base], offsets=[0])
    with pytest.raises(RegionTableError, match="row 1: expected"):
        table_from_triples([(ADDR, 0, 4), (ADDR, 4)])


def test_table_from_tensors_lays_out_aligned_offsets() -> None:
    tensors = [torch.zeros(3, dtype=torch.uint8), torch.zeros(0), torch.zeros(5, dtype=torch.int16)]
    table = table_from_tensors(tensors)
    assert table[:, 1].tolist() == [0, 16, 16]
    assert table[:, 2].tolist() == [3, 0, 10]
    assert table[0, 0] == tensors[0].data_ptr() and table[1, 0] == 0
    assert packed_size(table) == 26
