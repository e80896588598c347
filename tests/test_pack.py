"""Pack gather / unpack scatter: the Triton kernel against the plain-torch reference, bit for bit.

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest);
the ``cuda`` parametrisations run the compiled kernel on a GPU and are skipped elsewhere.
Every packed buffer and every restored arena is poisoned first, and the expected result is
built independently (slice assignment), so a byte written outside a region fails the test.
"""

from __future__ import annotations

import random

import pytest
import torch
from _helpers import KERNEL_DEVICES as DEVICES
from _helpers import POISON
from hypothesis import given, settings
from hypothesis import strategies as st

from stager.kernels import (
    BLOCK,
    PackTable,
    pack_gather,
    pack_gather_reference,
    packed_size,
    prepare_table,
    table_from_tensors,
    table_from_triples,
    unpack_scatter,
    unpack_scatter_reference,
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


def _pack_and_compare(layout: Layout, arena: torch.Tensor, table: torch.Tensor, shift: int) -> torch.Tensor:
    """Pack with the kernel and with the reference into poisoned buffers ``shift`` bytes off
    alignment; both must hold exactly the regions' bytes. Returns the kernel's buffer."""
    out = _packed_buffer(layout, arena.device.type, shift)
    ref = _packed_buffer(layout, arena.device.type, shift)
    pack_gather(table, out, use_triton=True)
    pack_gather_reference(table, ref)
    assert torch.equal(out, ref)
    assert torch.equal(out, _expected_packed(layout, arena, out))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout, shift", CASES)
def test_pack_gather_matches_reference(layout: Layout, shift: int, device: str) -> None:
    arena = _arena(layout, device)
    _pack_and_compare(layout, arena, _table(layout, arena), shift)


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
    out = _pack_and_compare(layout, arena, table, shift)

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
