"""``python -m stager verify``: one line per tensor that differs, a summary, and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _integrity import flip_tensor_byte, saved
from torch.distributed.checkpoint import FileSystemWriter

from stager.verify import main as verify_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_verify_command_on_a_clean_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = saved(tmp_path)
    assert verify_main([str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 3 tensor chunk(s) verified") and "0 mismatched" in out


def test_verify_command_names_each_flipped_tensor_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = saved(tmp_path)
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


def test_python_dash_m_stager_verify(tmp_path: Path) -> None:
    ckpt = saved(tmp_path)
    flip_tensor_byte(ckpt, "model.w")
    run = subprocess.run(
        [sys.executable, "-m", "stager", "verify", str(ckpt)], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("STAGER_")},
    )
    assert run.returncode == 1, run.stderr
    assert "MISMATCH model.w" in run.stdout
