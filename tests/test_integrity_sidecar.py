"""The checksum sidecar: believed only for the save that wrote it, and only for its own algorithm."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _integrity import save_with_checksums, sidecars
from torch.distributed.checkpoint import FileSystemWriter

from stager.integrity import read_checksums, verify_state_dict
from stager.kernels import lanes64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_sidecar_of_an_earlier_save_into_the_directory_is_never_believed(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    first = {"w": torch.randn(1000)}
    save_with_checksums(ckpt, first)
    second = {"w": torch.randn(1000)}  # other values, same layout, written by DCP's own writer
    dcp.save(second, storage_writer=FileSystemWriter(ckpt), no_dist=True)
    assert len(sidecars(tmp_path / "c")) == 1  # still there...
    target = {"w": torch.empty(1000)}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    report = verify_state_dict(ckpt, target)  # ...but not believed: no mismatch
    assert report.ok and not report.has_checksums
    assert any("another save" in n for n in report.notes)


def test_a_sidecar_of_another_algorithm_version_is_unverifiable(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    save_with_checksums(ckpt, {"w": torch.randn(10)})
    [path] = glob.glob(str(ckpt / "*stager-checksums.json"))
    doc = json.loads(Path(path).read_text())
    doc["version"] = lanes64.VERSION + 1
    Path(path).write_text(json.dumps(doc))
    sums = read_checksums(str(ckpt))
    assert not sums.entries and "unverifiable" in sums.notes[0] and f"v{lanes64.VERSION + 1}" in sums.notes[0]
