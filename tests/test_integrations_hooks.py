"""The hooks frameworks use on a ``GraphStager``: ``prewarm``, ``release_sources``, ``release`` and
``host_bytes``, each observed (memory held, copies made, arenas reused), not assumed."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch

import stager
from stager import GraphStager, HostBytes


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": {f"w{i}": torch.randn(128, 32) for i in range(8)}, "step": 5}


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tensors copied by ``torch._foreach_copy_`` (the CPU copy path)."""
    seen: list[int] = []
    real = torch._foreach_copy_

    def counting(dst: list[torch.Tensor], src: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        seen.append(len(dst))
        return real(dst, src, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", counting)
    return seen


def test_prewarm_plans_and_allocates_but_copies_nothing(copies: list[int]) -> None:
    src = _state()
    with GraphStager() as gs:
        assert gs.host_bytes() == HostBytes(total=0, pinned=0)
        gs.prewarm(src)
        warm = gs.host_bytes().total
        assert gs.plans_built == 1 and warm >= sum(t.nbytes for t in src["model"].values())
        assert copies == []
        staged = gs.stage(src)
        stats = gs.last_stats
        # The first checkpoint neither planned nor allocated: it reused what prewarm made.
        assert not stats.replanned and stats.alloc_s == 0 and stats.arena == "cached"
        assert gs.plans_built == 1 and gs.host_bytes().total == warm
        assert sum(copies) == len(src["model"])
        assert all(torch.equal(staged["model"][k], v) for k, v in src["model"].items())
        assert stats.host_bytes == warm and stats.pinned_bytes == 0


def test_release_sources_drops_the_stagers_references_to_source_memory() -> None:
    arr = np.arange(4096, dtype=np.float32)
    alive = weakref.ref(arr)
    src: dict[str, Any] = {"w": torch.from_numpy(arr), "b": torch.ones(3)}
    with GraphStager() as gs:
        staged = gs.stage(src)
        assert torch.equal(staged["w"], src["w"])
        held = gs.host_bytes().total
        del src, arr, staged
        gc.collect()
        assert alive() is not None  # the plan still points at the source storage
        gs.release_sources()
        gc.collect()
        assert alive() is None  # nothing in the stager holds the source memory any more
        again = {"w": torch.ones(4096), "b": torch.ones(3)}
        staged = gs.stage(again)
        assert gs.plans_built == 2 and gs.last_stats.replanned
        assert gs.host_bytes().total == held  # the arena was kept as a spare and reused
        assert torch.equal(staged["w"], again["w"])


def test_a_held_staged_dict_keeps_its_arena_and_release_frees_it() -> None:
    src = _state()
    with GraphStager() as gs:
        first = gs.stage(src)
        one = gs.host_bytes().total
        second = gs.stage(src)  # `first` still holds its arena: a second one is taken
        assert gs.last_stats.arena == "new-cached" and gs.host_bytes().total == 2 * one
        gs.release(first)
        assert all(t.numel() == 0 for t in first["model"].values())  # it can no longer be read
        src["model"]["w0"].add_(1.0)
        third = gs.stage(src)  # `second` is still held: the released arena serves this one
        assert gs.last_stats.arena == "cached" and gs.host_bytes().total == 2 * one
        assert torch.equal(third["model"]["w0"], src["model"]["w0"])
        assert not torch.equal(second["model"]["w0"], src["model"]["w0"])  # `second` kept its bytes


def test_release_takes_the_future_of_an_async_stage() -> None:
    src = _state()
    with GraphStager(async_staging=True) as gs:
        future = gs.stage(src)
        keep = gs.stage(src).result()  # a second arena, held
        staged = future.result()
        two = gs.host_bytes().total
        gs.release(future)
        assert all(t.numel() == 0 for t in staged["model"].values())
        gs.stage(src).result()
        assert gs.last_stats.arena == "cached" and gs.host_bytes().total == two
        assert torch.equal(keep["model"]["w1"], src["model"]["w1"])
        with pytest.raises(ValueError, match="has not resolved"):
            gs.release(Future())


def test_host_bytes_follow_a_fresh_arena_until_its_dict_is_dropped() -> None:
    src = _state()
    with GraphStager(cache_policy="fresh") as gs:
        staged = gs.stage(src)
        held = gs.host_bytes().total
        assert held >= sum(t.nbytes for t in src["model"].values())
        assert gs.last_stats.host_bytes == held
        del staged
        gc.collect()
        assert gs.host_bytes().total == 0


def test_host_bytes_is_exported() -> None:
    assert stager.HostBytes is HostBytes


def test_importing_the_integrations_package_imports_no_framework() -> None:
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, stager.integrations\n"
        "print(json.dumps([m for m in ('torchtitan', 'torch_checkpointing') if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
