"""torch_checkpointing: ``GraphCheckpointStager`` as a ``CheckpointStager``, and the README snippet
(``AsyncCheckpointSaver`` with a writer process) in a child process under a time limit. Skipped
where torch_checkpointing is not installed (``make test`` installs it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch_checkpointing")

import torch  # noqa: E402
from torch_checkpointing.staging import CheckpointStager  # noqa: E402

from stager import GraphStager, StagerClosedError  # noqa: E402
from stager.integrations.torch_checkpointing import GraphCheckpointStager  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(name: str) -> str:
    """The README's Python block marked ``<!-- snippet: name -->``."""
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


def _payload() -> dict[str, Any]:
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    return {
        "model": {"w": w, "w_t": w.t(), "b": torch.randn(16)},
        "optim": {"state": {0: {"exp_avg": torch.randn(32, 16), "step": torch.tensor(3.0)}}, "lr": [1e-3]},
        "step": 7,
        "extra": torch.arange(10),
    }


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_is_a_checkpoint_stager() -> None:
    with closing(GraphCheckpointStager()) as with_default:
        assert isinstance(with_default, CheckpointStager)
        cfg = with_default.stager.config
        assert cfg.async_staging and cfg.shared_memory  # the writer is a spawned process


def test_stage_copies_everything_without_keys() -> None:
    src = _payload()
    with closing(GraphCheckpointStager(shared_memory=False)) as ts:
        result = ts.stage(src)
        assert isinstance(result, Future)
        staged = result.result()
        assert list(staged) == list(src)
        assert torch.equal(staged["model"]["w"], src["model"]["w"])
        assert not _shares_memory(staged["model"]["w"], src["model"]["w"])
        assert _shares_memory(staged["model"]["w_t"], staged["model"]["w"])  # views stay views
        assert torch.equal(staged["optim"]["state"][0]["exp_avg"], src["optim"]["state"][0]["exp_avg"])
        assert staged["optim"]["lr"] == [1e-3] and staged["optim"]["lr"] is not src["optim"]["lr"]
        src["model"]["w"].add_(1.0)  # the staged copy does not follow the source
        assert not torch.equal(staged["model"]["w"], src["model"]["w"])
        assert ts.get_staged_state_dict() is staged


def test_keys_not_requiring_copy_are_passed_through_as_the_same_objects() -> None:
    src = _payload()
    before = list(src)
    with closing(GraphCheckpointStager(shared_memory=False)) as ts:
        staged = ts.stage(src, keys_not_requiring_copy={"optim", "extra", "absent"}).result()
        assert list(staged) == before and list(src) == before  # the input is not changed
        assert staged["optim"] is src["optim"] and staged["extra"] is src["extra"]
        assert torch.equal(staged["model"]["b"], src["model"]["b"])
        assert not _shares_memory(staged["model"]["b"], src["model"]["b"])
        assert staged["step"] == 7 and "absent" not in staged
        # Only what needed a copy was staged: its plan holds the model's tensors, not the optimizer's.
        assert ts.stager.last_stats.tensors == 3


def test_synchronous_stager_returns_the_payload() -> None:
    src = _payload()
    with closing(GraphCheckpointStager(async_staging=False, shared_memory=False)) as ts:
        staged = ts.stage(src, keys_not_requiring_copy=["step"])
        assert isinstance(staged, dict) and torch.equal(staged["extra"], src["extra"])


def test_keys_for_a_payload_that_is_not_a_mapping_raise() -> None:
    with closing(GraphCheckpointStager(shared_memory=False)) as ts:
        with pytest.raises(TypeError, match="needs a mapping payload, got list"):
            ts.stage([torch.ones(2)], keys_not_requiring_copy=["x"])


def test_each_stage_reuses_the_one_arena_and_ends_the_previous_lease() -> None:
    src = _payload()
    with closing(GraphCheckpointStager(shared_memory=False)) as ts:
        assert ts.get_staged_state_dict() is None
        first = ts.stage(src).result()
        one_arena = ts.stager.host_bytes().total
        assert one_arena > 0
        second = ts.stage(src).result()
        third = ts.stage(src).result()
        assert ts.stager.host_bytes().total == one_arena
        assert first["model"]["w"].numel() == 0 and second["model"]["w"].numel() == 0  # released
        assert torch.equal(third["model"]["w"], src["model"]["w"])
        assert ts.pinned_num_bytes() == ts.stager.host_bytes().pinned


def test_without_reuse_older_payloads_stay_valid() -> None:
    src = _payload()
    with closing(GraphCheckpointStager(reuse_previous=False, shared_memory=False)) as ts:
        first = ts.stage(src).result()
        kept = src["model"]["w"].clone()
        one_arena = ts.stager.host_bytes().total
        src["model"]["w"].add_(1.0)
        second = ts.stage(src).result()
        assert ts.stager.host_bytes().total == 2 * one_arena  # the first arena is still leased
        assert torch.equal(first["model"]["w"], kept) and torch.equal(second["model"]["w"], src["model"]["w"])


def test_close_closes_the_graph_stager() -> None:
    gs = GraphStager(async_staging=True)
    ts = GraphCheckpointStager(gs)
    ts.stage({"w": torch.ones(3)}).result()
    ts.close()
    with pytest.raises(StagerClosedError):
        gs.stage({"w": torch.ones(3)})
    with pytest.raises(TypeError, match="not both"):
        GraphCheckpointStager(gs, max_arenas=1)


@pytest.mark.cuda
def test_pinned_num_bytes_counts_the_pinned_arena() -> None:
    with closing(GraphCheckpointStager(shared_memory=False)) as ts:
        src = {"w": torch.randn(1024, 256, device="cuda")}
        ts.stage(src).result()
        assert ts.pinned_num_bytes() == ts.stager.host_bytes().pinned >= src["w"].nbytes


def child(root: str, out_path: str) -> None:
    from stager.segments import SHARE_COUNTS

    ns: dict[str, Any] = {"__name__": "readme_snippet"}
    snippet = readme_snippet("torch_checkpointing")
    exec(compile(snippet, "README.md (torch_checkpointing snippet)", "exec"), ns)
    SHARE_COUNTS.reset()
    ts, loaded, model, optimizer = ns["train"](root)
    live = optimizer.state_dict()
    report = {
        "pid": os.getpid(),
        "step": loaded["step"],
        "model_equal": all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items()),
        "model_keys": sorted(loaded["model"]) == sorted(model.state_dict()),
        "optim_tensors": sum(
            isinstance(v, torch.Tensor) for s in loaded["optim"]["state"].values() for v in s.values()
        ),
        "optim_equal": loaded["optim"]["param_groups"] == live["param_groups"] and all(
            torch.equal(v, live["state"][i][k])
            for i, s in loaded["optim"]["state"].items()
            for k, v in s.items()
        ),
        "plans_built": ts.stager.plans_built,
        "host_bytes": ts.stager.host_bytes().total,
        "arena": ts.stager.last_stats.arena,
        "by_reference": SHARE_COUNTS.by_reference,
        "delegated": SHARE_COUNTS.delegated,
        "dirs": sorted(os.listdir(root)),
    }
    Path(out_path).write_text(json.dumps(report))


@pytest.mark.slow
def test_readme_snippet_saves_through_a_writer_process_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    root = tmp_path / "ckpt"
    root.mkdir()
    proc = subprocess.run(
        [sys.executable, __file__, str(root), str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["dirs"] == ["step-1", "step-2", "step-3"]
    assert r["step"] == 3 and r["model_equal"] and r["model_keys"]
    assert r["optim_tensors"] == 6 and r["optim_equal"]
    assert r["plans_built"] == 1 and r["arena"] == "cached"
    # Staged tensors reached the writer process by reference; none was copied on the way.
    assert r["by_reference"] > 0 and r["delegated"] == 0
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"stager-arena-{r['pid']}-")] == []


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
