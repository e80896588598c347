"""Peer replication under real gloo: packed arenas to the partner, bit-exact, and back on failure.

Every rank stages a state dict of its own (seeded by its rank: every dtype, views, tied storages,
an ``OrderedDict``, a namedtuple, a DTensor shard, non-tensor leaves) and replicates it to its
partner ``(rank + world // 2) % world``; each replica must equal its source's state bit for bit.
A "failed" rank gets its state back from its partner's memory. A rank with bad input fails on
that rank, and its partner does not hang: it gets the failure at once (``abort``), or a timeout
naming the rank when the failing rank never replicates.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, NamedTuple

import pytest
import torch
from _cluster import cluster, pools_fixture
from _helpers import assert_same, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]


_pools = pools_fixture()


class Moments(NamedTuple):
    mean: torch.Tensor
    count: int


def rank_state(rank: int, mesh: Any = None, step: int = 0) -> dict[str, Any]:
    """A state dict that differs per rank, deterministic from the rank (and ``step``)."""
    g = torch.Generator().manual_seed(100 + rank)
    base = random_tensor((64,), torch.float32, g)
    model = collections.OrderedDict()
    for i, dt in enumerate(DTYPES):
        model[f"p{i}"] = random_tensor((3, i + 2), dt, g)
    model["tied"] = model["p0"]
    state: dict[str, Any] = {
        "model": model,
        "views": [base[2:10], base[::4], base.view(8, 8).t()],  # one storage, three views
        "moments": Moments(torch.full((2,), float(rank)), 3 + rank),
        "empty": torch.empty(0, 5),
        "optim": {
            "step": step, "lr": 0.1 * (rank + 1),
            "state": {0: {"exp_avg": random_tensor((5,), torch.float32, g)}},
        },
        "name": f"rank{rank}",
    }
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Shard

        # Rank r's shard of (full + r): what rank r holds, computed anywhere without a collective.
        full = random_tensor((8, 3), torch.float32, torch.Generator().manual_seed(7)) + rank
        world = mesh.size()
        local = full.chunk(world)[rank].clone()
        state["dt"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
    return state


def assert_structure_kept(replica: dict[str, Any]) -> None:
    """Views stay views of one storage; tied weights stay tied."""
    ptrs = {v.untyped_storage().data_ptr() for v in replica["views"]}
    assert len(ptrs) == 1
    assert (
        replica["model"]["tied"].untyped_storage().data_ptr()
        == replica["model"]["p0"].untyped_storage().data_ptr()
    )


# Bit-exact replication
def _replicate_bit_exact(rank: int, world: int, chunk_bytes: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from stager import GraphStager
    from stager.distributed import Replicator

    mesh = init_device_mesh("cpu", (world,))
    stager = GraphStager()
    rep = Replicator(stager, timeout=30, chunk_bytes=chunk_bytes)
    assert rep.partner == (rank + world // 2) % world and rep.source == (rank - world // 2) % world
    stats = []
    replica = None
    for step in range(3):
        state = rank_state(rank, mesh, step=step)
        staged = stager.stage(state)
        del replica  # the previous replica is released: its receive arena is reused
        replica = rep.replicate(staged)
        del staged  # the stager's arena comes free for the next stage
        stats.append(rep.last_stats)
        assert_same(rank_state(rep.source, mesh, step=step), replica)
        assert_structure_kept(replica)
    plans = [s.plan_sent for s in stats]
    # Packed-arena messages: headers, replies and metadata, then ceil(bytes / chunk) chunks.
    chunks = -(-stats[-1].sent_bytes // chunk_bytes)
    return {
        "plans": plans,
        "zero_copy": [s.zero_copy for s in stats],
        "sent": stats[-1].sent_bytes,
        "chunks": chunks,
        "messages": stats[-1].messages,
        "arena": stager.plan.arena_bytes,
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_replicate_to_partner_is_bit_exact(world: int) -> None:
    results = cluster(world).run(_replicate_bit_exact, 1000)
    for r in results:
        # The plan goes once; later steps send the buffer and the changed leaves only.
        assert r["plans"] == [True, False, False]
        assert r["zero_copy"] == [True, True, True]  # sent straight from the stager's arena
        assert r["sent"] <= r["arena"] and r["chunks"] > 1
        assert r["messages"] == 2 * (2 + 1 + r["chunks"])  # both directions


def _replicate_foreign_dict(rank: int, world: int) -> bool:
    """A staged dict the stager did not make (plain CPU tensors) is packed, then sent."""
    from stager.distributed import Replicator

    rep = Replicator(timeout=30)
    state = rank_state(rank)
    replica = rep.replicate(state)
    assert_same(rank_state(rep.source), replica)
    assert_structure_kept(replica)
    return rep.last_stats.zero_copy


@pytest.mark.slow
def test_replicate_any_cpu_state_dict_by_packing() -> None:
    assert cluster(2).run(_replicate_foreign_dict) == [False, False]


# A failed rank restored from its partner's memory
def make_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _restore_failed_rank(rank: int, world: int) -> str:
    from stager import GraphStager
    from stager.distributed import Replicator

    model, opt = make_model(seed=rank)
    stager = GraphStager()
    rep = Replicator(stager, timeout=30)
    staged = stager.stage({"model": model.state_dict(), "optim": opt.state_dict()})
    replica = rep.replicate(staged)  # every rank now holds its source's state
    holder = rep.partner  # the rank that holds this rank's state

    if rank == 1:
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        expected_optim = opt.state_dict()
        # Rank 1 "dies": the restarted process has a new model and a new replicator (no cached
        # plan), and gets its state back from the rank that holds its replica.
        group = rep.group
        del model, opt, staged, replica, rep
        model, opt = make_model(seed=99)
        assert not torch.equal(model.state_dict()["0.weight"], expected["0.weight"])
        fresh = Replicator(GraphStager(), group=group, timeout=30)
        restored = fresh.recv(src=holder)
        assert fresh.last_stats.plan_sent is False  # plan_sent is the sender's figure
        _load_into(restored, model, opt)
        for k, v in expected.items():
            assert torch.equal(model.state_dict()[k], v), k
        got = opt.state_dict()
        for i, st in expected_optim["state"].items():
            for name, v in st.items():
                assert torch.equal(got["state"][i][name], v), (i, name)
        assert got["param_groups"] == expected_optim["param_groups"]
        return "restored"
    if rep.source == 1:
        rep.send(replica, dst=1)  # the replica goes back as it is: a staged dict like any other
        assert rep.last_stats.plan_sent and rep.last_stats.zero_copy
        return "sent"
    return "idle"


def _load_into(staged: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    try:
        from stager.restore import restore_state
    except ImportError:  # the in-place restore helper is not there: load_state_dict copies too
        model.load_state_dict(staged["model"])
    else:
        restore_state(staged["model"], model.state_dict())
    opt.load_state_dict(staged["optim"])


@pytest.mark.slow
def test_failed_rank_is_restored_from_its_partner() -> None:
    assert cluster(2).run(_restore_failed_rank) == ["sent", "restored"]


# Bad input on one rank: a clear error there, no hang anywhere
def _bad_input_with_abort(rank: int, world: int) -> dict[str, Any]:
    from stager import GraphStager, StagingInputError
    from stager.distributed import PartnerFailedError, Replicator

    stager = GraphStager()
    rep = Replicator(stager, timeout=30)
    state = rank_state(rank)
    if rank == 1:
        state["optim"]["state"][0]["exp_avg"] = torch.empty(5, device="meta")
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        staged, replica = rep.stage_and_replicate(state)
        out["result"] = "ok"
    except StagingInputError as exc:
        out["result"] = f"StagingInputError: {exc}"
    except PartnerFailedError as exc:
        out["result"] = f"PartnerFailedError: {exc}"
    out["seconds"] = time.perf_counter() - t0
    # Both sides finished the exchange: the next step replicates normally.
    state = rank_state(rank, step=1)
    replica = rep.replicate(stager.stage(state))
    assert_same(rank_state(rep.source, step=1), replica)
    return out


@pytest.mark.slow
def test_bad_input_fails_on_that_rank_and_its_partner_is_told_at_once() -> None:
    world = 4
    out = cluster(world).run(_bad_input_with_abort)
    assert out[1]["result"].startswith("StagingInputError") and "['exp_avg']" in out[1]["result"]
    partner = (1 + world // 2) % world
    assert out[partner]["result"].startswith("PartnerFailedError")
    assert "rank 1 failed" in out[partner]["result"] and "meta" in out[partner]["result"]
    assert out[partner]["seconds"] < 10
    for r in set(range(world)) - {1, partner}:
        assert out[r]["result"] == "ok"


def _bad_input_without_abort(rank: int, world: int, timeout: float) -> dict[str, Any]:
    from stager import GraphStager, StagingInputError
    from stager.distributed import ReplicationTimeoutError, Replicator

    stager = GraphStager()
    rep = Replicator(stager, timeout=timeout)
    state = rank_state(rank)
    if rank == 1:
        state["model"]["p0"] = torch.empty(2, device="meta")
    t0 = time.perf_counter()
    try:
        staged = stager.stage(state)  # rank 1 raises here and never replicates
        rep.replicate(staged)
        result = "ok"
    except StagingInputError as exc:
        result = f"StagingInputError: {exc}"
    except ReplicationTimeoutError as exc:
        result = f"ReplicationTimeoutError: {exc}"
    return {"result": result, "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_partner_of_a_rank_that_never_replicates_times_out_naming_it() -> None:
    world, timeout = 2, 2.0
    out = cluster(world).run(_bad_input_without_abort, timeout)
    assert out[1]["result"].startswith("StagingInputError") and "['p0']" in out[1]["result"]
    assert out[0]["result"].startswith("ReplicationTimeoutError") and "rank 1 did not" in out[0]["result"]
    assert timeout <= out[0]["seconds"] < timeout + 10


# Same addresses, another grouping; a failure after the headers; a DTensor inside an object
def _regrouped_at_the_same_addresses(rank: int, world: int) -> list[bool]:
    import numpy as np

    from stager.distributed import Replicator

    rep = Replicator(timeout=30)
    arr = np.arange(128, dtype=np.float32) + 1000 * rank
    want = np.arange(128, dtype=np.float32) + 1000 * ((rank + world // 2) % world)
    out = []
    for tied in (False, True, False):
        if tied:  # one storage, two views: the same data_ptr, shape, stride and dtype as before
            v = torch.from_numpy(arr)
            sd = {"x": v[:64], "y": v[64:]}
        else:  # two storages over the same memory
            sd = {"x": torch.from_numpy(arr[:64]), "y": torch.from_numpy(arr[64:])}
        replica = rep.replicate(sd)
        out.append(
            torch.equal(replica["x"], torch.from_numpy(want[:64]))
            and torch.equal(replica["y"], torch.from_numpy(want[64:]))
        )
    return out


@pytest.mark.slow
def test_the_same_addresses_grouped_into_other_storages_replicate_bit_exactly() -> None:
    assert cluster(2).run(_regrouped_at_the_same_addresses) == [[True] * 3] * 2


def _receiver_fails_after_the_headers(rank: int, world: int) -> list[str]:
    from stager import GraphStager
    from stager.distributed import Replicator

    stager = GraphStager()
    rep = Replicator(stager, timeout=3)
    staged = stager.stage({"w": torch.arange(4096.0) + rank})
    if rank == 1:
        def no_memory(*args: Any) -> Any:
            raise MemoryError("no host memory for the replica (injected)")

        rep._lease = no_memory  # type: ignore[method-assign]
    seen = []
    for _ in range(2):
        try:
            replica = rep.replicate(staged)
            seen.append("equal" if torch.equal(replica["w"], torch.arange(4096.0) + rep.source) else "WRONG")
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
    return seen


@pytest.mark.slow
def test_a_receiver_that_fails_after_the_headers_never_gives_its_partner_a_wrong_replica() -> None:
    r0, r1 = cluster(2).run(_receiver_fails_after_the_headers)
    assert all("WRONG" not in s for s in r0 + r1)
    assert r1[0].startswith("MemoryError") and "unusable" in r1[1]
    assert all(s.startswith(("ReplicationTimeoutError", "ReplicationError")) for s in r0), r0


@dataclasses.dataclass
class EMA:
    shadow: dict


def _dtensor_inside_an_object(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from stager import GraphStager
    from stager.distributed import Replicator

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(16.0).reshape(8, 2), mesh, [Shard(0)])
    stager = GraphStager()
    staged = stager.stage({"w": w, "ema": EMA({"w": w})})
    try:
        Replicator(stager, timeout=10).replicate(staged)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "replicated"


@pytest.mark.slow
def test_a_dtensor_inside_an_object_is_refused_clearly() -> None:
    for r in cluster(2).run(_dtensor_inside_an_object):
        assert r.startswith("ReplicationError") and "DTensor inside an object" in r, r
