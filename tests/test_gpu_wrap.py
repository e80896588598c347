"""``stager.wrap`` and restore on a CUDA GPU: device-side waits, overlap, bit-exact rollback.

Every test here is marked ``cuda`` and skipped by conftest without a GPU; the module imports on
any machine.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import stager
from stager import GraphStager
from stager.checkpoint import checkpoint_layout as layout
from stager.restore import match_tensors

pytestmark = pytest.mark.cuda

_SLEEP_CYCLES = 1_000_000_000  # torch.cuda._sleep: about half a second on a ~2 GHz GPU


class Net(nn.Module):
    """An MLP with BatchNorm (buffers a forward updates) and ``extra`` MiB of parameters to stage."""

    def __init__(self, extra_mib: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 8))
        # 4 MiB each; not used by forward (no grads, no optimizer state), but checkpointed.
        self.extra = nn.ParameterList(nn.Parameter(torch.randn(1 << 20)) for _ in range(extra_mib // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make(extra_mib: int = 0, seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(extra_mib).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 64, generator=g).cuda(), torch.randn(32, 8, generator=g).cuda()


def train_step(model: Net, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = (model(x) - y).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def assert_state_equal(got: Any, want: Any) -> None:
    pairs = match_tensors(want, got)
    assert pairs
    for w, g, path in pairs:
        assert torch.equal(g.cpu(), w.cpu()), path


def test_step_waits_on_the_device_and_staging_overlaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = make(extra_mib=256)
    with stager.wrap(model, opt) as handle:
        x, y = batch(0)
        train_step(model, opt, x, y)
        handle.checkpoint(tmp_path / "warm")  # plans, pins the arena, captures
        train_step(model, opt, x, y)
        handle.wait()
        torch.cuda.synchronize()

        waits: list[Any] = []
        syncs: list[str] = []
        main = threading.get_ident()
        real_wait_event = torch.cuda.Stream.wait_event

        def wait_event(self: Any, event: Any) -> Any:
            waits.append(event)
            return real_wait_event(self, event)

        def recorder(name: str, real: Any) -> Any:
            def record(*args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() == main:
                    syncs.append(name)
                return real(*args, **kwargs)

            return record

        x, y = batch(1)
        torch.cuda._sleep(_SLEEP_CYCLES)  # the compute stream stays busy: staging cannot start yet
        monkeypatch.setattr(torch.cuda.Stream, "wait_event", wait_event)
        monkeypatch.setattr(
            torch.cuda.Event, "synchronize", recorder("Event.synchronize", torch.cuda.Event.synchronize)
        )
        monkeypatch.setattr(
            torch.cuda.Stream, "synchronize", recorder("Stream.synchronize", torch.cuda.Stream.synchronize)
        )
        monkeypatch.setattr(
            torch.cuda, "synchronize", recorder("torch.cuda.synchronize", torch.cuda.synchronize)
        )
        handle.checkpoint(tmp_path / "c")
        assert handle._staging is not None and handle._staging.staged.wait(30)  # queued on the side stream
        events = handle._events
        assert events, "the stager left no device copy in flight (GraphStager.stage_nowait missing?)"
        train_step(model, opt, x, y)  # forward (BatchNorm hook), backward, step (step hook)
        still_running = not all(e.query() for e in events)
        monkeypatch.undo()
        assert syncs == []
        assert still_running, "the CPU waited for staging during the training step"
        assert any(e is events[-1] for e in waits), (
            "the training step did not wait_event on the staging event"
        )
        handle.wait()
        assert handle.records[-1].blocked_s < 0.25


def test_checkpoint_and_restore_are_bit_exact(tmp_path: Path) -> None:
    model, opt = make(extra_mib=8)
    with stager.wrap(model, opt) as handle:
        for step in range(3):
            train_step(model, opt, *batch(step))
        handle.checkpoint(tmp_path / "c")
        expected = copy.deepcopy(layout(model, opt))
        for step in range(3, 6):
            train_step(model, opt, *batch(step))
        stats = handle.restore()
        assert stats.executor == "restore-unpack"
        assert_state_equal(layout(model, opt), expected)
        handle.wait()
    fresh, fresh_opt = make(extra_mib=8, seed=1)
    stager.load_checkpoint(tmp_path / "c", fresh, fresh_opt)
    assert_state_equal(layout(fresh, fresh_opt), expected)


def test_graph_stager_restore_on_the_device() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(4096, device="cuda", generator=g)
    w = torch.randn(300, 7, device="cuda", generator=g)
    live = {
        "w": w,
        "tied": w,
        "lo": base[:2048].view(64, 32),
        "hi": base[2000:],  # overlaps lo
        "t": torch.randn(33, 5, device="cuda", generator=g).t(),
        "half": torch.randn(1001, device="cuda", generator=g).half(),
        "ints": torch.arange(13, device="cuda"),
        "flags": torch.rand(17, device="cuda", generator=g) > 0.5,
        "cpu_step": torch.tensor(5.0),
        "empty": torch.empty(0, device="cuda"),
        "many": [torch.randn(n, device="cuda", generator=g) for n in range(1, 200)],
    }
    expected = copy.deepcopy(live)
    with GraphStager() as s:
        staged = s.stage(live)
        with torch.no_grad():
            for _, t, _ in match_tensors(live, live):
                t.copy_(torch.zeros_like(t) if t.dtype == torch.bool else t + 1)
        stats = s.restore(staged, live)
    assert stats.executor == "restore-unpack"
    assert_state_equal(live, expected)
    assert live["tied"] is live["w"]
