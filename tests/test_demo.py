"""``python -m stager demo`` in a reduced mode: it trains, reports, checks and passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stager.__main__ import main as cli
from stager.demo import main


def test_demo_reduced_run_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--steps", "20", "--every", "5", "--size", "tiny", "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "CPU numbers" in out
    assert "wrap blocked" in out and "DefaultStager blocked" in out
    assert out.count("PASS  ") == 3
    assert "FAIL" not in out
    assert out.rstrip().endswith("PASS")
    assert "20/20" in err  # the progress bar
    # --dir keeps the checkpoints: 4 per run.
    assert len(list((tmp_path / "wrap").iterdir())) == 4
    assert len(list((tmp_path / "DefaultStager").iterdir())) == 4


def test_demo_through_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli(["demo", "--steps", "4", "--every", "2", "--size", "tiny", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert err == ""


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    rc = main(["--steps", "2", "--every", "1", "--plot", "blocked.png"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "matplotlib" in err and "stager[plot]" in err


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--every", "0"]])
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "must be >= 1" in capsys.readouterr().err
