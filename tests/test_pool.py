"""The arena pool: leases, and the host-arena decisions under injected host headroom (wait, allocate,
fail, never overwrite)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch

import stager.pool as pool_mod
from stager import GraphStager, StagingMemoryError
from stager.headroom import read_host


@pytest.fixture
def host_limit(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the bytes the host reading reports as available to this rank."""
    box = {"available": 1 << 40}
    real = read_host()

    def fake_read_host(**kwargs: Any) -> Any:
        return dataclasses.replace(real, available_bytes=box["available"], source="test limit (injected)")

    monkeypatch.setattr(pool_mod, "read_host", fake_read_host)
    return box


def make_sd() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(4096), "b": torch.zeros(16)}


def needed(stager: GraphStager) -> int:
    assert stager.plan is not None
    return stager.plan.arena_bytes


def test_no_room_for_a_second_arena_waits_and_never_overwrites(host_limit: Any) -> None:
    sd = make_sd()
    with GraphStager(lease_policy="wait", lease_timeout=10, max_arenas=2) as stager:
        first = stager.stage(sd)
        assert stager.last_stats is not None and stager.last_stats.arena == "new-cached"
        host_limit["available"] = needed(stager) // 2  # the held arena is all the host allows
        sd["w"].fill_(1.0)
        holder = [first]
        timer = threading.Timer(0.2, holder.clear)
        del first
        timer.start()
        second = stager.stage(sd)
        timer.join()
        assert stager.last_stats.host_decision == "reuse" and stager.last_stats.waited_s >= 0.1
        assert torch.equal(second["w"], sd["w"])


def test_held_copy_with_room_allocates_when_so_configured(host_limit: Any) -> None:
    sd = make_sd()
    with GraphStager(lease_policy="allocate", cache_policy="auto", max_arenas=1) as stager:
        first = stager.stage(sd)
        sd["w"].fill_(2.0)
        second = stager.stage(sd)
        assert stager.last_stats is not None and stager.last_stats.arena == "fresh"
        assert torch.equal(first["w"], torch.zeros(4096))  # not overwritten
        assert torch.equal(second["w"], sd["w"])


def test_held_copy_without_room_and_allocate_policy_raises_with_figures(host_limit: Any) -> None:
    sd = make_sd()
    with GraphStager(lease_policy="allocate", max_arenas=1) as stager:
        first = stager.stage(sd)
        host_limit["available"] = needed(stager) - 1
        with pytest.raises(StagingMemoryError) as info:
            stager.stage(sd)
        msg = str(info.value)
        assert "test limit (injected)" in msg and "STAGER_LEASE_POLICY=wait" in msg
        assert torch.equal(first["w"], torch.zeros(4096))


def test_tight_host_stages_fresh_arenas_instead_of_pinning_for_good(host_limit: Any) -> None:
    sd = make_sd()
    with GraphStager(cache_policy="auto") as stager:
        stager.stage(sd)  # learn the size
        stager.close()
    with GraphStager(cache_policy="auto") as stager:
        host_limit["available"] = 3 * 4096 * 4 // 2  # room for one copy, not for two
        out = stager.stage(sd)
        assert stager.last_stats is not None and stager.last_stats.arena == "fresh"
        assert stager._sets == []
        assert torch.equal(out["w"], sd["w"])


def test_a_released_arena_is_reused() -> None:
    sd = {"w": torch.randn(64)}
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        first = stager.stage(sd)
        ptr = first["w"].data_ptr()
        del first
        second = stager.stage(sd)
        assert second["w"].data_ptr() == ptr
        assert stager.last_stats is not None and stager.last_stats.arena == "cached"


def test_wait_policy_resumes_when_the_holder_releases() -> None:
    sd = {"w": torch.randn(64)}
    with GraphStager(cache_policy="cached", max_arenas=1, lease_policy="wait", lease_timeout=10) as stager:
        box = [stager.stage(sd)]
        timer = threading.Timer(0.1, box.clear)
        timer.start()
        out = stager.stage(sd)
        timer.join()
        assert stager.last_stats is not None and stager.last_stats.waited_s > 0.05
        assert torch.equal(out["w"], sd["w"])


def test_fresh_policy_allocates_every_call() -> None:
    sd = {"w": torch.randn(64)}
    with GraphStager(cache_policy="fresh") as stager:
        a = stager.stage(sd)
        b = stager.stage(sd)
        assert a["w"].data_ptr() != b["w"].data_ptr()
        assert stager._sets == []
