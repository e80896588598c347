"""Shared-memory arenas and process-based writers: the staged bytes reach the writer uncopied.

``dcp.async_save(..., async_checkpointer_type=AsyncCheckpointerType.PROCESS)`` pickles the staged
dict to a spawned writer process. Torch's own reduction would copy every storage it did not
allocate in shared memory into a new segment (one file descriptor each); a shared arena's storages
are sent as (segment, offset, nbytes) instead and mapped by the writer. The proof is counted on
both sides: the trainer's reducer (``SHARE_COUNTS``: sent by reference vs handed to torch), and a
probe writer in the writer process that checks every tensor it writes lies in a mapped segment and
has a storage of exactly its own bytes (so DCP does not clone it).
"""

from __future__ import annotations

import collections
import errno
import glob
import json
import os
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import torch
from _cluster import cluster, shutdown_all
from torch.distributed.checkpoint import FileSystemWriter

from stager import GraphStager, StagingMemoryError
from stager import arena as arena_mod
from stager.arena import HostArena
from stager.segments import SHARE_COUNTS, find_segment, mapped_segments

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="session", autouse=True)
def _pools() -> Any:
    yield
    shutdown_all()


def sample_state(n: int = 40) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    layers = collections.OrderedDict((f"l{i}.w", torch.randn(4, i + 1, generator=g)) for i in range(n))
    return {"model": layers, "step": torch.tensor(5), "big": torch.randn(1 << 16, generator=g), "lr": 0.5}


def arena_files() -> list[str]:
    return glob.glob(os.path.join(arena_mod.SHM_DIR, f"stager-arena-{os.getpid()}-*"))


def test_pickled_staged_dict_references_the_segment_instead_of_copying() -> None:
    state = sample_state()
    with GraphStager(shared_memory=True) as stager:
        staged = stager.stage(state)
        regions = len(stager.plan.regions)
        SHARE_COUNTS.reset()
        data = ForkingPickler.dumps(staged)
        assert SHARE_COUNTS.by_reference == regions and SHARE_COUNTS.delegated == 0
        assert SHARE_COUNTS.bytes_by_reference == stager.plan.nbytes
        assert len(data) < 16 << 10  # 270 KiB of tensors, a few KiB of references
        loaded = pickle.loads(data)  # maps the segment (here: in this same process)
        assert SHARE_COUNTS.mapped == regions
        segments = mapped_segments()
        for key in ("big", "step"):
            t = loaded[key]
            assert torch.equal(t, state[key])
            assert any(a <= t.data_ptr() < a + n for a, n in segments)
        for k, v in state["model"].items():
            assert torch.equal(loaded["model"][k], v), k
        # The receiver maps copy-on-write: its writes never reach the staged copy.
        loaded["big"].fill_(0)
        assert torch.equal(staged["big"], state["big"])


def test_other_storages_still_go_through_torch() -> None:
    SHARE_COUNTS.reset()
    t = torch.arange(10.0)
    out = pickle.loads(ForkingPickler.dumps(t))
    assert torch.equal(out, t)
    assert SHARE_COUNTS.by_reference == 0 and SHARE_COUNTS.delegated == 1


def test_one_segment_file_per_arena_not_per_tensor() -> None:
    before = set(arena_files())
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(500)}
    stager = GraphStager(shared_memory=True, max_arenas=2)
    staged = stager.stage(state)
    assert len(set(arena_files()) - before) == 1
    staged2 = stager.stage(state)  # the first is still held: a second arena, a second file
    assert len(set(arena_files()) - before) == 2
    seg = find_segment(staged["t0"].data_ptr(), 12)
    assert seg is not None and seg.path in arena_files()
    del staged, staged2
    stager.close()
    del stager
    import gc

    gc.collect()
    assert set(arena_files()) - before == set()  # unlinked with the arenas


def test_small_dev_shm_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs(arena_mod.SHM_DIR)

    class Small:
        f_frsize = real.f_frsize
        f_bavail = (64 << 20) // real.f_frsize
        f_blocks = (64 << 20) // real.f_frsize

    monkeypatch.setattr(arena_mod.os, "statvfs", lambda path: Small())
    before = set(arena_files())
    message = r"(?s)/dev/shm.*64\.00 MiB\) free.*shm-size.*STAGER_SHARED_MEMORY=0"
    with pytest.raises(StagingMemoryError, match=message):
        HostArena(100 << 20, shared=True)
    assert set(arena_files()) == before


def test_reservation_failure_raises_instead_of_sigbus(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(arena_mod.os, "posix_fallocate", full)
    before = set(arena_files())
    with pytest.raises(StagingMemoryError, match="could not reserve"):
        HostArena(1 << 20, shared=True)
    assert set(arena_files()) == before


class ProbeWriter(FileSystemWriter):
    """A file-system writer that records, in the writer process, where its tensors live."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        import torch.distributed as dist

        from stager.segments import SHARE_COUNTS as counts
        from stager.segments import mapped_segments as segments

        mapped = segments()
        tensors = in_segment = exact = 0
        for item in plan.items:
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                continue
            tensors += 1
            ptr = data.untyped_storage().data_ptr()
            in_segment += any(a <= ptr < a + n for a, n in mapped)
            exact += data.untyped_storage().nbytes() == data.nbytes
        probe = {"pid": os.getpid(), "tensors": tensors, "in_segment": in_segment, "exact_storage": exact,
                 "mapped_storages": counts.mapped}
        (Path(self.path) / f"probe_{dist.get_rank()}.json").write_text(json.dumps(probe))
        return super().write_data(plan, planner)


def shm_state(mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(11)
    return {
        "model": {
            "w": distribute_tensor(torch.randn(16, 8, generator=g), mesh, [Shard(0)]),
            "b": distribute_tensor(torch.randn(8, generator=g).to(torch.bfloat16), mesh, [Replicate()]),
            "emb": distribute_tensor(torch.randn(6, 32, generator=g), mesh, [Shard(1)]),
        },
        "counter": torch.arange(100, dtype=torch.int32),  # the same on every rank (replicated)
        "epoch": 3,
    }


def _process_save(rank: int, world: int, ckpt: str, shared: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = shm_state(mesh)
    result: dict[str, Any] = {}
    with GraphStager(shared_memory=shared) as stager:
        for step in range(2):
            SHARE_COUNTS.reset()
            path = f"{ckpt}_{step}"
            fut = dcp.async_save(
                state, checkpoint_id=path, storage_writer=ProbeWriter(path), async_stager=stager,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS,
            )
            fut.result()
            regions = len(stager.plan.regions)
            bases = [b for s in stager._sets for b in s.bases]
            in_arena = sum(find_segment(b.data_ptr(), b.numel()) is not None for b in bases)
            probe = json.loads((Path(path) / f"probe_{rank}.json").read_text())
            result[f"step{step}"] = {
                "regions": regions, "nbytes": stager.plan.nbytes,
                "by_reference": SHARE_COUNTS.by_reference,
                "bytes_by_reference": SHARE_COUNTS.bytes_by_reference,
                "delegated": SHARE_COUNTS.delegated, "bytes_delegated": SHARE_COUNTS.bytes_delegated,
                "mesh_bytes": mesh.mesh.untyped_storage().nbytes(),
                "bases": len(bases), "bases_in_arena": in_arena, "probe": probe,
                "writer_pid_differs": probe["pid"] != os.getpid(),
            }
        result["plans_built"] = stager.plans_built
    return result


def _load_shm(rank: int, world: int, ckpt: str) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    expected = shm_state(mesh)
    target = {
        "model": {
            k: distribute_tensor(torch.zeros_like(v.full_tensor()), mesh, v.placements)
            for k, v in expected["model"].items()
        },
        "counter": torch.zeros(100, dtype=torch.int32),
        "epoch": 0,
    }
    dcp.load(target, checkpoint_id=ckpt)
    for k, v in expected["model"].items():
        assert torch.equal(target["model"][k]._local_tensor, v._local_tensor), k
    assert torch.equal(target["counter"], expected["counter"]) and target["epoch"] == 3
    return len(expected["model"])


@pytest.mark.slow
def test_process_writer_reads_the_shared_arena_without_a_copy(tmp_path: Path) -> None:
    c = cluster(2)
    results = c.run(_process_save, str(tmp_path / "shm"), True)
    for r in results:
        assert r["plans_built"] == 1
        for step in ("step0", "step1"):
            s = r[step]
            assert s["writer_pid_differs"]
            # Trainer side: every staged storage went by reference, none through torch's copy
            # (torch only saw the device mesh's small rank tensor), and the staged storages still
            # live in the arena.
            assert s["by_reference"] == s["regions"] and s["bytes_by_reference"] == s["nbytes"]
            assert s["bytes_delegated"] <= s["mesh_bytes"]
            assert s["bases_in_arena"] == s["bases"] > 0
            # Writer side: every tensor it wrote lies in a mapped segment, with its own exact
            # storage (no clone by DCP's writer either).
            p = s["probe"]
            assert p["tensors"] > 0 and p["in_segment"] == p["tensors"] and p["exact_storage"] == p["tensors"]
            assert p["mapped_storages"] > 0
    assert c.run(_load_shm, str(tmp_path / "shm_1")) == [3, 3]


@pytest.mark.slow
def test_without_shared_memory_torch_copies_every_storage(tmp_path: Path) -> None:
    """The control: the same counters see torch's copy when the arena is not shared."""
    results = cluster(2).run(_process_save, str(tmp_path / "private"), False)
    for r in results:
        s = r["step0"]
        assert s["by_reference"] == 0 and s["bytes_delegated"] >= s["nbytes"]
        assert s["bases_in_arena"] == 0  # torch moved every staged storage into new shared memory
        assert s["probe"]["in_segment"] == 0
