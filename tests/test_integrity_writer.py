"""ChecksumWriter: the sidecar of every tensor's checksum beside DCP's files, reusing staging's checksums.

``wrap``'s writer hashes what staging left without a checksum; a set staged with checksums hands
them to the writer, which hashes only the rest (views that are not a whole region); a writer
without checksums leaves no stale sidecar behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _integrity import (
    assert_loaded_equal,
    checkpoint_with_checksums,
    checkpoint_with_wrap,
    checksum_when_staged,
    live_state,
    make,
    sidecars,
)
from torch.distributed.checkpoint import FileSystemReader

import stager
from stager import GraphStager
from stager.checkpoint import checkpoint_layout as layout
from stager.integrity import ChecksumWriter, verify_checkpoint
from stager.kernels import lanes64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def staging_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    checksum_when_staged(monkeypatch)


def test_wrap_checkpoint_carries_every_tensors_checksum_and_loads_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = checkpoint_with_checksums(tmp_path / "c", monkeypatch)

    [doc] = sidecars(tmp_path / "c")
    assert (doc["algorithm"], doc["version"]) == (lanes64.ALGORITHM, lanes64.VERSION)
    md = FileSystemReader(str(tmp_path / "c")).read_metadata()
    assert doc["save_id"] == md.storage_meta.save_id
    tensor_fqns = {k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert {e["fqn"] for e in doc["entries"]} == tensor_fqns
    saved = dict(layout(model, opt)["model"])
    for e in doc["entries"]:
        if e["fqn"].startswith("model."):
            t = saved[e["fqn"][len("model."):]]
            want = lanes64.checksum_bytes(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            assert int(e["checksum"], 16) == want, e["fqn"]

    fresh, fresh_opt = make(seed=5)
    report = stager.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert report.has_checksums and report.ok and not report.unverifiable
    assert report.verified == len(tensor_fqns)
    assert_loaded_equal(fresh, model)


def test_checksums_are_off_in_the_checkpoint_unless_staging_took_them(tmp_path: Path) -> None:
    # Default knob on the CPU: no pass over the bytes, so no sidecar (see README, Integrity).
    model, opt = make()
    checkpoint_with_wrap(tmp_path / "c", model, opt)
    assert sidecars(tmp_path / "c") == []
    report = stager.load_checkpoint(tmp_path / "c", *make(seed=5))
    assert not report.has_checksums


def test_writer_without_checksums_removes_its_stale_sidecar(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    dcp.save({"w": torch.randn(10)}, storage_writer=ChecksumWriter(ckpt, checksum=True), no_dist=True)
    dcp.save({"w": torch.randn(10)}, storage_writer=ChecksumWriter(ckpt, checksum=False), no_dist=True)
    assert sidecars(tmp_path / "c") == []


def test_writer_reuses_the_checksums_taken_at_staging(staging_hook: None, tmp_path: Path) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        writer = ChecksumWriter(str(tmp_path / "c"))  # checksum=None: when the staged copy has them
        dcp.save(staged, storage_writer=writer, no_dist=True)
    s = writer.last_checksum_stats
    # w, b, flags are whole regions: reused; the two views of one storage are hashed.
    assert (s.items, s.reused, s.computed) == (5, 3, 2)
    assert verify_checkpoint(str(tmp_path / "c")).verified == 5


def test_a_byte_changed_between_staging_and_writing_is_caught_at_load(
    staging_hook: None, tmp_path: Path
) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        staged["model"]["w"].view(-1)[100] += 1.0  # the staged copy changes in host memory
        dcp.save(staged, storage_writer=ChecksumWriter(str(tmp_path / "c")), no_dist=True)
    report = verify_checkpoint(str(tmp_path / "c"))
    assert [m.fqn for m in report.mismatches] == ["model.w"]


def test_wrap_with_checksums_from_staging_writes_and_verifies(staging_hook: None, tmp_path: Path) -> None:
    model, opt = make()
    checkpoint_with_wrap(tmp_path / "c", model, opt)
    [doc] = sidecars(tmp_path / "c")
    assert doc["entries"]
    fresh, fresh_opt = make(seed=9)
    report = stager.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert report.ok and report.verified == len(doc["entries"])
