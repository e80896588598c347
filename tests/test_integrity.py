"""Integrity on one process: checksums taken when staged and saved, verified on load, restore, verify.

The staging pipeline calls :func:`stager.integrity.checksum_staged_set` once a copy into a staged
set is complete; the ``staging_hook`` fixture does exactly that (from ``StagedSet.done``, which
every stage calls once its copy is complete on the CPU path), so the tests below do not depend on
where the pipeline makes the call.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import stager
import stager.checkpoint as checkpoint_module
from stager import GraphStager, IntegrityError
from stager.checkpoint import checkpoint_layout as layout
from stager.integrity import (
    ChecksumWriter,
    checksum_staged_set,
    read_checksums,
    region_of,
    verify_checkpoint,
    verify_state_dict,
)
from stager.kernels import lanes64
from stager.staged_set import StagedSet
from stager.verify import main as verify_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def staging_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checksum every staged set once its copy is complete, as the pipeline does with the knob on."""
    done = StagedSet.done

    def done_with_checksums(self: StagedSet) -> None:
        checksum_staged_set(self)
        done(self)

    monkeypatch.setattr(StagedSet, "done", done_with_checksums)


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def assert_loaded_equal(model: torch.nn.Module, want: torch.nn.Module) -> None:
    for (k, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k


def checkpoint_with_wrap(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **overrides: Any
) -> None:
    with stager.wrap(model, opt, **overrides) as handle:
        handle.checkpoint(path)


def force_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """wrap's writer hashes every tensor on the writer thread (what staging left without one)."""
    real = checkpoint_module.dcp_writer
    monkeypatch.setattr(
        checkpoint_module, "dcp_writer", lambda path, nvtx_enabled: real(path, nvtx_enabled, checksum=True)
    )


def flip_tensor_byte(ckpt: Path, fqn: str) -> str:
    """Flip one bit in the middle of ``fqn``'s saved bytes in its data file; return the file's name."""
    md = FileSystemReader(str(ckpt)).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == fqn)
    path = ckpt / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x08
    path.write_bytes(bytes(data))
    return info.relative_path


def sidecars(ckpt: Path) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(ckpt / "*stager-checksums.json")))]


# checkpoint files


def test_wrap_checkpoint_carries_every_tensors_checksum_and_loads_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_checksums(monkeypatch)
    model, opt = make()
    checkpoint_with_wrap(tmp_path / "c", model, opt)

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


def test_flipped_byte_in_a_checkpoint_file_is_caught_with_its_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_checksums(monkeypatch)
    model, opt = make()
    checkpoint_with_wrap(tmp_path / "c", model, opt)
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


def test_checksums_are_off_in_the_checkpoint_unless_staging_took_them(tmp_path: Path) -> None:
    # Default knob on the CPU: no pass over the bytes, so no sidecar (see README, Integrity).
    model, opt = make()
    checkpoint_with_wrap(tmp_path / "c", model, opt)
    assert sidecars(tmp_path / "c") == []
    report = stager.load_checkpoint(tmp_path / "c", *make(seed=5))
    assert not report.has_checksums


def test_sidecar_of_an_earlier_save_into_the_directory_is_never_believed(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    first = {"w": torch.randn(1000)}
    dcp.save(first, storage_writer=ChecksumWriter(ckpt, checksum=True), no_dist=True)
    second = {"w": torch.randn(1000)}  # other values, same layout, written by DCP's own writer
    dcp.save(second, storage_writer=FileSystemWriter(ckpt), no_dist=True)
    assert len(sidecars(tmp_path / "c")) == 1  # still there...
    target = {"w": torch.empty(1000)}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)
    report = verify_state_dict(ckpt, target)  # ...but not believed: no mismatch
    assert report.ok and not report.has_checksums
    assert any("another save" in n for n in report.notes)


def test_writer_without_checksums_removes_its_stale_sidecar(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    dcp.save({"w": torch.randn(10)}, storage_writer=ChecksumWriter(ckpt, checksum=True), no_dist=True)
    dcp.save({"w": torch.randn(10)}, storage_writer=ChecksumWriter(ckpt, checksum=False), no_dist=True)
    assert sidecars(tmp_path / "c") == []


def test_a_tensor_loaded_into_another_dtype_is_unverifiable_not_a_mismatch(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    dcp.save(
        {"w": torch.randn(100), "b": torch.randn(3)},
        storage_writer=ChecksumWriter(ckpt, checksum=True), no_dist=True,
    )
    target = {"w": torch.empty(100, dtype=torch.float64), "b": torch.empty(3)}
    dcp.load(target, checkpoint_id=ckpt, no_dist=True)  # DCP converts the dtype on the way in
    report = verify_state_dict(ckpt, target)
    assert report.ok and report.verified == 1
    assert report.unverifiable == [("w", "loaded as float64, saved as float32")]


def test_a_partial_load_checks_only_what_was_loaded(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "c")
    dcp.save(
        {"w": torch.randn(100), "b": torch.randn(3)},
        storage_writer=ChecksumWriter(ckpt, checksum=True), no_dist=True,
    )
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
    dcp.save({"w": full}, storage_writer=ChecksumWriter(str(ckpt), checksum=True), no_dist=True)
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


def test_a_sidecar_of_another_algorithm_version_is_unverifiable(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    dcp.save({"w": torch.randn(10)}, storage_writer=ChecksumWriter(str(ckpt), checksum=True), no_dist=True)
    [path] = glob.glob(str(ckpt / "*stager-checksums.json"))
    doc = json.loads(Path(path).read_text())
    doc["version"] = lanes64.VERSION + 1
    Path(path).write_text(json.dumps(doc))
    sums = read_checksums(str(ckpt))
    assert not sums.entries and "unverifiable" in sums.notes[0] and f"v{lanes64.VERSION + 1}" in sums.notes[0]


# python -m stager verify


def _saved(tmp_path: Path) -> Path:
    ckpt = tmp_path / "c"
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {"w": torch.randn(256, 64, generator=g), "b": torch.arange(5, dtype=torch.int16)},
        "optim": {"state": {0: {"exp_avg": torch.randn(7, generator=g)}}, "param_groups": [{"lr": 0.1}]},
    }
    dcp.save(state, storage_writer=ChecksumWriter(str(ckpt), checksum=True), no_dist=True)
    return ckpt


def test_verify_command_on_a_clean_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _saved(tmp_path)
    assert verify_main([str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 3 tensor chunk(s) verified") and "0 mismatched" in out


def test_verify_command_names_each_flipped_tensor_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _saved(tmp_path)
    file = flip_tensor_byte(ckpt, "model.w")
    assert verify_main([str(ckpt), "--batch", "1KiB", "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"MISMATCH model.w: file {file} (rank 0): expected 0x")
    assert lines[-1].startswith("FAILED: 2 tensor chunk(s) verified") and "1 mismatched" in lines[-1]


def test_verify_command_on_a_checkpoint_without_checksums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dcp.save({"w": torch.randn(5)}, storage_writer=FileSystemWriter(str(tmp_path / "c")), no_dist=True)
    assert verify_main([str(tmp_path / "c")]) == 0
    assert "no checksums" in capsys.readouterr().out
    assert verify_main([str(tmp_path / "c"), "--require"]) == 3
    assert verify_main([str(tmp_path / "missing")]) == 2


def test_verify_loads_in_batches_and_reports_progress(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path)
    seen: list[tuple[int, int]] = []
    report = verify_checkpoint(
        str(ckpt), batch_bytes=1024, progress=lambda done, total: seen.append((done, total))
    )
    assert report.verified == 3 and len(seen) == 2  # model.w (64 KiB) alone, then the two small ones
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1]


def test_python_dash_m_stager_verify(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path)
    flip_tensor_byte(ckpt, "model.w")
    run = subprocess.run(
        [sys.executable, "-m", "stager", "verify", str(ckpt)], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("STAGER_")},
    )
    assert run.returncode == 1, run.stderr
    assert "MISMATCH model.w" in run.stdout


# staged copies


def live_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, generator=g)
    return {
        "model": {"w": torch.randn(32, 16, generator=g), "b": torch.randn(16, generator=g), "tied": None},
        "views": [base[2:10], base.view(8, 8).t()],
        "flags": torch.tensor([True, False, True]),
        "step": 3,
    }


def test_restore_verifies_the_staged_copy_first(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        want = {k: v.clone() for k, v in live["model"].items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            live["model"]["w"].zero_()
        stats = st.restore(staged, live)
    assert any(n.startswith("verified ") for n in stats.notes)
    assert torch.equal(live["model"]["w"], want["w"])


def test_a_flipped_byte_in_the_staged_arena_refuses_restore_and_writes_nothing(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        hit = region_of(staged["model"]["b"])
        assert hit is not None
        staged_set, region = hit
        staged_set.arena.array[staged_set.plan.regions[region].arena_offset + 5] ^= 0x40
        with torch.no_grad():
            for t in (live["model"]["w"], live["model"]["b"], *live["views"]):
                t.fill_(7.0)
        before = [t.clone() for t in (live["model"]["w"], live["model"]["b"], live["views"][0])]
        with pytest.raises(IntegrityError) as info:
            st.restore(staged, live)
    assert "state_dict['model']['b']" in str(info.value) and "nothing was written" in str(info.value)
    assert info.value.path == "state_dict['model']['b']"
    for a, b in zip(before, (live["model"]["w"], live["model"]["b"], live["views"][0])):
        assert torch.equal(a, b)


def test_restore_of_a_copy_staged_without_checksums_says_it_is_unverified() -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        stats = st.restore(staged, live)
    assert any("unverified" in n for n in stats.notes)


def test_wrap_restore_refuses_a_changed_staged_copy(staging_hook: None, tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        handle.checkpoint(tmp_path / "c")
        handle.wait()
        staged_weight = handle._last_staged["model"]["2.weight"]
        staged_weight.view(-1)[3] += 1.0  # host memory of the staged copy changes
        with torch.no_grad():
            model[2].weight.zero_()
        with pytest.raises(IntegrityError, match=r"state_dict\['model'\]\['2.weight'\]"):
            handle.restore()
        assert torch.count_nonzero(model[2].weight) == 0


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


def test_checksums_of_a_set_staged_again_are_not_used_while_it_is_in_flight(staging_hook: None) -> None:
    live = live_state()
    with GraphStager(cache_policy="cached") as st:
        staged = st.stage(live)
        staged_set, _ = region_of(staged["model"]["w"])
        staged_set.in_flight = True
        try:
            assert region_of(staged["model"]["w"]) is None
        finally:
            staged_set.in_flight = False
        assert region_of(staged["model"]["w"]) is not None
