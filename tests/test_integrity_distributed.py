"""Integrity across ranks (real gloo ranks in child processes, see ``_cluster.py``).

* A checkpoint saved by 2 ranks (DTensor shards, a replicated tensor, plain tensors), each rank
  with its own sidecar, loads verified into one process, and a flipped byte in rank 1's file is
  named with that file and rank. Loaded by 2 ranks with another sharding, the chunks no rank
  holds whole are reported unverifiable, never as mismatches.
* Replicas: checksums travel with the buffer and are verified on receipt; a byte flipped in
  transit is caught with its key path and the replicator stays usable; a replica whose holder's
  memory changed is refused by a restore there and by the restarted rank it is sent back to.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _cluster import cluster, pools_fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


_pools = pools_fixture()


def global_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    return {
        "w": torch.randn(64, 32, generator=g),  # Shard(0)
        "cols": torch.randint(-1000, 1000, (6, 40), generator=g, dtype=torch.int64),  # Shard(1)
        "bias": torch.randn(33, generator=g, dtype=torch.float64),  # Replicate
    }


def placements(name: str, resharded: bool = False) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    if resharded:
        return {"w": [Shard(1)], "cols": [Shard(1)], "bias": [Shard(0)]}[name]
    return {"w": [Shard(0)], "cols": [Shard(1)], "bias": [Replicate()]}[name]


def _save_two_ranks(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from stager import GraphStager
    from stager.integrity import ChecksumWriter

    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {"model": {}, "own": {f"r{rank}": torch.full((5,), float(rank))}, "step": 3}
    for name, t in global_tensors().items():
        state["model"][name] = distribute_tensor(t, mesh, placements(name))
    with GraphStager() as stager:
        writer = ChecksumWriter(ckpt, checksum=True)
        dcp.async_save(state, checkpoint_id=ckpt, storage_writer=writer, async_stager=stager).result()
    return {"items": writer.last_checksum_stats.items, "sidecar": writer.last_checksum_stats.sidecar}


def _load_resharded(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from stager.integrity import verify_state_dict

    mesh = init_device_mesh("cpu", (world,))
    target: dict[str, Any] = {"model": {}}
    for name, t in global_tensors().items():
        target["model"][name] = distribute_tensor(torch.zeros_like(t), mesh, placements(name, resharded=True))
    dcp.load(target, checkpoint_id=ckpt)
    report = verify_state_dict(ckpt, target)  # raises on a mismatch
    for name, t in global_tensors().items():
        want = distribute_tensor(t, mesh, placements(name, resharded=True))._local_tensor
        assert torch.equal(target["model"][name]._local_tensor, want), name
    return {"verified": report.verified, "unverifiable": sorted({fqn for fqn, _ in report.unverifiable})}


@pytest.mark.slow
def test_checkpoint_saved_by_2_ranks_is_verified_by_1_and_never_wrongly_flagged_by_2(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from stager import IntegrityError
    from stager.integrity import verify_checkpoint, verify_state_dict

    ckpt = str(tmp_path / "two")
    saved = cluster(2).run(_save_two_ranks, ckpt)
    assert [s["sidecar"] for s in saved] == ["__0_stager-checksums.json", "__1_stager-checksums.json"]
    docs = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{ckpt}/*stager-checksums.json"))]
    assert [d["rank"] for d in docs] == [0, 1] and len({d["save_id"] for d in docs}) == 1
    n_chunks = sum(len(d["entries"]) for d in docs)

    # Loaded by 1 process into whole tensors: every chunk of both ranks is inside a loaded tensor.
    target = {"model": {k: torch.zeros_like(t) for k, t in global_tensors().items()},
              "own": {"r0": torch.zeros(5), "r1": torch.zeros(5)}}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    report = verify_state_dict(ckpt, target)
    assert report.ok and report.unverifiable == [] and report.verified == n_chunks
    assert verify_checkpoint(ckpt).verified == n_chunks

    # Loaded by 2 ranks with another sharding: chunks held whole are verified, the rest are
    # unverifiable, none is a mismatch (verify_state_dict would raise).
    results = cluster(2).run(_load_resharded, ckpt)
    for r in results:
        assert "model.w" in r["unverifiable"] and r["verified"] >= 1

    # A flipped byte in rank 1's file: named with its file and rank.
    md = dcp.FileSystemReader(ckpt).read_metadata()
    index, info = next(
        (k, v)
        for k, v in md.storage_data.items()
        if k.fqn == "model.w" and v.relative_path.startswith("__1_")
    )
    path = Path(ckpt) / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    with pytest.raises(IntegrityError) as err:
        verify_state_dict(ckpt, target)
    msg = str(err.value)
    assert "state_dict['model']['w']" in msg and info.relative_path in msg and "rank 1" in msg
    assert f"offsets {list(index.offset)}" in msg


# replicas


def rank_state(rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(50 + rank)
    base = torch.randn(64, generator=g)
    return {
        "model": {
            "w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g),
            "ids": torch.arange(rank, rank + 9),
        },
        "views": [base[2:10], base.view(8, 8).t()],
        "step": rank,
    }


def _replicate_and_verify(rank: int, world: int, mode: str) -> dict[str, Any]:
    from stager import GraphStager
    from stager.distributed import Replicator

    stager = GraphStager(checksum=mode)
    rep = Replicator(stager, timeout=30)
    staged = stager.stage(rank_state(rank))
    replica = rep.replicate(staged)
    want = rank_state(rep.source)
    assert torch.equal(replica["model"]["w"], want["model"]["w"])
    s = rep.last_stats
    return {"sent": s.checksums_sent, "verified": s.verified_regions}


@pytest.mark.slow
def test_replicas_carry_checksums_and_are_verified_on_receipt() -> None:
    on = cluster(2).run(_replicate_and_verify, "on")
    assert all(r["sent"] and r["verified"] == 4 for r in on)  # w, b, ids, and the views' storage
    off = cluster(2).run(_replicate_and_verify, "off")
    assert all(not r["sent"] and r["verified"] == 0 for r in off)


def _flip_in_transit(rank: int, world: int) -> dict[str, Any]:
    from stager import GraphStager, IntegrityError
    from stager.distributed import Replicator

    stager = GraphStager(checksum="on")
    rep = Replicator(stager, timeout=30)
    real_buffer = Replicator._buffer

    def damaged(self: Replicator, entry: Any, tensors: Any, stats: Any) -> torch.Tensor:
        buf = real_buffer(self, entry, tensors, stats).clone()  # what goes on the wire
        buf[entry.offsets[1] + 3] ^= 0x20  # region 1: the second tensor, model.b
        return buf

    out: dict[str, Any] = {}
    staged = stager.stage(rank_state(rank))
    if rank == 0:
        Replicator._buffer = damaged  # type: ignore[method-assign]
    try:
        rep.replicate(staged)
        out["first"] = "ok"
    except IntegrityError as exc:
        out["first"] = str(exc)
        out["path"] = exc.path
    finally:
        Replicator._buffer = real_buffer  # type: ignore[method-assign]
    replica = rep.replicate(staged)  # the replicator is still usable
    out["again"] = torch.equal(replica["model"]["b"], rank_state(rep.source)["model"]["b"])
    return out


@pytest.mark.slow
def test_a_byte_flipped_in_transit_is_caught_with_its_key_path() -> None:
    r0, r1 = cluster(2).run(_flip_in_transit)
    assert r0["first"] == "ok" and r0["again"]
    assert "the replica from rank 0 arrived damaged: state_dict['model']['b']" in r1["first"]
    assert r1["path"] == "state_dict['model']['b']" and r1["again"]


def _sent_back_after_its_holders_memory_changed(rank: int, world: int) -> str:
    from stager import GraphStager, IntegrityError
    from stager.distributed import Replicator
    from stager.restore import restore_state

    stager = GraphStager(checksum="on")
    rep = Replicator(stager, timeout=30)
    staged = stager.stage(rank_state(rank))
    replica = rep.replicate(staged)
    if rank == 0:
        # Rank 0 holds rank 1's replica; a bit of it changes in memory.
        replica["model"]["w"].view(-1).view(torch.uint8)[17] ^= 0x04
        live = rank_state(1)
        with torch.no_grad():
            live["model"]["w"].zero_()
        try:
            restore_state(replica, live)
            raise AssertionError("a restore from a changed replica went through")
        except IntegrityError as exc:
            assert "state_dict['model']['w']" in str(exc) and "nothing was written" in str(exc)
        assert torch.count_nonzero(live["model"]["w"]) == 0
        rep.send(replica, dst=1)  # rank 1 restarted and asks for its state back
        return "sent"
    try:
        rep.recv(src=0)
    except IntegrityError as exc:
        assert exc.path == "state_dict['model']['w']"
        return "refused"
    return "accepted"


@pytest.mark.slow
def test_a_replica_changed_in_its_holders_memory_is_refused_on_restore_and_when_sent_back() -> None:
    assert cluster(2).run(_sent_back_after_its_holders_memory_changed) == ["sent", "refused"]
