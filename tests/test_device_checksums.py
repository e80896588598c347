"""Region checksums computed by the device staging program (``STAGER_CHECKSUM=on``).

A checksum program hashes every region it stages in its own launches: the packs through the fused
``pack_gather(..., checksums=...)``, the direct regions with one checksum-kernel launch over their
sources, into one device buffer copied to a host buffer before the done marker. Here programs run
on CPU tensors, eagerly and through the fake CUDA of ``tests/test_graphs.py`` (whose fake graph
replays the ops bound at capture time), packing with the plain-torch reference and with the Triton
kernels under the interpreter; every value is compared with the definition
(:func:`stager.kernels.lanes64.checksum_bytes`), bit for bit. The ``cuda`` test runs the same on a
GPU with real CUDA graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import _staging as fakes
import pytest
import torch
from _helpers import POISON, assert_same
from _staging import CPU, GPU0, KiB, chunks_for, mixed_state_dict, plan_of, raw, regions

from stager import GraphStager, StageStats
from stager.arena import HostArena
from stager.device import PendingCopy, device_checksums
from stager.envs import format_size
from stager.errors import IntegrityError
from stager.graphs import (
    ChecksumCopyOp,
    ChecksumOp,
    PackOp,
    RecordEventOp,
    bind_program,
    build_program,
    capture_key,
    run_eager,
)
from stager.integrity import region_of, verify_staged_tensors
from stager.kernels import kernel_backend, lanes64
from stager.plan import Plan
from stager.staged_set import StagedSet
from stager.tree import rebuild

BACKENDS = [
    pytest.param(False, id="reference"),
    pytest.param(
        True,
        id="triton-interpreter",
        marks=pytest.mark.skipif(
            kernel_backend("cpu") != "triton-interpreter", reason="TRITON_INTERPRET is off (a GPU is present)"
        ),
    ),
]

@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes.install_fake_cuda(monkeypatch)


def expected(plan: Plan, index: list[int] | tuple[int, ...]) -> list[int]:
    """The checksum of each region's source bytes, from the definition (int64 bits)."""
    data = [plan.src_views[i].cpu().numpy().tobytes() for i in index]
    return [lanes64.to_signed(lanes64.checksum_bytes(b)) for b in data]


def _buffers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # poisoned: a slot the program forgets to write keeps a value no checksum has here
    return torch.full((n,), -1, dtype=torch.int64), torch.full((n,), -2, dtype=torch.int64)


def _with_empty(sd: dict[str, Any]) -> dict[str, Any]:
    sd["empty"] = torch.empty(0)  # a region of no bytes has a checksum too (or none at all)
    return sd


def test_a_checksum_program_hashes_every_region_once_and_copies_the_values_last() -> None:
    rs = regions([100, 300, 5000, 64 * KiB, 10, 20, 30, 70 * KiB])
    plain = build_program(rs, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20)
    p = build_program(rs, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20, checksum=True)
    assert p.checksum and not plain.checksum and plain.checksum_regions == ()
    assert p != plain and p.key != plain.key  # a different program, so a different capture
    # the same copies, plus the checksum launch and the copy of the values before the done marker
    plain_kinds = [op.kind for op in plain.ops]
    assert [op.kind for op in p.ops] == plain_kinds[:-1] + ["checksum", "copy-sums", "record"]
    assert sorted(p.checksum_regions) == sorted(p.regions)  # one slot per region
    packs = [op for op in p.ops if isinstance(op, PackOp)]
    for op in packs:  # each pack writes the contiguous slots of its own regions
        assert p.checksum_regions[op.checksum_at : op.checksum_at + len(op.regions)] == op.regions
    (sums,) = [op for op in p.ops if isinstance(op, ChecksumOp)]
    assert sums.regions == p.direct_regions == (3, 7)
    assert p.checksum_regions[sums.first :] == sums.regions and sums.nbytes == 134 * KiB
    assert isinstance(p.ops[-2], ChecksumCopyOp) and p.ops[-2].count == 8
    assert isinstance(p.ops[-1], RecordEventOp)
    assert all(op.checksum_at == -1 for op in plain.ops if isinstance(op, PackOp))
    text = p.describe(format_size)
    assert "checksums on the device" in text and "8 checksums -> host" in text
    for n in (1, 2, 3, 10):  # the checksum ops ride in the last piece, as the done marker does
        assert len(p.pieces(n)) == len(plain.pieces(n))
        assert p.pieces(n)[-1].stop == len(p.ops)


def test_a_program_of_packed_regions_only_launches_no_checksum_kernel() -> None:
    rs = regions([100, 200, 300])
    p = build_program(rs, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20, checksum=True)
    assert [op.kind for op in p.ops] == ["pack", "copy-chunk", "copy-sums", "record"]
    assert p.checksum_regions == (0, 1, 2)


@pytest.mark.parametrize("use_triton_", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_an_eager_checksum_program_computes_each_regions_checksum_bit_exactly(
    use_triton_: bool, seed: int
) -> None:
    sd = _with_empty(mixed_state_dict(seed))
    plan, tensors, others = plan_of(sd)
    program = build_program(plan.regions, CPU, pack_threshold=8 * KiB, chunk_size=1 << 20, checksum=True)
    assert program.packed and program.directs
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    staged_set.arena.tensor.fill_(POISON)
    dev, host = _buffers(len(program.checksum_regions))
    bindings = bind_program(
        program, plan.src_views, staged_set.arena.tensor, chunks_for(program),
        use_triton=use_triton_, checksums=dev, host_checksums=host,
    )
    run_eager(bindings)
    assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))  # still a bit-exact copy
    want = expected(plan, program.checksum_regions)
    assert dev.tolist() == want and host.tolist() == want
    for t in sd.values():
        t.view(torch.uint8).add_(1)
    run_eager(bindings)  # the same bindings: the new bytes' checksums
    assert host.tolist() == expected(plan, program.checksum_regions) != want


def test_bind_needs_both_checksum_buffers_of_the_right_shape() -> None:
    plan, _, _ = plan_of({"a": raw(100, 0), "b": raw(100, 1), "c": raw(20 * KiB, 2)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20, checksum=True)
    arena = HostArena(plan.arena_bytes).tensor
    dev, host = _buffers(3)
    views, chunks = plan.src_views, chunks_for(program)
    with pytest.raises(ValueError, match="needs checksums: a contiguous int64 tensor of 3 elements"):
        bind_program(program, plan.src_views, arena, chunks_for(program), host_checksums=host)
    with pytest.raises(ValueError, match="needs host_checksums"):
        bind_program(program, plan.src_views, arena, chunks_for(program), checksums=dev)
    with pytest.raises(ValueError, match="got dtype=torch.int32"):
        bind_program(program, views, arena, chunks, checksums=dev.int(), host_checksums=host)
    with pytest.raises(ValueError, match=r"shape=\(2,\)"):
        bind_program(program, views, arena, chunks, checksums=dev[:2], host_checksums=host)
    b = bind_program(program, views, arena, chunks, checksums=dev, host_checksums=host)
    other = bind_program(program, views, arena, chunks, checksums=dev.clone(), host_checksums=host)
    assert capture_key(b) != capture_key(other)  # a capture bakes the checksum buffers in


def _launch(copier: Any, plan: Plan, staged_set: StagedSet) -> tuple[StageStats, PendingCopy]:
    stats = StageStats()
    pending = copier.launch(plan, staged_set, fakes.FakeStream(), stats)
    pending.wait()
    return stats, pending


@pytest.mark.parametrize("use_triton_", BACKENDS)
@pytest.mark.parametrize("pieces", [1, 3])
def test_captured_checksums_are_bit_exact_and_follow_in_place_updates_on_replay(
    fake_cuda: None, use_triton_: bool, pieces: int
) -> None:
    sd = _with_empty(mixed_state_dict(5))
    plan, tensors, others = plan_of(sd)
    copier = fakes.cpu_copier(checksum="on", replay_pieces=pieces, triton="on" if use_triton_ else "off")
    staged_set = fakes.pinned_set(plan)
    stats, pending = _launch(copier, plan, staged_set)
    program = copier.program
    assert program is not None and program.checksum and program.packed and program.directs
    assert stats.executor == "graph-capture"
    got = device_checksums(pending, staged_set)
    assert got is not None
    index, values = got
    assert sorted(index) == sorted(program.regions) == list(range(len(plan.regions)))
    assert values.tolist() == expected(plan, index)  # the warm-up computed them
    for step in range(2):
        for t in sd.values():
            t.view(torch.uint8).add_(step + 1)  # in place: the graphs stay valid
        stats, pending = _launch(copier, plan, staged_set)
        assert stats.executor == "graph-replay"
        index, values = device_checksums(pending, staged_set)  # type: ignore[misc]
        assert values.tolist() == expected(plan, index)
        assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))
    assert (copier.captures, copier.replays) == (1, 2)
    made = fakes.FakeGraph.made
    assert len(made) == len(program.pieces(pieces)) and all(g.replays == 2 for g in made)


def test_without_checksum_on_the_program_computes_none(fake_cuda: None) -> None:
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    plan, _, _ = plan_of(sd)
    for mode in ("auto", "off"):
        copier = fakes.cpu_copier(checksum=mode)
        staged_set = fakes.pinned_set(plan)
        _, pending = _launch(copier, plan, staged_set)
        assert copier.program is not None and not copier.program.checksum
        assert pending.checksums == () and device_checksums(pending, staged_set) is None


def test_fresh_sets_are_bound_with_their_own_checksum_buffers(fake_cuda: None) -> None:
    sd = {f"t{i}": raw(300 + i, i) for i in range(6)}
    sd["big"] = raw(30 * KiB, 9)
    plan, _, _ = plan_of(sd)
    copier = fakes.cpu_copier(checksum="on")
    a, b = fakes.pinned_set(plan, cached=False), fakes.pinned_set(plan, cached=False)
    pending = PendingCopy()
    copier.launch(plan, a, fakes.FakeStream(), StageStats(), pending)
    sd["big"].add_(1)
    copier.launch(plan, b, fakes.FakeStream(), StageStats(), pending)
    pending.wait()
    index_a, values_a = device_checksums(pending, a)  # type: ignore[misc]
    index_b, values_b = device_checksums(pending, b)  # type: ignore[misc]
    assert index_a == index_b
    big = index_a.index(plan.leaves[[leaf.path for leaf in plan.leaves].index("['big']")].region)
    assert values_a[big] != values_b[big]  # one set's values did not overwrite the other's
    assert values_b.tolist() == expected(plan, index_b)


def _plans_split(monkeypatch: pytest.MonkeyPatch, on_cpu: str = "\0") -> None:
    """Plans whose regions count as on ``cuda:0`` (the fake device), except those under a key
    containing ``on_cpu``, which keep the CPU path (and are relabelled so that the fake copier,
    whose device is the CPU, leaves them out of its program)."""
    import stager.pipeline as stager_module

    real_build = stager_module.build_plan

    def split(*args: Any, **kwargs: Any) -> Plan:
        plan = real_build(*args, **kwargs)
        cpu = sorted({leaf.region for leaf in plan.leaves if on_cpu in leaf.path and leaf.region >= 0})
        plan.regions = [
            dataclasses.replace(r, device=torch.device("cpu", 0)) if r.index in cpu else r
            for r in plan.regions
        ]
        plan.device_regions = {GPU0: [i for i in plan.cpu_index if i not in cpu]}
        plan.cpu_index = cpu
        plan.cpu_src = [plan.src_views[i] for i in cpu]
        return plan

    monkeypatch.setattr(stager_module, "build_plan", split)


@pytest.fixture
def device_stager(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A factory of GraphStagers with ``checksum=on`` whose cuda:0 copier is the CPU fake, and a
    record of which regions the CPU checksum pass hashed while staging."""
    import stager.integrity.staged as integrity
    import stager.pipeline as stager_module

    class Registered(HostArena):  # as if registered with CUDA: graphs are allowed
        def __init__(self, nbytes: int, **kw: Any) -> None:
            super().__init__(nbytes, **{**kw, "pinned": False})
            self.pinned = True

    monkeypatch.setattr(stager_module, "HostArena", Registered)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fakes.FakeStream())
    hashed: list[list[int]] = []
    real_set_checksums = integrity._set_checksums
    real_checksum_staged_set = integrity.checksum_staged_set

    def checksum_staged_set(staged_set: StagedSet, stats: Any = None, **kw: Any) -> None:
        def spy(s: StagedSet, regions: Any = None, threads: int = 1) -> Any:
            hashed.append(list(range(len(s.plan.regions))) if regions is None else [int(i) for i in regions])
            return real_set_checksums(s, regions, threads)

        monkeypatch.setattr(integrity, "_set_checksums", spy)
        try:
            real_checksum_staged_set(staged_set, stats, **kw)
        finally:
            monkeypatch.setattr(integrity, "_set_checksums", real_set_checksums)

    monkeypatch.setattr(stager_module, "checksum_staged_set", checksum_staged_set)

    class Factory:
        def __init__(self) -> None:
            self.hashed = hashed

        def __call__(self, **overrides: Any) -> GraphStager:
            cfg = dict(
                cache_policy="cached", max_arenas=1, pack_threshold=8 * KiB, chunk_size=1 << 20, checksum="on"
            )
            stager = GraphStager(**{**cfg, **overrides})
            stager._copiers[GPU0] = fakes.cpu_copier(checksum=stager.config.checksum.value)
            return stager

    return Factory()


def _items(out: dict[str, Any]) -> list[tuple[torch.Tensor, str]]:
    return [(t, f"['{k}']") for k, t in out.items() if isinstance(t, torch.Tensor)]


def _flip_a_byte(out: dict[str, Any], key: str) -> None:
    t = out[key]
    hit = region_of(t)
    assert hit is not None, key
    staged_set, i = hit
    staged_set.arena.tensor[staged_set.plan.regions[i].arena_offset + 3] ^= 0x10


def test_a_device_stage_stores_the_programs_checksums_and_verification_catches_a_flipped_byte(
    device_stager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plans_split(monkeypatch)
    sd = mixed_state_dict(6)
    sd["tied_b"] = sd["small1"]
    with device_stager() as stager:
        for step in range(3):
            out = stager.stage(sd)
            assert_same(sd, out)
            assert stager.last_stats.executor == ("graph-capture" if step == 0 else "graph-replay")
            assert device_stager.hashed == []  # no CPU pass: every region is the device's
            staged_set, _ = region_of(out["small0"])  # type: ignore[misc]
            every = range(len(staged_set.plan.regions))
            assert staged_set.checksums.tolist() == expected(staged_set.plan, every)
            report = verify_staged_tensors(_items(out))
            assert report.regions == len(staged_set.plan.regions) and not report.unverified
            del out, staged_set
            for t in sd.values():
                t.view(torch.uint8).add_(1)
        out = stager.stage(sd)
        _flip_a_byte(out, "large3")
        with pytest.raises(IntegrityError, match=r"state_dict\['large3'\]"):
            verify_staged_tensors(_items(out))


def test_a_mixed_stage_takes_device_values_for_device_regions_and_hashes_the_cpu_ones(
    device_stager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plans_split(monkeypatch, on_cpu="cpu_")
    sd = {f"s{i}": raw(100 + 7 * i, i) for i in range(10)}
    sd.update({f"cpu_{i}": raw(50 + i, 40 + i) for i in range(4)})
    sd["big"] = raw(40 * KiB + 3, 77)
    sd["cpu_big"] = raw(20 * KiB + 5, 78)
    with device_stager() as stager:
        for _ in range(2):
            out = stager.stage(sd)
            assert_same(sd, out)
            staged_set, _ = region_of(out["s0"])  # type: ignore[misc]
            plan = staged_set.plan
            cpu = sorted(plan.cpu_index)
            assert len(cpu) == 5 and plan.device_regions[GPU0]
            assert device_stager.hashed[-1] == cpu  # the CPU pass hashed the CPU regions alone
            assert staged_set.checksums.tolist() == expected(plan, range(len(plan.regions)))
            verify_staged_tensors(_items(out))
            del out, staged_set
            for t in sd.values():
                t.add_(1)
        out = stager.stage(sd)
        for key in ("cpu_big", "s3"):
            _flip_a_byte(out, key)
            with pytest.raises(IntegrityError, match=rf"state_dict\['{key}'\]"):
                verify_staged_tensors(_items(out))
            _flip_a_byte(out, key)  # flipped back: verifies again
            verify_staged_tensors(_items(out))


def test_auto_stores_no_checksums_on_the_device_path(
    device_stager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plans_split(monkeypatch)
    sd = {f"t{i}": raw(300 + i, i) for i in range(8)}
    with device_stager(checksum="auto") as stager:
        out = stager.stage(sd)
        assert_same(sd, out)
        assert region_of(out["t0"]) is None  # nothing stored, nothing to verify against
        assert verify_staged_tensors(_items(out)).unverified
        assert device_stager.hashed == []


@pytest.mark.cuda
def test_gpu_graph_checksums_match_the_definition_and_catch_a_flipped_byte() -> None:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    for i in range(200):
        n = int(torch.randint(1, 3000, (1,), generator=gen))
        sd[f"small{i}"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).cuda()
    for i in range(4):
        sd[f"large{i}"] = torch.randn(300_000 + i, generator=gen).cuda()
    sd["odd"] = sd["large0"][7:100_007]  # an odd start in its storage
    with GraphStager(cache_policy="cached", max_arenas=1, checksum="on") as stager:
        for step in range(3):
            out = stager.stage(sd)
            assert stager.last_stats.executor == ("graph-capture" if step == 0 else "graph-replay")
            assert stager.last_stats.device_path == "packed"
            for k, t in sd.items():
                assert torch.equal(out[k].view(torch.uint8), t.cpu().view(torch.uint8)), k
            staged_set, _ = region_of(out["small0"])  # type: ignore[misc]
            plan = staged_set.plan
            # the plain-torch reference over the staged bytes (equal to the sources, checked above)
            want = [lanes64.to_signed(lanes64.checksum_tensor_torch(b)) for b in staged_set.bases]
            assert len(want) == len(plan.regions)
            assert staged_set.checksums.tolist() == want
            verify_staged_tensors(_items(out))
            del out, staged_set
            for t in sd.values():
                t.view(torch.uint8).add_(1)  # in place: replayed, new values
        out = stager.stage(sd)
        _flip_a_byte(out, "small7")
        with pytest.raises(IntegrityError, match=r"state_dict\['small7'\]"):
            verify_staged_tensors(_items(out))
