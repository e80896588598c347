"""Verifying a loaded checkpoint: a flipped byte named with its key path and file, resharded or
converted chunks unverifiable (never a mismatch), and a whole checkpoint checked in batches.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _integrity import (
    assert_loaded_equal,
    checkpoint_with_checksums,
    flip_tensor_byte,
    make,
    save_with_checksums,
    saved,
)
from torch.distributed.checkpoint import FileSystemWriter

import stager
from stager import IntegrityError
from stager.checkpoint import checkpoint_layout as layout
from stager.integrity import verify_checkpoint, verify_state_dict
from stager.kernels import lanes64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_flipped_byte_in_a_checkpoint_file_is_caught_with_its_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = checkpoint_with_checksums(tmp_path / "c", monkeypatch)
    file = flip_tensor_byte(tmp_path / "c", "model.0.weight")

    # DCP alone loads the changed value without a word: the flip is in the tensor's data.
    plain = {"model.0.weight": torch.empty(64, 64)}
    dcp.load(plain, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert (plain["model.0.weight"] != model[0].weight.detach()).sum() == 1

    fresh, fresh_opt = make(seed=5)
    with pytest.raises(IntegrityError) as info:
        stager.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, stager.StagerError)
    msg = str(err)
    assert "state_dict['model']['0.weight']" in msg and file in msg and "rank 0" in msg
    assert err.path == "state_dict['model']['0.weight']" and err.file == file
    assert err.expected in msg and err.found in msg and err.expected != err.found


def test_checkpoint_without_checksums_loads_as_before(tmp_path: Path) -> None:
    model, opt = make()
    # What a checkpoint written before checksums looks like: DCP's own writer, nothing beside it.
    dcp.save(layout(model, opt), storage_writer=FileSystemWriter(str(tmp_path / "c")), no_dist=True)
    fresh, fresh_opt = make(seed=5)
    report = stager.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert not report.has_checksums and report.verified == 0 and report.ok
    assert_loaded_equal(fresh, model)


def test_a_tensor_loaded_into_another_dtype_is_unverifiable_not_a_mismatch(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    save_with_checksums(ckpt, {"w": torch.randn(100), "b": torch.randn(3)})
    target = {"w": torch.empty(100, dtype=torch.float64), "b": torch.empty(3)}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)  # DCP converts the dtype on the way in
    report = verify_state_dict(ckpt, target)
    assert report.ok and report.verified == 1
    assert report.unverifiable == [("w", "loaded as float64, saved as float32")]


def test_a_partial_load_checks_only_what_was_loaded(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    save_with_checksums(ckpt, {"w": torch.randn(100), "b": torch.randn(3)})
    target = {"b": torch.empty(3)}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    report = verify_state_dict(ckpt, target)
    assert report.verified == 1 and report.not_loaded == 1 and report.ok


def test_chunks_of_a_saved_tensor_are_checked_within_the_loaded_tensor(tmp_path: Path) -> None:
    # A saved chunk at non-zero offsets (what a rank of a sharded save writes) is checked inside
    # the whole tensor a single process loads. The sidecar is written by hand here; the
    # multi-rank test writes real ones.
    ckpt = tmp_path / "c"
    full = torch.randn(6, 4)
    save_with_checksums(ckpt, {"w": full})
    [path] = glob.glob(str(ckpt / "*stager-checksums.json"))
    doc = json.loads(Path(path).read_text())
    entry = doc["entries"][0]
    part = full[2:5, 1:3].contiguous()
    part_bytes = part.view(-1).view(torch.uint8).numpy().tobytes()
    part_sum = lanes64.format_checksum(lanes64.checksum_bytes(part_bytes))
    doc["entries"] = [dict(entry, offsets=[2, 1], sizes=[3, 2], checksum=part_sum)]
    Path(path).write_text(json.dumps(doc))
    target = {"w": torch.empty(6, 4)}
    dcp.load(target, checkpoint_id=str(ckpt), no_dist=True)
    assert verify_state_dict(str(ckpt), target).verified == 1
    kept = target["w"][3, 2].clone()
    target["w"][3, 2] += 1  # inside the chunk
    with pytest.raises(IntegrityError, match=r"offsets \[2, 1\]"):
        verify_state_dict(str(ckpt), target)
    target["w"][3, 2] = kept
    target["w"][0, 0] += 1  # outside the chunk: not covered by any checksum here
    assert verify_state_dict(str(ckpt), target).ok


def test_verify_loads_in_batches_and_reports_progress(tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    seen: list[tuple[int, int]] = []
    report = verify_checkpoint(
        str(ckpt), batch_bytes=1024, progress=lambda done, total: seen.append((done, total))
    )
    assert report.verified == 3 and len(seen) == 2  # model.w (64 KiB) alone, then the two small ones
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1]
