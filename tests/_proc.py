"""Child Python processes for the fault tests: started with a script, read line by line with a
time limit, always ended (killed if need be) so no test hangs or leaves a process behind."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 120.0


def start(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code args...`` in the repository root, with pipes for stdin and stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGER_")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def read_line(proc: subprocess.Popen[str], timeout: float = LIMIT_S) -> str:
    """The child's next line of output; fails (and kills it) if none comes within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no output from the child within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout)
        raise AssertionError(f"the child ended (rc {proc.returncode}) without a line: {err[-3000:]}")
    return line.strip()


def finish(proc: subprocess.Popen[str], timeout: float = LIMIT_S) -> tuple[int, str]:
    """Close the child's stdin, wait for it (kill it past ``timeout``); ``(returncode, stderr)``."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the child did not end within {timeout} s: {err[-3000:]}") from None
    return proc.returncode, err


def run(code: str, *args: str, timeout: float = LIMIT_S) -> subprocess.CompletedProcess[str]:
    """Run a script to its end with a time limit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGER_")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True, capture_output=True,
        timeout=timeout,
    )


@contextmanager
def shm_dir() -> Iterator[str]:
    """A private directory in /dev/shm (a tmpfs, as the arenas need), removed afterwards."""
    path = tempfile.mkdtemp(prefix="stager-test-", dir="/dev/shm")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
