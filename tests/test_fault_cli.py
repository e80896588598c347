"""The command line's errors: one line on stderr and a non-zero exit, never a traceback; paths
written at the end of a run are checked before it starts; ``doctor`` reports every bad value
and goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stager import demo
from stager.__main__ import main
from stager.benchmarks import staging as bench
from stager.doctor import report

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _no_run(*_: Any, **__: Any) -> Any:
    raise AssertionError("the command ran although its arguments were bad")


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("iters", ["0", "-1"])
def test_bench_refuses_iters_below_one(
    iters: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "run", _no_run)
    line = _usage_error(["bench", "--iters", iters], capsys)
    assert line.startswith("python -m stager bench: error: --iters") and ">= 1" in line


def test_a_malformed_option_is_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["bench", "--iters", "many"], capsys)
    assert "invalid int value: 'many'" in line


def test_bench_checks_the_json_path_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "run", _no_run)
    line = _usage_error(["bench", "--json", str(tmp_path / "missing" / "out.json")], capsys)
    assert "--json" in line and "does not exist" in line
    line = _usage_error(["bench", "--json", str(tmp_path)], capsys)
    assert "is a directory" in line
    (tmp_path / "file").write_text("")
    line = _usage_error(["bench", "--json", str(tmp_path / "file" / "out.json")], capsys)
    assert "is not a directory" in line


def test_bench_reports_a_json_write_that_fails_after_the_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def quick_run(*_: Any, **__: Any) -> tuple[dict[str, Any], list[Any]]:
        out_dir.rmdir()  # the directory goes away while the benchmark runs
        return {"device": "CPU"}, []

    monkeypatch.setattr(bench, "run", quick_run)
    monkeypatch.setattr(bench, "format_table", lambda head, rows: "table")
    assert main(["bench", "--json", str(out_dir / "rows.json")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("python -m stager bench: error: could not write --json")


def test_demo_refuses_a_bad_dir_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "_main", _no_run)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["demo", "--dir", str(afile)]) == 2
    assert "exists and is not a directory" in _one_line(capsys.readouterr().err)
    assert main(["demo", "--dir", str(afile / "sub")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --dir '{afile / 'sub'}' cannot be created")


def test_a_bad_variable_stops_the_demo_before_it_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "_main", _no_run)
    monkeypatch.setenv("STAGER_CACHE_POLICY", "sometimes")
    assert main(["demo", "--dir", str(tmp_path / "ckpt")]) == 2
    assert _one_line(capsys.readouterr().err).startswith("error: STAGER_CACHE_POLICY='sometimes' is invalid")
    assert not (tmp_path / "ckpt").exists()  # refused before anything was created


def test_a_bad_variable_stops_bench_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.WORKLOADS["cpu"], "small", lambda: bench._small(5, 64, 128, "cpu"))
    monkeypatch.setenv("STAGER_ALIGNMENT", "8")
    assert main(["bench", "--cases", "small", "--iters", "1", "--providers", "stager"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("python -m stager bench: error: STAGER_ALIGNMENT='8' is invalid")


def test_doctor_reports_every_bad_value_with_its_source_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGER_ALIGNMENT", "8")
    monkeypatch.setenv("STAGER_PINNED", "yes")
    monkeypatch.setenv("STAGER_PROFILE", "fastest")
    monkeypatch.setenv("STAGER_CHUNK_SIZE", "8MiB")  # a good value among the bad ones still applies
    monkeypatch.setenv("STAGER_LEASE_TIMOUT", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    text = "\n".join(report(1 << 20))
    assert "configuration problems (5):" in text
    assert "STAGER_ALIGNMENT='8' is invalid" in text and "using 256 (default) below" in text
    assert "STAGER_PINNED='yes' is invalid; expected auto, on or off; using auto (default) below" in text
    assert "unknown profile 'fastest' (from STAGER_PROFILE" in text
    assert "STAGER_LEASE_TIMOUT is set but is not a stager variable" in text
    assert "did you mean STAGER_LEASE_TIMEOUT?" in text
    assert "LOCAL_WORLD_SIZE='two' is not a positive integer" in text and "assuming 1 rank" in text
    assert "(env STAGER_CHUNK_SIZE)" in text
    assert "a stage of 1.00 MiB now" in text and "host arena:" in text


def test_doctor_as_a_command_with_bad_values_exits_zero_without_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGER_")}
    env.update(STAGER_MAX_ARENAS="0", LOCAL_WORLD_SIZE="-3", STAGER_NVTX="on")
    done = subprocess.run([sys.executable, "-m", "stager", "doctor", "--bytes", "1MiB"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "configuration problems (3):" in done.stdout
    assert "STAGER_MAX_ARENAS='0' is invalid" in done.stdout and "STAGER_NVTX='on' is invalid" in done.stdout


def test_a_usage_error_from_the_real_command_is_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGER_")}
    done = subprocess.run([sys.executable, "-m", "stager", "bench", "--iters", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--iters 0: expected an integer >= 1" in _one_line(done.stderr)
