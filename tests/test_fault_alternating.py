"""State dicts staged in turn (model only and full, an EMA copy) each replay their own plan."""

from __future__ import annotations

import gc

import torch

from stager import GraphStager


def _model() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(64) for i in range(8)}


def test_alternating_dicts_replay_their_plans_and_arenas() -> None:
    model = _model()
    ema = {k: v.clone() for k, v in model.items()}
    full = {"model": model, "optim": {"step": 1, "exp_avg": {k: torch.zeros(64) for k in model}}}
    turns = [model, full, ema]
    with GraphStager(max_plans=3, max_arenas=3) as stager:
        for step in range(12):
            sd = turns[step % 3]
            for v in model.values():
                v.add_(1)
            out = stager.stage(sd)
            src = sd if sd is not full else sd["model"]
            got = out if sd is not full else out["model"]
            assert all(torch.equal(got[k], v) for k, v in src.items())
            del out, got
        assert stager.plans_built == 3  # each dict planned once, then replayed
        assert len(stager._sets) == 3  # one arena each, not a new one per call


def test_a_plan_not_in_use_does_not_keep_its_sources_alive() -> None:
    # Only the plan in use holds its sources; the others keep weak references, so temporaries
    # staged once are freed, and their arena is taken as a spare by the next plan.
    with GraphStager(max_plans=3, max_arenas=1) as stager:
        first = {"tmp": torch.randn(1 << 12)}
        stager.stage(first)
        arena = stager._sets[0].arena
        del first
        gc.collect()
        stager.stage({"other": torch.randn(1 << 12)})
        assert stager.plans_built == 2 and len(stager.plans) == 1  # the dead plan was dropped
        assert stager._sets[0].arena is arena  # and its arena reused


def test_a_demoted_plan_matches_again_only_over_live_storages() -> None:
    a = {"w": torch.randn(256)}
    b = {"v": torch.randn(256)}
    with GraphStager(max_plans=2) as stager:
        stager.stage(a)
        stager.stage(b)
        a["w"].add_(5)
        out = stager.stage(a)  # re-adopts a's storages: a replay, not a new plan
        assert stager.plans_built == 2 and torch.equal(out["w"], a["w"])
        a["w"] = torch.randn(256)  # a new tensor, possibly at the old address
        out = stager.stage(a)
        assert torch.equal(out["w"], a["w"])


def test_a_demoted_plan_with_many_cpu_regions_lets_its_sources_go() -> None:
    # Thousands of CPU regions are copied in parts over threads; the parts' source lists were
    # cached on the staged set and kept a demoted plan's sources alive (and would be read again).
    from torch.multiprocessing.reductions import StorageWeakRef

    a = {f"k{i}": torch.full((64,), float(i)) for i in range(2100)}
    with GraphStager(max_plans=3) as stager:
        stager.stage(a)
        stager.stage(a)  # a replay through the cached parts
        weak = StorageWeakRef(a["k7"].untyped_storage())
        stager.stage({"other": torch.ones(3)})  # a's plan is demoted
        del a
        gc.collect()
        assert weak.expired()
