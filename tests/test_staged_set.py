"""Staged sets and their leases: a staged copy is handed out as new tensors over the set's storages,
and the set is not reused while anything (a dict, a view, a storage) still holds one of them."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_same
from hypothesis import given, settings
from hypothesis import strategies as st

from stager import GraphStager, LeaseTimeoutError
from stager.staged_set import _byte_runs


def _tamper(t: torch.Tensor) -> None:
    t.t_()
    t.requires_grad_(True)
    t.grad = torch.ones_like(t)
    t.note = "x"  # type: ignore[attr-defined]


def test_what_a_holder_did_to_its_staged_tensors_never_reaches_the_next_stage() -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "v": torch.arange(4.0)}
    with GraphStager(cache_policy="cached", max_arenas=1, lease_policy="wait", lease_timeout=5) as stager:
        out = stager.stage(sd)
        _tamper(out["w"])
        out["v"].resize_(0)
        del out
        again = stager.stage(sd)  # the same arena: released above
        assert stager.last_stats.arena == "cached"
        assert_same(sd, again)
        assert not again["w"].requires_grad and again["w"].grad is None and not hasattr(again["w"], "note")


def test_a_storage_kept_through_set_still_holds_the_lease() -> None:
    sd = {"w": torch.arange(4.0)}
    with GraphStager(cache_policy="auto", max_arenas=1, lease_policy="allocate") as stager:
        out = stager.stage(sd)
        held = torch.empty(0).set_(out["w"].untyped_storage(), 0, (4,), (1,))
        out["w"].set_(torch.empty(0))  # gives up its own use of the storage
        del out
        sd["w"].fill_(-7.0)
        again = stager.stage(sd)
        assert held.tolist() == [0.0, 1.0, 2.0, 3.0]  # the held copy was not overwritten
        assert again["w"].tolist() == [-7.0] * 4


def test_a_held_staged_dict_is_never_overwritten() -> None:
    sd = {"w": torch.zeros(1000)}
    with GraphStager(lease_policy="allocate", max_arenas=2, cache_policy="auto") as stager:
        held = [stager.stage(sd)]
        for i in range(1, 6):
            sd["w"].fill_(float(i))
            held.append(stager.stage(sd))
        for i, out in enumerate(held):
            assert torch.equal(out["w"], torch.full((1000,), float(i)))
        assert len(stager._sets) == 2  # the rest were fresh arenas


def test_a_held_view_or_storage_keeps_the_lease() -> None:
    sd = {"w": torch.zeros(8)}
    with GraphStager(cache_policy="cached", max_arenas=1, lease_policy="wait", lease_timeout=0.05) as stager:
        out = stager.stage(sd)
        view = out["w"][2:]
        del out
        with pytest.raises(LeaseTimeoutError, match="STAGER_LEASE_TIMEOUT"):
            stager.stage(sd)
        del view
        storage = stager.stage(sd)["w"].untyped_storage()
        with pytest.raises(LeaseTimeoutError):
            stager.stage(sd)
        del storage
        assert torch.equal(stager.stage(sd)["w"], sd["w"])


def test_without_storage_use_counts_a_handed_out_arena_is_never_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import stager.staged_set as staged_set_mod

    monkeypatch.setattr(staged_set_mod, "_storage_use_count", None)
    sd = {"w": torch.zeros(8)}
    with GraphStager(cache_policy="cached", max_arenas=1, lease_policy="wait", lease_timeout=0.05) as stager:
        view = stager.stage(sd)["w"][2:]  # only a view survives: invisible without use counts
        sd["w"].fill_(1.0)
        with pytest.raises(LeaseTimeoutError):
            stager.stage(sd)
        assert torch.equal(view, torch.zeros(6))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=10), st.integers(1, 8))
def test_cpu_runs_cover_every_byte_once_in_order_and_split_the_bytes_evenly(
    sizes: list[int], parts: int
) -> None:
    runs = _byte_runs(sizes, parts)
    pieces = [
        (r, lo if r == a else 0, hi if r == b else sizes[r]) for a, lo, b, hi in runs for r in range(a, b + 1)
    ]
    assert all(0 <= s < e <= sizes[r] for r, s, e in pieces)
    flat = [(r, byte) for r, s, e in pieces for byte in range(s, e)]
    assert flat == [(r, byte) for r, n in enumerate(sizes) for byte in range(n)]
    per_run = [sum(hi - lo for _, lo, hi in _pieces_of(run, sizes)) for run in runs]
    assert max(per_run) - min(per_run) <= 1 and len(runs) == min(parts, sum(sizes))


def _pieces_of(run: tuple[int, int, int, int], sizes: list[int]) -> list[tuple[int, int, int]]:
    a, lo, b, hi = run
    return [(r, lo if r == a else 0, hi if r == b else sizes[r]) for r in range(a, b + 1)]


def test_the_staging_thread_splits_large_regions_over_its_copy_threads_bit_exactly() -> None:
    sd = {"big": torch.randn(3_000_000), "odd": torch.randint(0, 255, (5_000_001,), dtype=torch.uint8),
          "small": [torch.full((7,), float(i)) for i in range(5)]}
    with GraphStager(async_staging=True, cache_policy="cached") as stager:
        for _ in range(2):
            out = stager.stage(sd).result()
            assert_same(sd, out)
            del out
        if stager._executor.submit(torch.get_num_threads).result() == 1 and stager._cpu_threads > 1:
            # an OpenMP torch: the staging thread copies on itself alone, and splits the bytes
            staged_set = next(iter(stager._sets))
            (first, _), (second, _) = staged_set.cpu_parts(2)
            assert first[-1].data_ptr() + first[-1].numel() == second[0].data_ptr()  # one region, cut
