"""Pack gather / unpack scatter: the Triton kernel against the plain-torch reference, bit for bit.

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest);
the ``cuda`` parametrisations run the compiled kernel on a GPU and are skipped elsewhere.
Every packed buffer and every restored arena is poisoned first, and the expected result is
built independently (slice assignment), so a byte written outside a region fails the test.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import KERNEL_DEVICES as DEVICES
from _helpers import KERNEL_ON_CPU, POISON
from hypothesis import given, settings
from hypothesis import strategies as st

from stager.errors import RegionTableError
from stager.kernels import (
    BLOCK,
    WIDE_MIN,
    PackTable,
    pack_gather,
    pack_gather_reference,
    packed_size,
    prepare_table,
    table_from_tensors,
    table_from_triples,
    unpack_scatter,
    unpack_scatter_reference,
    validate_table,
)

MIB = 1 << 20

# A layout is a list of (source byte offset in the arena, packed offset, nbytes) triples.
Layout = list[tuple[int, int, int]]


def _single(nbytes: int, addr_shift: int = 0, offset_shift: int = 0) -> Layout:
    """One region, with poison bytes before and after it in the packed buffer."""
    return [(addr_shift, 32 + offset_shift, nbytes)]


def _many(sizes: list[int], seed: int, misalign: bool = True, shuffle: bool = True) -> Layout:
    """Regions back to back in the arena (optionally at odd addresses), packed in another order."""
    rng = random.Random(seed)
    src: list[int] = []
    cursor = 0
    for n in sizes:
        cursor += rng.randrange(16) if misalign else -cursor % 16
        src.append(cursor)
        cursor += n
    order = list(range(len(sizes)))
    if shuffle:
        rng.shuffle(order)
    dst = [0] * len(sizes)
    cursor = 8
    for i in order:
        cursor += rng.randrange(16) if misalign else -cursor % 16
        dst[i] = cursor
        cursor += sizes[i]
    return [(s, d, n) for s, d, n in zip(src, dst, sizes, strict=True)]


def _huge_next_to_tiny() -> Layout:
    rng = random.Random(7)
    sizes = [rng.randrange(1, 41) for _ in range(2000)]
    sizes.insert(1000, MIB)
    return _many(sizes, seed=8, misalign=False)


MIXED = [0, 1, 3, 15, 16, 17, 40, 4095, 4096, 2 * BLOCK + 5, 7, 256]

CASES = [
    pytest.param(_single(0), 0, id="size0"),
    pytest.param(_single(1), 0, id="size1"),
    pytest.param(_single(3), 0, id="size3"),
    pytest.param(_single(15), 0, id="size15"),
    pytest.param(_single(16), 0, id="size16"),
    pytest.param(_single(17), 0, id="size17"),
    pytest.param(_single(4095), 0, id="size4095"),
    pytest.param(_single(4096), 0, id="size4096"),
    pytest.param(_single(17, 1, 0), 0, id="size17-addr+1"),
    pytest.param(_single(4095, 3, 5), 0, id="size4095-addr+3-offset+5"),
    pytest.param(_single(4096, 7, 7), 0, id="size4096-addr+7-offset+7"),
    pytest.param(_single(31, 9, 9), 0, id="size31-addr+9-offset+9"),
    pytest.param(_single(2 * BLOCK + 17, 9, 9), 0, id="three-blocks-addr+9-offset+9"),
    pytest.param(_single(MIB + 3, 1, 0), 0, id="1MiB+3-addr+1"),
    pytest.param(_many(MIXED, seed=1), 0, id="mixed-misaligned-shuffled"),
    pytest.param(_many(MIXED, seed=2, misalign=False), 0, id="mixed-aligned-shuffled"),
    pytest.param(_many(MIXED, seed=3, misalign=False), 1, id="mixed-aligned-buffer+1"),
    pytest.param(_huge_next_to_tiny(), 0, id="1MiB-next-to-2000-tiny"),
]


def _arena(layout: Layout, device: str, seed: int = 0) -> torch.Tensor:
    """Random source bytes covering every region, with slack past the end."""
    size = max((s + n for s, _, n in layout), default=0) + 64
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).to(device)


def _table(layout: Layout, arena: torch.Tensor) -> torch.Tensor:
    base = arena.data_ptr()
    return table_from_triples((base + s, d, n) for s, d, n in layout)


def _packed_buffer(layout: Layout, device: str, shift: int) -> torch.Tensor:
    """A poisoned packed buffer that starts ``shift`` bytes past an aligned allocation."""
    size = max((d + n for _, d, n in layout), default=0) + 37
    return torch.full((size + shift,), POISON, dtype=torch.uint8, device=device)[shift:]


def _expected_packed(layout: Layout, arena: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    expected = torch.full_like(out, POISON)
    for s, d, n in layout:
        expected[d : d + n] = arena[s : s + n]
    return expected


def _poisoned_regions(layout: Layout, arena: torch.Tensor) -> torch.Tensor:
    """Poison every region's bytes of ``arena`` in place; return a copy of what was there."""
    before = arena.clone()
    for s, _, n in layout:
        arena[s : s + n] = POISON
    return before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout, shift", CASES)
def test_pack_gather_matches_reference(layout: Layout, shift: int, device: str) -> None:
    arena = _arena(layout, device)
    table = _table(layout, arena)
    out = _packed_buffer(layout, device, shift)
    ref = _packed_buffer(layout, device, shift)

    pack_gather(table, out, use_triton=True)
    pack_gather_reference(table, ref)

    assert torch.equal(out, ref)
    assert torch.equal(out, _expected_packed(layout, arena, out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout, shift", CASES)
def test_unpack_scatter_restores_regions(layout: Layout, shift: int, device: str) -> None:
    arena = _arena(layout, device)
    table = prepare_table(_table(layout, arena), device)
    packed = _packed_buffer(layout, device, shift)
    pack_gather_reference(table, packed)  # the kernel's packing is tested above

    original = _poisoned_regions(layout, arena)
    unpack_scatter_reference(table, packed)
    by_reference = arena.clone()
    _poisoned_regions(layout, arena)
    unpack_scatter(table, packed, use_triton=True)

    assert torch.equal(arena, by_reference)
    assert torch.equal(arena, original)


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.complex64,
    torch.complex128,
    *(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)),
]


def _random_tensor(
    numel: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype`` (NaNs included), built as bytes and viewed."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).to(device)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_every_dtype_round_trips_as_bytes(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    whole = _random_tensor(1000, dtype, device, gen)
    tensors = [
        _random_tensor(1, dtype, device, gen),
        _random_tensor(0, dtype, device, gen),
        _random_tensor(257, dtype, device, gen).reshape(257, 1),
        whole[1:600],  # a view one element into its storage: an odd address for 1-byte dtypes
        _random_tensor(24, dtype, device, gen).reshape(2, 3, 4),
    ]
    table = table_from_tensors(tensors, align=1 if dtype.itemsize == 1 else 16)
    out = torch.full((packed_size(table) + 5,), POISON, dtype=torch.uint8, device=device)
    pack_gather(table, out, use_triton=True)

    expected = torch.full_like(out, POISON)
    for (_, offset, nbytes), t in zip(table.tolist(), tensors, strict=True):
        expected[offset : offset + nbytes] = _as_bytes(t)
    assert torch.equal(out, expected)

    restored = [torch.zeros_like(t) for t in tensors]
    unpack_scatter(table_from_tensors(restored, offsets=table[:, 1].tolist()), out, use_triton=True)
    for t, r in zip(tensors, restored, strict=True):
        assert torch.equal(_as_bytes(r), _as_bytes(t))


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[Layout, int]:
    sizes = draw(
        st.lists(
            st.one_of(st.integers(0, 64), st.integers(0, 600), st.integers(BLOCK - 20, BLOCK + 40)),
            min_size=0,
            max_size=10,
        )
    )
    src_gaps = draw(st.lists(st.integers(0, 33), min_size=len(sizes), max_size=len(sizes)))
    dst_gaps = draw(st.lists(st.integers(0, 33), min_size=len(sizes), max_size=len(sizes)))
    order = draw(st.permutations(range(len(sizes))))
    src, cursor = [], 0
    for n, gap in zip(sizes, src_gaps, strict=True):
        src.append(cursor + gap)
        cursor += gap + n
    dst, cursor = [0] * len(sizes), 0
    for i in order:
        dst[i] = cursor + dst_gaps[i]
        cursor = dst[i] + sizes[i]
    shift = draw(st.sampled_from([0, 0, 0, 8, 3]))
    return [(s, d, n) for s, d, n in zip(src, dst, sizes, strict=True)], shift


def _check_launch_table(prepared: PackTable, table: torch.Tensor) -> None:
    """What the kernel's alignment hints rely on, and the chunks covering every byte once."""
    addr, off, nbytes, wide = prepared.blocks.cpu().unbind(1)
    head = (-addr) % 16
    words = wide > 0
    assert bool((nbytes > 0).all()) and bool((nbytes <= BLOCK).all())
    assert int(nbytes.sum()) == int(table[:, 2].sum())
    assert bool((wide % 16 == 0).all())
    assert bool(((off[words] + head[words]) % 16 == 0).all())
    assert bool((head[words] + wide[words] <= nbytes[words]).all())
    assert bool((nbytes[words] - wide[words] < 32).all())


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(case=_layouts())
def test_generated_tables(case: tuple[Layout, int], device: str) -> None:
    layout, shift = case
    arena = _arena(layout, device, seed=len(layout))
    table = _table(layout, arena)
    _check_launch_table(prepare_table(table, device), table)
    out = _packed_buffer(layout, device, shift)
    ref = _packed_buffer(layout, device, shift)

    pack_gather(table, out, use_triton=True)
    pack_gather_reference(table, ref)
    assert torch.equal(out, ref)
    assert torch.equal(out, _expected_packed(layout, arena, out))

    original = _poisoned_regions(layout, arena)
    unpack_scatter(table, out, use_triton=True)
    assert torch.equal(arena, original)


@pytest.mark.parametrize("device", DEVICES)
def test_prepared_table_launches_repeatedly(device: str) -> None:
    layout = _many([5, 40, 4096, 300, 17], seed=4)
    arena = _arena(layout, device)
    prepared = prepare_table(_table(layout, arena), device)
    out = _packed_buffer(layout, device, 0)
    for step in range(3):
        arena.add_(step)  # the sources change between launches; the table does not
        pack_gather(prepared, out, validate=False, use_triton=True)
        assert torch.equal(out, _expected_packed(layout, arena, out))


@pytest.mark.cuda
def test_prepared_table_replays_in_cuda_graph() -> None:
    layout = _many([5, 40, 4096, 3 * BLOCK + 1, 17], seed=5)
    arena = _arena(layout, "cuda")
    prepared = prepare_table(_table(layout, arena), "cuda")
    out = _packed_buffer(layout, "cuda", 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pack_gather(prepared, out)  # warm-up: compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pack_gather(prepared, out, validate=False)
    for step in range(3):
        arena.add_(step + 1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _expected_packed(layout, arena, out))


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


def test_use_triton_true_fails_where_the_kernel_cannot_run() -> None:
    table = _triples((ADDR, 0, 4))
    with pytest.raises(RuntimeError, match="use_triton=True but the Triton kernel cannot run"):
        pack_gather(table, torch.zeros(8, dtype=torch.uint8, device="meta"), use_triton=True)


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


def test_lean_import_and_reference_fallback_without_triton() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import stager, stager.kernels
        lean = "triton" not in sys.modules
        sys.modules["triton"] = None  # from here on, importing triton fails
        import torch
        from stager.kernels import kernel_backend, pack_gather, table_from_tensors, triton_available
        x = torch.arange(40, dtype=torch.uint8)
        out = torch.zeros(51, dtype=torch.uint8)
        pack_gather(table_from_tensors([x[1:], x[:3]]), out)
        sys.stdout.write(json.dumps({
            "lean": lean,
            "available": triton_available(),
            "backend": kernel_backend("cpu"),
            "out": out.tolist(),
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["lean"] is True
    assert result["available"] is False
    assert result["backend"] == "reference"
    assert result["out"] == list(range(1, 40)) + [0] * 9 + [0, 1, 2]
