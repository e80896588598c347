"""``stager.wrap`` on the CPU: loadable bit-exact checkpoints, unchanged training, rollback, errors."""

from __future__ import annotations

import concurrent.futures
import copy
import importlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import stager
from stager import CheckpointWriteError, RestoreMismatchError, StagerClosedError, StageStats
from stager.checkpoint import checkpoint_layout as layout
from stager.demo_model import TinyLM, make_batch
from stager.restore import match_tensors

SIZE = dict(layers=2, d=32, heads=4, vocab=64, seq=16)
BATCH = 4


def make(seed: int = 0) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(**SIZE)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def train(model: TinyLM, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = make_batch(step, BATCH, SIZE["seq"], SIZE["vocab"], torch.device("cpu"))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(layout(model, opt))


def assert_state_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    pairs = match_tensors(want, got)
    assert pairs
    for w, g, path in pairs:
        assert torch.equal(g, w), path
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]


def load_fresh(path: Path) -> dict[str, Any]:
    model, opt = make(seed=123)
    stager.load_checkpoint(path, model, opt)
    return layout(model, opt)


def test_checkpoint_is_bit_exact_and_loadable(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(3))
        fut = handle.checkpoint(tmp_path / "c1")
        expected = snapshot(model, opt)
        train(model, opt, range(3, 6))  # training goes on while the write runs
        fut.result()
        assert isinstance(handle.stats, StageStats)
        assert handle.stats.to_dict()["tensors"] > 0
        assert handle.records[0].blocked_s > 0 and handle.records[0].write_s is not None
    got = load_fresh(tmp_path / "c1")
    assert_state_equal(got, expected)
    # The same layout loads with plain dcp.load, as a user would do it.
    model2, opt2 = make(seed=7)
    train(model2, opt2, range(1))  # creates the optimizer state
    state = layout(model2, opt2)
    dcp.load(state, checkpoint_id=tmp_path / "c1", no_dist=True)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    assert_state_equal(layout(model2, opt2), expected)


@pytest.mark.parametrize("lease_policy", ["allocate", "wait"])
def test_back_to_back_checkpoints_are_each_bit_exact(tmp_path: Path, lease_policy: str) -> None:
    model, opt = make()
    expected = []
    with stager.wrap(model, opt, lease_policy=lease_policy, lease_timeout=30) as handle:
        for i in range(4):
            train(model, opt, range(i, i + 1))
            handle.checkpoint(tmp_path / f"c{i}")  # no waiting for the previous write
            expected.append(snapshot(model, opt))
    for i, want in enumerate(expected):
        assert_state_equal(load_fresh(tmp_path / f"c{i}"), want)


def test_training_is_unchanged_by_checkpointing(tmp_path: Path) -> None:
    model, opt = make()
    plain = train(model, opt, range(12))
    plain_state = snapshot(model, opt)

    model, opt = make()
    losses: list[float] = []
    with stager.wrap(model, opt) as handle:
        for k in range(4):
            losses += train(model, opt, range(3 * k, 3 * k + 3))
            handle.checkpoint(tmp_path / f"c{k}")
    assert losses == plain
    assert_state_equal(layout(model, opt), plain_state)


def test_restore_rolls_back_bit_exactly(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(4))
        handle.checkpoint(tmp_path / "c")
        expected = snapshot(model, opt)
        # What training from the checkpoint gives, from an independent copy.
        ref_model, ref_opt = make(seed=5)
        ref_model.load_state_dict(expected["model"])
        ref_opt.load_state_dict(copy.deepcopy(expected["optim"]))
        ref_losses = train(ref_model, ref_opt, range(4, 7))

        train(model, opt, range(4, 9))
        opt.param_groups[0]["lr"] = 0.5
        stats = handle.restore()
        assert stats.executor == "restore-cpu" and handle.stats is stats
        assert_state_equal(layout(model, opt), expected)
        assert int(model.tokens_seen) == int(expected["model"]["tokens_seen"])
        assert model.head.weight is model.embed.weight
        assert train(model, opt, range(4, 7)) == ref_losses


def test_write_error_surfaces_on_wait(tmp_path: Path) -> None:
    model, opt = make()
    (tmp_path / "afile").write_text("not a directory")
    handle = stager.wrap(model, opt)
    train(model, opt, range(1))
    handle.checkpoint(tmp_path / "afile" / "ckpt")  # returns: the write fails in the background
    with pytest.raises(CheckpointWriteError, match="afile") as info:
        handle.wait()
    assert info.value.__cause__ is not None
    assert handle.records[0].error is not None
    handle.wait()  # reported once
    handle.close()


def test_write_error_surfaces_on_next_checkpoint(tmp_path: Path) -> None:
    model, opt = make()
    (tmp_path / "afile").write_text("not a directory")
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(1))
        fut = handle.checkpoint(tmp_path / "afile" / "ckpt")
        concurrent.futures.wait([fut])
        with pytest.raises(CheckpointWriteError):
            handle.checkpoint(tmp_path / "good")
        handle.checkpoint(tmp_path / "good").result()  # the handle still works
        expected = snapshot(model, opt)
    assert_state_equal(load_fresh(tmp_path / "good"), expected)


def test_close_raises_a_pending_error_after_cleaning_up(tmp_path: Path) -> None:
    model, opt = make()
    (tmp_path / "afile").write_text("")
    handle = stager.wrap(model, opt)
    train(model, opt, range(1))
    handle.checkpoint(tmp_path / "afile" / "ckpt")
    with pytest.raises(CheckpointWriteError):
        handle.close()
    assert not opt._optimizer_step_pre_hooks
    with pytest.raises(StagerClosedError):
        handle.checkpoint(tmp_path / "again")


def test_restore_needs_a_staged_copy_and_a_matching_structure(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        with pytest.raises(RuntimeError, match="no checkpoint"):
            handle.restore()
        handle.checkpoint(tmp_path / "before-any-step")  # the optimizer has no state yet
        train(model, opt, range(1))
        with pytest.raises(RestoreMismatchError, match="state_dict\\['optim'\\]\\['state'\\]"):
            handle.restore()


def test_wrap_rejects_stager_with_overrides() -> None:
    model, opt = make()
    with stager.GraphStager() as s, pytest.raises(ValueError, match="not both"):
        stager.wrap(model, opt, stager=s, nvtx=True)


def test_wrap_with_a_caller_owned_stager(tmp_path: Path) -> None:
    model, opt = make()
    with stager.GraphStager(async_staging=True) as s:
        with stager.wrap(model, opt, stager=s) as handle:
            train(model, opt, range(2))
            handle.checkpoint(tmp_path / "c")
            expected = snapshot(model, opt)
        assert s.plan is not None  # not closed by the handle
    assert_state_equal(load_fresh(tmp_path / "c"), expected)


def test_nvtx_ranges_mark_write_and_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from stager import nvtx

    seen: list[tuple[str, bool]] = []

    def record(name: str, enabled: bool) -> Any:
        seen.append((name, enabled))
        return contextlib.nullcontext()

    monkeypatch.setattr(nvtx, "range", record)
    model, opt = make()
    with stager.wrap(model, opt, nvtx=True) as handle:
        train(model, opt, range(1))
        handle.checkpoint(tmp_path / "c").result()
        handle.restore()
    assert ("stager/write", True) in seen
    assert ("stager/restore", True) in seen


def test_model_without_optimizer(tmp_path: Path) -> None:
    model, _ = make()
    with stager.wrap(model) as handle:
        handle.checkpoint(tmp_path / "c")
        expected = copy.deepcopy(model.state_dict())
        handle.fence()  # a write outside optimizer.step(): wait for the copy first
        with torch.no_grad():
            model.pos.add_(1)
        handle.restore()
        for k, v in expected.items():
            assert torch.equal(model.state_dict()[k], v), k
    fresh, _ = make(seed=3)
    stager.load_checkpoint(tmp_path / "c", fresh)
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v), k


class _SlowWriter:
    """Makes every write block until released, so a checkpoint is still being written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import stager.checkpoint as checkpoint_module

        self.release = threading.Event()
        real = checkpoint_module.dcp_writer
        gate = self.release

        def slow_writer(path: str, nvtx_enabled: bool) -> Any:
            writer = real(path, nvtx_enabled)
            write_data = writer.write_data

            def blocked(plan: Any, planner: Any) -> Any:
                assert gate.wait(30)
                return write_data(plan, planner)

            writer.write_data = blocked
            return writer

        monkeypatch.setattr(checkpoint_module, "dcp_writer", slow_writer)


def test_second_checkpoint_during_a_write_waits_under_the_wait_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _SlowWriter(monkeypatch)
    model, opt = make()
    with stager.wrap(model, opt, lease_policy="wait", max_arenas=1, lease_timeout=0.3) as handle:
        train(model, opt, range(1))
        handle.checkpoint(tmp_path / "c1")  # its arena stays leased to the blocked writer
        with pytest.raises(stager.LeaseTimeoutError):
            handle.checkpoint(tmp_path / "c2").result(timeout=30)
        slow.release.set()
        with pytest.raises(CheckpointWriteError, match="staging checkpoint .*c2.*LeaseTimeoutError"):
            handle.wait()  # a failure in the background is reported on the next call too
        expected = snapshot(model, opt)
        handle.checkpoint(tmp_path / "c3")  # the lease ended with the write
        handle.fence()
        assert handle.stats.arena.startswith("cached")
    assert_state_equal(load_fresh(tmp_path / "c1"), expected)


def test_second_checkpoint_during_a_write_takes_another_arena_under_allocate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = _SlowWriter(monkeypatch)
    model, opt = make()
    with stager.wrap(model, opt, lease_policy="allocate", max_arenas=1) as handle:
        train(model, opt, range(1))
        handle.checkpoint(tmp_path / "c1")
        first = snapshot(model, opt)
        train(model, opt, range(1, 2))
        handle.checkpoint(tmp_path / "c2")
        second = snapshot(model, opt)
        handle.fence()
        assert handle.stats.arena == "fresh"
        slow.release.set()
    assert_state_equal(load_fresh(tmp_path / "c1"), first)
    assert_state_equal(load_fresh(tmp_path / "c2"), second)


# ---------------------------------------------------------------- the GPU plumbing, with fakes


class _FakeEvent:
    def query(self) -> bool:
        return False


class _FakePending:
    """Stands in for ``stager.device.PendingCopy``: device copies that finish when waited on."""

    def __init__(self) -> None:
        self.events = (_FakeEvent(),)
        self.done = threading.Event()

    def wait(self) -> None:
        self.done.wait(0.2)  # the "copy" takes a while
        self.done.set()


class _NowaitStager(stager.GraphStager):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.pendings: list[_FakePending] = []

    def stage_nowait(self, state_dict: Any, marks: Any = None, **kw: Any) -> tuple[Any, _FakePending]:
        self.pendings.append(_FakePending())
        return self.stage(state_dict), self.pendings[-1]


class _FakeStream:
    def __init__(self) -> None:
        self.waited: list[Any] = []

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)


def test_device_plumbing_with_a_fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What wrap does with in-flight device copies: device waits in hooks, writer waits first."""
    wrap_module = importlib.import_module("stager.wrap")
    stream = _FakeStream()
    monkeypatch.setattr(wrap_module, "_cuda_devices", lambda state: [torch.device("cuda", 0)])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    model, opt = make()
    with _NowaitStager() as s:
        handle = stager.wrap(model, opt, stager=s)
        assert len(model._forward_pre_hooks) == 1  # TinyLM owns the tokens_seen buffer
        train(model, opt, range(1))
        fut = handle.checkpoint(tmp_path / "c")
        handle._staging.staged.wait(10)  # the background thread has queued the copy
        pending = s.pendings[-1]
        assert handle._events == pending.events
        assert not pending.done.is_set()  # checkpoint() returned without waiting for the copy
        train(model, opt, range(1, 2))  # the forward hook waits on the device; the step finds nothing left
        assert stream.waited == [pending.events[0]]
        fut.result()
        assert pending.done.is_set()  # the writer waited for the copy before writing
        assert handle.records[-1].write_s >= 0.2
        handle.checkpoint(tmp_path / "c2")
        handle.restore()  # waits for the copy on the host first
        assert s.pendings[-1].done.is_set() and handle._events == ()
        handle.close()
    assert not model._forward_pre_hooks and not opt._optimizer_step_pre_hooks


def test_failed_writes_release_their_staged_copies(tmp_path: Path) -> None:
    model, opt = make()
    (tmp_path / "afile").write_text("")
    with stager.wrap(model, opt, lease_policy="wait", max_arenas=1, lease_timeout=5) as handle:
        for _ in range(3):
            handle.checkpoint(tmp_path / "afile" / "ckpt")
            with pytest.raises(CheckpointWriteError):
                handle.wait()
        # With one arena and the wait policy, a copy kept alive by a failed write would block here.
        handle.checkpoint(tmp_path / "ok").result()
        expected = snapshot(model, opt)
    assert_state_equal(load_fresh(tmp_path / "ok"), expected)


def test_a_checkpoint_that_fails_to_stage_says_so_on_restore(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        handle.checkpoint(tmp_path / "c1").result()
        model.register_buffer("scratch", torch.empty(3, device="meta"))
        with pytest.raises(stager.StagingInputError, match="scratch"):
            handle.checkpoint(tmp_path / "c2").result(timeout=30)
        del model._buffers["scratch"]
        with pytest.raises(RuntimeError, match="last checkpoint\\(\\) failed while staging"):
            handle.restore()
        with pytest.raises(CheckpointWriteError, match="staging checkpoint .*c2.*scratch"):
            handle.wait()
