"""Profiler ranges (``STAGER_NVTX=1``) in torch.profiler traces, the NVTX path, the nsys
checkpoint window (``STAGER_PROFILE_CHECKPOINTS``) and ``demo --trace``."""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import stager
from stager import nvtx
from stager.config import StagerConfig
from stager.errors import StagerConfigError
from stager.nvtx import CheckpointSet, parse_checkpoints, profiler_window


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": {f"w{i}": torch.randn(64, 8) for i in range(12)}, "step": 3}


def _names(trace: Path) -> set[str]:
    events = json.loads(trace.read_text())["traceEvents"]
    return {e["name"] for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("stager/")}


def _all_threads() -> dict[str, Any]:
    from torch._C._profiler import _ExperimentalConfig

    return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}


def test_torch_profiler_trace_contains_the_stager_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGER_NVTX", "1")
    state = _state()
    with stager.GraphStager() as s, profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            staged = s.stage(state)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    assert {"stager/plan", "stager/copy"} <= _names(tmp_path / "trace.json")
    assert torch.equal(staged["model"]["w3"], state["model"]["w3"])


def test_ranges_of_the_staging_thread_show_when_the_profiler_records_every_thread(tmp_path: Path) -> None:
    state = _state()
    with stager.GraphStager(nvtx=True, async_staging=True) as s:
        with profile(activities=[ProfilerActivity.CPU], **_all_threads()) as prof:
            for _ in range(2):
                staged = s.stage(state).result()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    assert {"stager/plan", "stager/copy"} <= _names(tmp_path / "trace.json")
    assert torch.equal(staged["model"]["w0"], state["model"]["w0"])


def test_no_range_when_nvtx_is_off(tmp_path: Path) -> None:
    with stager.GraphStager() as s, profile(activities=[ProfilerActivity.CPU], **_all_threads()) as prof:
        s.stage(_state())
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    assert _names(tmp_path / "trace.json") == set()


class _FakeNvtx:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def range_push(self, name: str) -> None:
        self.calls.append(f"push {name}")

    def range_pop(self) -> None:
        self.calls.append("pop")


def test_nvtx_range_is_pushed_and_popped_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvtx()
    monkeypatch.setattr(nvtx, "_cuda", True)
    monkeypatch.setattr(torch.cuda, "nvtx", fake)
    with nvtx.range("stager/plan", True):
        with nvtx.range("stager/copy", True):
            pass
    with nvtx.range("stager/replay", False):
        pass
    assert fake.calls == ["push stager/plan", "push stager/copy", "pop", "pop"]


def test_under_emit_nvtx_the_record_function_range_is_the_only_nvtx_range(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # emit_nvtx turns each record_function into an NVTX range itself: pushing one too would double it.
    fake = _FakeNvtx()
    monkeypatch.setattr(nvtx, "_cuda", True)
    monkeypatch.setattr(torch.cuda, "nvtx", fake)
    monkeypatch.setattr(torch._C._autograd, "_profiler_type", lambda: "ActiveProfilerType.NVTX")
    entered: list[str] = []
    real = torch.profiler.record_function

    class Recording(real):  # type: ignore[misc, valid-type]
        def __enter__(self) -> Any:
            entered.append(self.name)
            return super().__enter__()

    monkeypatch.setattr(torch.profiler, "record_function", Recording)
    with nvtx.range("stager/copy", True):
        pass
    assert fake.calls == [] and entered == ["stager/copy"]


def test_a_range_closes_when_its_block_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvtx()
    monkeypatch.setattr(nvtx, "_cuda", True)
    monkeypatch.setattr(torch.cuda, "nvtx", fake)
    with pytest.raises(KeyError):
        with nvtx.range("stager/plan", True):
            raise KeyError("x")
    assert fake.calls == ["push stager/plan", "pop"]


@pytest.mark.parametrize(
    "text, indices, shown",
    [
        pytest.param("2", (2,), "2", id="one"),
        pytest.param("2-3", (2, 3), "2-3", id="range"),
        pytest.param(" 1, 4-5 ", (1, 4, 5), "1,4-5", id="list"),
        pytest.param("5,3-4,4", (3, 4, 5), "3-5", id="merged"),
        pytest.param("none", (), "none", id="none"),
        pytest.param("", (), "none", id="empty"),
    ],
)
def test_parse_checkpoints(text: str, indices: tuple[int, ...], shown: str) -> None:
    got = parse_checkpoints(text)
    assert tuple(got) == indices and str(got) == shown
    assert parse_checkpoints(str(got)) == got


@pytest.mark.parametrize("text", ["0", "3-2", "two", "1,,2", "-1", "2-", "1.5"])
def test_parse_checkpoints_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_checkpoints(text)
    with pytest.raises(StagerConfigError, match="STAGER_PROFILE_CHECKPOINTS"):
        StagerConfig.resolve(environ={"STAGER_PROFILE_CHECKPOINTS": text})


def test_the_knob_resolves_into_the_config() -> None:
    cfg = StagerConfig.resolve(environ={"STAGER_PROFILE_CHECKPOINTS": "3,2"})
    assert cfg.profile_checkpoints == CheckpointSet([2, 3])
    assert ("STAGER_PROFILE_CHECKPOINTS", "2-3", "env STAGER_PROFILE_CHECKPOINTS") in cfg.describe()
    assert StagerConfig.resolve(environ={}).profile_checkpoints == CheckpointSet()


class _FakeCudart:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def cudaProfilerStart(self) -> int:  # noqa: N802 - CUDA's name
        self.calls.append("start")
        return 0

    def cudaProfilerStop(self) -> int:  # noqa: N802 - CUDA's name
        self.calls.append("stop")
        return 0


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> _FakeCudart:
    fake = _FakeCudart()
    monkeypatch.setattr(nvtx, "_cuda", True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def _run(window: nvtx.ProfilerWindow, calls: list[str], n: int) -> list[tuple[int, list[str]]]:
    """What the profiler API saw inside and after each of the stage calls 1..n."""
    seen = []
    for i in range(1, n + 1):
        with window.stage(i):
            inside = list(calls)
        seen.append((i, inside))
    return seen


def test_window_brackets_a_run_of_checkpoints_once(cudart: _FakeCudart) -> None:
    window = profiler_window(StagerConfig.resolve(environ={"STAGER_PROFILE_CHECKPOINTS": "2-3"}))
    seen = _run(window, cudart.calls, 5)
    # started on entering checkpoint 2, still open inside 3, stopped when 3 was done
    assert seen == [(1, []), (2, ["start"]), (3, ["start"]), (4, ["start", "stop"]), (5, ["start", "stop"])]
    assert (window.starts, window.stops) == (1, 1)


def test_window_with_two_runs_opens_two_ranges(cudart: _FakeCudart) -> None:
    window = profiler_window(StagerConfig.resolve(profile_checkpoints="1,3"))
    _run(window, cudart.calls, 4)
    assert cudart.calls == ["start", "stop", "start", "stop"]


def test_window_of_an_async_stage_stops_when_its_future_completes(cudart: _FakeCudart) -> None:
    window = profiler_window(StagerConfig.resolve(profile_checkpoints="1"))
    future: Future = Future()
    with window.stage(1) as w:
        assert w is not None
        assert w.until(future) is future
    assert cudart.calls == ["start"]  # the copies are still running: the range stays open
    future.set_result({})
    assert cudart.calls == ["start", "stop"]


def test_window_stops_when_the_stage_raises(cudart: _FakeCudart) -> None:
    window = profiler_window(StagerConfig.resolve(profile_checkpoints="1"))
    with pytest.raises(RuntimeError):
        with window.stage(1):
            raise RuntimeError("staging failed")
    assert cudart.calls == ["start", "stop"]


def test_window_without_cuda_marks_nothing_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nvtx, "_cuda", False)

    def no_cudart() -> None:
        raise AssertionError("cudart called without CUDA")

    monkeypatch.setattr(torch.cuda, "cudart", no_cudart)
    with caplog.at_level(logging.WARNING, logger="stager"):
        window = profiler_window(StagerConfig.resolve(profile_checkpoints="1-2"))
    assert not window.enabled and "STAGER_PROFILE_CHECKPOINTS=1-2" in caplog.text
    for i in (1, 2, 3):
        with window.stage(i) as w:
            assert w is None


def test_window_is_inert_when_no_checkpoint_is_chosen(cudart: _FakeCudart) -> None:
    window = profiler_window(StagerConfig.resolve(environ={}))
    _run(window, cudart.calls, 3)
    assert cudart.calls == [] and not window.enabled


def test_demo_trace_writes_a_trace_with_the_ranges_and_prints_their_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stager.demo import main, range_times

    trace = tmp_path / "demo.json"
    rc = main(["--size", "tiny", "--steps", "2", "--every", "2", "--device", "cpu", "--no-progress",
               "--dir", str(tmp_path / "ckpt"), "--trace", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0
    times = range_times(trace)
    assert {"stager/plan", "stager/copy", "stager/write"} <= set(times)
    assert all(count >= 1 and total > 0 for count, total in times.values())
    table = out[out.index("time per stager/* range"):]
    for name, (count, _) in times.items():
        assert any(line.split()[:2] == [name, str(count)] for line in table.splitlines()), name
