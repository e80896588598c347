"""What a user relies on, on every staging path (the ``staging_path`` fixture of ``conftest.py``):
CPU cached and fresh; on the fake device (see ``tests/_staging.py``) packed and direct, each
cached and captured then replayed, cached and eager, and fresh.

The staged copy is bit-exact (every dtype, a bool tensor, a view into a larger storage, tied
weights and a transposed view sharing one staged storage, non-tensor leaves), owns its bytes,
keeps them when the source is updated in place afterwards or when ``stage()`` runs again while it
is held, and a later stage (a replay on the graph paths) copies the source as it is then. Each
test checks that the stage took the path asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from _helpers import assert_same
from _staging import StagingPath

from stager.tree import leaves, tensors_in


def _state_dict() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 48, generator=g)  # 9 KiB: copied directly even where small ones are packed
    storage = torch.randn(1000, generator=g)
    return {
        "w": w,
        "w_tied": w,
        "w_t": w.t(),
        "mask": torch.rand(37, generator=g) > 0.5,
        "row": storage[101:357],  # a view at an odd offset into a larger storage
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "ids": torch.randint(-1000, 1000, (17,), dtype=torch.int64, generator=g),
        "step": torch.tensor(7),
        "meta": {"epoch": 3, "names": ["a", "b"]},
        "nested": [torch.randn(3, generator=g), (torch.ones(2, dtype=torch.int8),)],
    }


def _update_in_place(sd: dict[str, Any]) -> None:
    """What a training step does to the sources: every tensor changes, none moves."""
    for t in (sd["w"], sd["row"], sd["bf16"], sd["ids"], sd["step"], *tensors_in(sd["nested"])):
        t.add_(1)
    sd["mask"].logical_not_()


def _assert_copy(src: dict[str, Any], out: dict[str, Any]) -> None:
    """``out`` is a bit-exact staged copy of ``src``: same structure, dtypes, shapes, strides and
    bytes, its own storages, tied tensors and views sharing one staged storage."""
    assert_same(src, out)
    for (path, a), (_, b) in zip(leaves(src), leaves(out)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), path
            assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr(), path
    storage = out["w"].untyped_storage().data_ptr()
    assert out["w_tied"].untyped_storage().data_ptr() == storage
    assert out["w_t"].untyped_storage().data_ptr() == storage
    assert out["w_t"].data_ptr() == out["w"].data_ptr()
    assert out["meta"] is not src["meta"] and out["meta"]["names"] is not src["meta"]["names"]


def test_the_staged_copy_is_bit_exact(staging_path: StagingPath) -> None:
    sd = _state_dict()
    with staging_path.stager() as stager:
        out = stager.stage(sd)
        staging_path.assert_taken(stager.last_stats, reused=False)
    _assert_copy(sd, out)


def test_the_staged_copy_does_not_follow_later_in_place_updates(staging_path: StagingPath) -> None:
    sd = _state_dict()
    before = _state_dict()  # the same values, views and ties
    with staging_path.stager() as stager:
        out = stager.stage(sd)
        staging_path.assert_taken(stager.last_stats, reused=False)
        _update_in_place(sd)
        assert not torch.equal(sd["mask"], before["mask"]) and not torch.equal(sd["w"], before["w"])
        assert_same(before, out)
    assert_same(before, out)  # and after the stager closed


def test_a_second_stage_after_the_source_changed_copies_it_as_it_is_then(staging_path: StagingPath) -> None:
    # The first copy is released: a cached path reuses its arena (a graph path replays the graph
    # captured by the first stage, which must read the sources' new bytes).
    sd = _state_dict()
    with staging_path.stager() as stager:
        out = stager.stage(sd)
        staging_path.assert_taken(stager.last_stats, reused=False)
        del out
        for _ in range(2):
            _update_in_place(sd)
            out = stager.stage(sd)
            staging_path.assert_taken(stager.last_stats, reused=True)
            _assert_copy(sd, out)
            del out
        assert stager.plans_built == 1
        if staging_path.graph:
            assert (stager.last_stats.captures, stager.last_stats.replays) == (1, 2)


def test_a_held_copy_is_untouched_by_the_next_stage(staging_path: StagingPath) -> None:
    # DCP's semantics: a staged dict stays valid while held, even when stage() is called again
    # (a cached path takes a second arena, a graph path captures a second graph for it).
    sd = _state_dict()
    before = _state_dict()  # the same values, views and ties
    with staging_path.stager() as stager:
        first = stager.stage(sd)
        _update_in_place(sd)
        second = stager.stage(sd)
        staging_path.assert_taken(stager.last_stats, reused=False)
        assert first["w"].untyped_storage().data_ptr() != second["w"].untyped_storage().data_ptr()
        _assert_copy(before, first)
        _assert_copy(sd, second)
