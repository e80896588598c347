"""Staged sets and their leases: a staged copy is handed out as new tensors over the set's storages,
and the set is not reused while anything (a dict, a view, a storage) still holds one of them."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_same

from stager import GraphStager, LeaseTimeoutError


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
