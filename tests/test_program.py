"""Staging programs: which regions pack and which go direct, runs and chunk slots, the listing
and the slicing into pieces, all built for ``cpu`` or a named device without a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _staging import (
    CPU,
    GPU0,
    KiB,
    regions,
)

from stager.envs import format_size
from stager.graphs import (
    MIN_RUN,
    ChunkCopyOp,
    DirectCopyOp,
    PackOp,
    RecordEventOp,
    build_program,
)
from stager.plan import Region


def kinds(program: Any) -> list[str]:
    return [op.kind for op in program.ops]




def test_small_regions_pack_into_one_run_large_ones_go_direct() -> None:
    rs = regions([100, 300, 5000, 64 * KiB, 10, 20, 30])
    p = build_program(rs, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20)
    assert kinds(p) == ["pack", "copy-chunk", "copy-direct", "pack", "copy-chunk", "record"]
    first, copy0, direct, second = p.ops[0], p.ops[1], p.ops[2], p.ops[3]
    assert isinstance(first, PackOp) and first.regions == (0, 1, 2)
    # offsets mirror the arena layout inside the run (alignment padding included)
    assert first.offsets == (0, 256, 768) and first.sizes == (100, 300, 5000)
    assert isinstance(copy0, ChunkCopyOp) and copy0.arena_offset == 0 and copy0.nbytes == 768 + 5000
    assert isinstance(direct, DirectCopyOp) and direct.region == 3 and direct.nbytes == 64 * KiB
    assert isinstance(second, PackOp) and second.regions == (4, 5, 6) and second.slot == 1  # the ring
    assert isinstance(p.ops[-1], RecordEventOp) and p.ops[-1].name == "done"
    assert p.packed_regions == (0, 1, 2, 4, 5, 6) and p.direct_regions == (3,)
    assert p.slots == 2 and p.chunk_bytes == 768 + 5000
    assert p.span_bytes == 768 + 5000 + 256 * 2 + 30 and p.device_bytes == 2 * (768 + 5000)
    assert p.nbytes == sum(r.nbytes for r in rs)
    assert p.packed


@pytest.mark.parametrize(
    "threshold, packed",
    [
        pytest.param(0, (), id="threshold-0-nothing-packed"),
        pytest.param(100, (), id="equal-to-threshold-is-direct"),
        pytest.param(101, (0, 1, 2), id="just-above"),
        pytest.param(1 << 30, (0, 1, 2), id="everything-small"),
    ],
)
def test_packed_direct_split_follows_the_threshold(threshold: int, packed: tuple[int, ...]) -> None:
    p = build_program(regions([100, 100, 100]), CPU, pack_threshold=threshold, chunk_size=1 << 20)
    assert p.packed_regions == packed
    assert sorted(p.packed_regions + p.direct_regions) == [0, 1, 2]


def test_a_lone_small_region_is_copied_directly() -> None:
    assert MIN_RUN == 2
    # small, large, small, large: no two small regions are adjacent in the arena
    p = build_program(regions([10, 5000, 10, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert kinds(p) == ["copy-direct"] * 4 + ["record"]
    assert not p.packed and p.slots == 0 and p.chunk_bytes == 0 and p.device_bytes == 0


def test_runs_are_cut_at_the_chunk_size_and_cycle_through_the_slots() -> None:
    rs = regions([200] * 10)  # one every 256 bytes
    p = build_program(rs, CPU, pack_threshold=1000, chunk_size=1024, slots=2)
    packs = [op for op in p.ops if isinstance(op, PackOp)]
    assert [op.regions for op in packs] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [op.slot for op in packs] == [0, 1, 0]
    assert p.chunk_bytes == 3 * 256 + 200 <= 1024
    copies = [op for op in p.ops if isinstance(op, ChunkCopyOp)]
    assert [(c.arena_offset, c.nbytes) for c in copies] == [(0, 968), (1024, 968), (2048, 456)]


def test_a_region_larger_than_a_chunk_is_direct_even_below_the_threshold() -> None:
    p = build_program(regions([100, 4096, 100]), CPU, pack_threshold=1 << 20, chunk_size=1024)
    assert p.direct_regions == (0, 1, 2)


def test_regions_of_other_devices_end_a_run_and_are_skipped() -> None:
    devs = [GPU0, GPU0, CPU, GPU0, GPU0, torch.device("cuda", 1), GPU0]
    rs = regions([10] * 7, devs)
    p = build_program(rs, GPU0, pack_threshold=1000, chunk_size=1 << 20)
    assert p.regions == (0, 1, 3, 4, 6)
    assert [op.regions for op in p.packs] == [(0, 1), (3, 4)]
    assert p.direct_regions == (6,)
    # no chunk copy covers the arena bytes of region 2 (CPU) or 5 (another device)
    for c in (op for op in p.ops if isinstance(op, ChunkCopyOp)):
        for other in (rs[2], rs[5]):
            before = c.arena_offset + c.nbytes <= other.arena_offset
            assert before or other.arena_offset + other.nbytes <= c.arena_offset


def test_runs_follow_arena_order_not_region_index() -> None:
    # A plan that lays small regions first (index order differs from arena order).
    rs = [
        Region(index=0, device=CPU, nbytes=5000, arena_offset=512, src_offset=0),
        Region(index=1, device=CPU, nbytes=100, arena_offset=0, src_offset=0),
        Region(index=2, device=CPU, nbytes=100, arena_offset=256, src_offset=0),
    ]
    p = build_program(rs, CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert kinds(p) == ["pack", "copy-chunk", "copy-direct", "record"]
    assert p.packs[0].regions == (1, 2) and p.direct_regions == (0,)


def test_pack_false_copies_everything_directly() -> None:
    p = build_program(regions([10, 20, 30]), CPU, pack_threshold=1000, chunk_size=1 << 20, pack=False)
    assert p.direct_regions == (0, 1, 2) and not p.packed


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        build_program(regions([10]), CPU, pack_threshold=1, chunk_size=0)
    with pytest.raises(ValueError, match="slots"):
        build_program(regions([10]), CPU, pack_threshold=1, chunk_size=1, slots=0)


def test_programs_are_immutable_and_compare_by_structure() -> None:
    a = build_program(regions([10, 20, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    b = build_program(regions([10, 20, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    c = build_program(regions([10, 21, 5000]), CPU, pack_threshold=1000, chunk_size=1 << 20)
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert a != c
    with pytest.raises(AttributeError):
        a.ops = ()  # type: ignore[misc]
    assert isinstance(a.ops, tuple)


def test_describe_lists_every_op() -> None:
    p = build_program(regions([100, 300, 64 * KiB]), CPU, pack_threshold=8 * KiB, chunk_size=1 << 20)
    text = p.describe(format_size)
    lines = text.splitlines()
    assert len(lines) == 1 + len(p.ops)
    assert "staging program on cpu" in lines[0]
    assert "2 regions" in lines[0] and "1 runs" in lines[0]
    assert "1 regions (64.00 KiB) copied directly" in lines[0]
    assert "pack" in lines[1] and "regions [0..1]" in lines[1]
    assert "copy-chunk" in lines[2] and "arena[0:556]" in lines[2]
    assert "copy-direct" in lines[3] and "region 2" in lines[3]
    assert "record" in lines[4] and "'done'" in lines[4]
    assert "Program(" in repr(p)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 100])
def test_pieces_cover_the_ops_in_order_and_keep_packs_with_their_copies(n: int) -> None:
    sizes = [100, 100, 4000, 100, 100, 100, 4000, 4000, 100, 100]
    p = build_program(regions(sizes), CPU, pack_threshold=1000, chunk_size=1 << 20)
    pieces = p.pieces(n)
    assert 1 <= len(pieces) <= n
    assert [i for r in pieces for i in r] == list(range(len(p.ops)))
    for r in pieces:
        assert len(r) > 0
        first = p.ops[r.start]
        assert not isinstance(first, (ChunkCopyOp, RecordEventOp)) or r.start == 0
    assert isinstance(p.ops[pieces[-1][-1]], RecordEventOp)
    with pytest.raises(ValueError):
        p.pieces(0)


def test_pieces_balance_bytes() -> None:
    p = build_program(regions([1000] * 8), CPU, pack_threshold=100, chunk_size=1 << 20)  # 8 direct
    pieces = p.pieces(4)
    assert [len(r) for r in pieces] == [2, 2, 2, 3]  # the record op rides with the last copy
