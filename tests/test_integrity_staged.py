"""Checksums of staged copies: restore verifies the staged copy before writing anything back.

The checksums are taken once a copy into a staged set is complete (``staging_hook``), found from
any staged tensor, and not used while the set is being staged into again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _integrity import checksum_when_staged, live_state, make

import stager
from stager import GraphStager, IntegrityError
from stager.integrity import region_of


@pytest.fixture
def staging_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    checksum_when_staged(monkeypatch)


def test_restore_verifies_the_staged_copy_first(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        want = {k: v.clone() for k, v in live["model"].items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            live["model"]["w"].zero_()
        stats = st.restore(staged, live)
    assert any(n.startswith("verified ") for n in stats.notes)
    assert torch.equal(live["model"]["w"], want["w"])


def test_a_flipped_byte_in_the_staged_arena_refuses_restore_and_writes_nothing(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        hit = region_of(staged["model"]["b"])
        assert hit is not None
        staged_set, region = hit
        staged_set.arena.array[staged_set.plan.regions[region].arena_offset + 5] ^= 0x40
        with torch.no_grad():
            for t in (live["model"]["w"], live["model"]["b"], *live["views"]):
                t.fill_(7.0)
        before = [t.clone() for t in (live["model"]["w"], live["model"]["b"], live["views"][0])]
        with pytest.raises(IntegrityError) as info:
            st.restore(staged, live)
    assert "state_dict['model']['b']" in str(info.value) and "nothing was written" in str(info.value)
    assert info.value.path == "state_dict['model']['b']"
    for a, b in zip(before, (live["model"]["w"], live["model"]["b"], live["views"][0])):
        assert torch.equal(a, b)


def test_restore_of_a_copy_staged_without_checksums_says_it_is_unverified() -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        stats = st.restore(staged, live)
    assert any("unverified" in n for n in stats.notes)


def test_wrap_restore_refuses_a_changed_staged_copy(staging_hook: None, tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        handle.checkpoint(tmp_path / "c")
        handle.wait()
        staged_weight = handle._last_staged["model"]["2.weight"]
        staged_weight.view(-1)[3] += 1.0  # host memory of the staged copy changes
        with torch.no_grad():
            model[2].weight.zero_()
        with pytest.raises(IntegrityError, match=r"state_dict\['model'\]\['2.weight'\]"):
            handle.restore()
        assert torch.count_nonzero(model[2].weight) == 0


def test_checksums_of_a_set_staged_again_are_not_used_while_it_is_in_flight(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        staged_set, _ = region_of(staged["model"]["w"])
        staged_set.in_flight = True
        try:
            assert region_of(staged["model"]["w"]) is None
        finally:
            staged_set.in_flight = False
        assert region_of(staged["model"]["w"]) is not None
