"""Many ranks under real gloo: DTensor and FSDP2 state dicts through GraphStager and DCP.

Every multi-process test runs on a shared pool of 2 or 4 spawned ranks (see ``_cluster.py``):
each rank stages its own shards, ``dcp.async_save`` writes them, and ``dcp.load`` reads them back,
also into another world size (DCP reshards), bit-exactly. The host budget is divided among the
ranks of one host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _cluster import cluster, pools_fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FIXTURES = Path(__file__).parent / "fixtures" / "headroom"


_pools = pools_fixture()


# DTensor state dicts (run inside the ranks)
def global_tensors() -> dict[str, torch.Tensor]:
    """The same global tensors on every rank (uneven shard sizes, several dtypes)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w": torch.randn(8, 5, generator=g),
        "uneven": torch.randn(10, 3, generator=g).to(torch.bfloat16),
        "cols": torch.randint(-1000, 1000, (3, 12), generator=g, dtype=torch.int64),
        "bias": torch.randn(7, generator=g, dtype=torch.float64),
        "tiny": torch.randn(3, generator=g),
    }


def placements_for(name: str) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "w": [Shard(0)], "uneven": [Shard(0)], "cols": [Shard(1)], "bias": [Replicate()], "tiny": [Shard(0)]
    }[name]


def dtensor_state(mesh: Any, scale: float = 0.0) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    out: dict[str, Any] = {"model": {}, "step": 7, "extra": {"note": "hello"}}
    for name, t in global_tensors().items():
        out["model"][name] = distribute_tensor(
            t + scale if t.is_floating_point() else t, mesh, placements_for(name)
        )
    return out


def _save_dtensors(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from stager import GraphStager

    mesh = init_device_mesh("cpu", (world,))
    state = dtensor_state(mesh)
    with GraphStager() as stager:
        staged = stager.stage(state)
        # The staged dict holds DTensors with the same spec around staged local shards.
        for name, src in state["model"].items():
            out = staged["model"][name]
            assert type(out) is DTensor, name
            assert out.device_mesh == src.device_mesh and out.placements == src.placements, name
            assert out.shape == src.shape and out.stride() == src.stride(), name
            assert torch.equal(out._local_tensor, src._local_tensor), name
            assert (
                out._local_tensor.untyped_storage().data_ptr()
                != src._local_tensor.untyped_storage().data_ptr()
            )
        del staged
        fut = dcp.async_save(state, checkpoint_id=ckpt, async_stager=stager)
        # Training goes on: in-place updates after staging must not reach the checkpoint.
        with torch.no_grad():
            for t in state["model"].values():
                t._local_tensor.add_(1)
        fut.result()
        again = stager.stage(state)  # same sources: the plan is replayed, not rebuilt
        plans = stager.plans_built
        del again
    return {"plans_built": plans}


def _load_dtensors(rank: int, world: int, ckpt: str) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    expected = global_tensors()
    target: dict[str, Any] = {"model": {}, "step": 0, "extra": {"note": ""}}
    for name, t in expected.items():
        target["model"][name] = distribute_tensor(torch.zeros_like(t), mesh, placements_for(name))
    dcp.load(target, checkpoint_id=ckpt)
    for name, t in expected.items():
        want = distribute_tensor(t, mesh, placements_for(name))._local_tensor
        got = target["model"][name]._local_tensor
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    assert target["step"] == 7 and target["extra"] == {"note": "hello"}
    return len(expected)


@pytest.mark.slow
def test_dtensor_async_save_4_ranks_then_load_with_4_and_2(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "dtensor4")
    results = cluster(4).run(_save_dtensors, ckpt)
    assert all(r["plans_built"] == 1 for r in results)
    assert cluster(4).run(_load_dtensors, ckpt) == [5] * 4
    assert cluster(2).run(_load_dtensors, ckpt) == [5] * 2  # resharded by DCP


# FSDP2 (fully_shard on a CPU mesh with gloo)
def make_fsdp_model(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.GELU(), torch.nn.Linear(10, 3)
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def full_values(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (DTensor) state dict as a full tensor (collective for DTensors)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    if isinstance(state, DTensor):
        out[prefix] = state.full_tensor()
    elif isinstance(state, torch.Tensor):
        out[prefix] = state.detach().clone()
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            out.update(full_values(state[k], f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(full_values(v, f"{prefix}/{i}"))
    return out


def _fsdp_save(rank: int, world: int, ckpt: str, expected_path: str) -> int:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    from stager import GraphStager

    model, opt = make_fsdp_model(world, seed=0)
    train_step(model, opt, 1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    n_dtensors = sum(isinstance(v, DTensor) for v in msd.values())
    expected = full_values(state)
    if rank == 0:
        torch.save(expected, expected_path)
    # DCP's background save runs collectives while training runs its own: a group of its own.
    ckpt_group = dist.new_group(backend="gloo")
    with GraphStager(async_staging=True) as stager:
        fut = dcp.async_save(state, checkpoint_id=ckpt, async_stager=stager, process_group=ckpt_group)
        fut.staging_completion.result()
        train_step(model, opt, 2)  # the checkpoint keeps the staged values
        fut.upload_completion.result()
    return n_dtensors


def _fsdp_load(rank: int, world: int, ckpt: str, expected_path: str) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = make_fsdp_model(world, seed=5)
    train_step(model, opt, 9)  # optimizer state exists (and differs) before loading
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, opt)
    got = full_values({"model": msd, "optim": osd})
    expected = torch.load(expected_path)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    return len(expected)


@pytest.mark.slow
def test_fsdp2_async_save_2_ranks_then_load_with_4(tmp_path: Path) -> None:
    ckpt, expected = str(tmp_path / "fsdp2"), str(tmp_path / "expected.pt")
    n = cluster(2).run(_fsdp_save, ckpt, expected)
    assert n[0] == 6  # every parameter of the model is a DTensor shard
    counts = cluster(4).run(_fsdp_load, ckpt, expected)
    assert counts[0] > 6


# Bad input on one rank
def _bad_dtensor_local(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from stager import GraphStager, StagingInputError

    mesh = init_device_mesh("cpu", (world,))
    meta_local = torch.empty(4, device="meta")
    good = DTensor.from_local(torch.ones(4), mesh, [Replicate()], run_check=False)
    bad = DTensor.from_local(meta_local, mesh, [Replicate()], run_check=False) if rank == 1 else good
    with GraphStager() as stager:
        try:
            stager.stage({"a": good, "b": {"c": bad}})
        except StagingInputError as exc:
            return str(exc)
    return "ok"


@pytest.mark.slow
def test_bad_dtensor_on_one_rank_names_its_key_path() -> None:
    out = cluster(2).run(_bad_dtensor_local)
    assert out[0] == "ok"
    assert "state_dict['b']['c']" in out[1] and "meta" in out[1]


# Host budget per node
def _host_budget(rank: int, world: int, fixture: str, local_world_size: str | None) -> dict[str, int]:
    import torch.distributed as dist

    from stager.headroom import read_host

    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = local_world_size
    try:
        fixed = read_host(root=fixture)  # a fixture host: the same figures on every rank
        real = read_host()
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    budgets: list[int | None] = [None] * world
    dist.all_gather_object(budgets, fixed.available_bytes)
    return {
        "ranks": fixed.ranks_per_host,
        "limit": fixed.limit_bytes,
        "available": fixed.available_bytes,
        "sum": sum(budgets),
        "real_ranks": real.ranks_per_host,
        "real_ok": int(real.available_bytes * real.ranks_per_host <= real.limit_bytes),
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("local_world_size", [None, "env"], ids=["from-world-size", "LOCAL_WORLD_SIZE"])
def test_host_budget_is_divided_among_ranks_on_a_host(world: int, local_world_size: str | None) -> None:
    fixture = str(FIXTURES / "v2_pod")
    lws = str(world) if local_world_size else None
    for r in cluster(world).run(_host_budget, fixture, lws):
        assert r["ranks"] == world and r["real_ranks"] == world
        assert r["limit"] > 0 and r["available"] == r["limit"] // world
        assert r["sum"] <= r["limit"]  # ranks on one host never add up to more than the limit
        assert r["real_ok"]


# Lean import
def test_import_stager_does_not_import_dtensor_or_dcp() -> None:
    code = (
        "import json, sys, stager, stager.distributed\n"
        "print(json.dumps([m for m in ('torch.distributed.tensor', 'torch.distributed.checkpoint',"
        " 'torch.distributed.fsdp') if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
