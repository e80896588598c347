"""The command line: ``python -m stager doctor | bench`` and the dispatcher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stager import bench
from stager.__main__ import main
from stager.doctor import report
from stager.envs import KNOBS


def test_doctor_reports_versions_headroom_sources_and_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGER_CHUNK_SIZE", "8MiB")
    text = "\n".join(report())
    assert "torch " in text and "triton " in text
    assert "NVML unavailable" in text or "NVML available" in text
    assert "/proc/meminfo" in text or "cgroup" in text
    for knob in KNOBS:
        assert knob.env in text
    assert re.search(r"STAGER_CHUNK_SIZE +=  ?8388608 +\(env STAGER_CHUNK_SIZE\)", text), text
    assert "a stage of 1.00 GiB now" in text and "host arena:" in text


def test_doctor_runs_as_a_command() -> None:
    out = subprocess.run([sys.executable, "-m", "stager", "doctor", "--bytes", "64MiB"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "a stage of 64.00 MiB now" in out.stdout


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "usage: python -m stager" in capsys.readouterr().err


def test_bench_writes_rows_with_floor_and_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.WORKLOADS["cpu"], "small", lambda: bench._small(200, 1024, 4096, "cpu"))
    out = tmp_path / "bench.json"
    assert bench.main(["--cases", "small", "--iters", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"floor (one memcpy)", "stager", "dcp-default (no stager)"} <= providers
    assert "CPU" in data["header"]["device"]
    floor = next(r for r in data["rows"] if r["provider"].startswith("floor"))
    assert floor["x_floor"] == pytest.approx(1.0)
    assert all(r["tensors"] == 200 for r in data["rows"])


def test_bench_budget_stops_a_slow_provider_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.WORKLOADS["cpu"], "small", lambda: bench._small(50, 1024, 4096, "cpu"))
    out = tmp_path / "bench.json"
    args = ["--cases", "small", "--iters", "5", "--providers", "stager", "--budget", "0", "--json", str(out)]
    assert bench.main(args) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["provider"] == "stager"]
    assert len(rows) == 1 and rows[0]["note"] == "1 of 5 calls (--budget)"
    assert rows[0]["complete_ms_p50"] > 0


def test_help_goes_to_stdout_and_an_unknown_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: python -m stager" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
