"""The command line: ``python -m stager doctor`` and the dispatcher."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


def test_help_goes_to_stdout_and_an_unknown_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: python -m stager" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
