"""Arena files in /dev/shm outlive no process for long: SIGTERM removes them on the way out, and
after SIGKILL or os._exit the next process that creates a shared arena reclaims them (their
owner's lock is gone). Files of live processes are never touched. Each owner is a child process
with a time limit, working in a private directory in /dev/shm that is removed afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from _proc import finish, read_line, shm_dir, start

from stager import StagingMemoryError, shm
from stager import arena as arena_mod
from stager.arena import HostArena
from stager.doctor import report, shm_lines

OWNER = r"""
import os, signal, sys
mode = sys.argv[2]
if mode == "user-handler":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
from stager.arena import HostArena
arena = HostArena(1 << 20, shared=True, shm_dir=sys.argv[1])
handler = signal.getsignal(signal.SIGTERM)
print(arena.path, os.getpid(), getattr(handler, "__name__", str(handler)), flush=True)
if mode == "os._exit":
    os._exit(0)
sys.stdin.read()  # until the test ends it (closing stdin, or a signal)
"""


def _owner(d: str, mode: str) -> tuple[subprocess.Popen[str], str, int, str]:
    proc = start(OWNER, d, mode)
    path, pid, handler = read_line(proc).split()
    assert os.path.exists(path) and os.path.basename(path).startswith(f"stager-arena-{pid}-")
    return proc, path, int(pid), handler


def _end(proc: subprocess.Popen[str], sig: int | None) -> int:
    if sig is not None:
        proc.send_signal(sig)
    rc, err = finish(proc)
    assert "Traceback" not in err, err
    return rc


def test_sigterm_removes_the_arena_files_and_still_ends_the_process_by_sigterm() -> None:
    with shm_dir() as d:
        proc, path, _, handler = _owner(d, "wait")
        assert handler == "_on_sigterm"
        assert _end(proc, signal.SIGTERM) == -signal.SIGTERM
        assert not os.path.exists(path)
        assert os.listdir(d) == []


def test_a_sigterm_handler_of_the_user_is_kept_and_its_normal_exit_cleans_up() -> None:
    with shm_dir() as d:
        proc, path, _, handler = _owner(d, "user-handler")
        assert handler == "<lambda>"
        assert _end(proc, signal.SIGTERM) == 3
        assert os.listdir(d) == []


@pytest.mark.parametrize("how", ["SIGKILL", "os._exit"])
def test_files_left_by_a_killed_owner_are_reclaimed_by_the_next_shared_arena(how: str) -> None:
    with shm_dir() as d:
        proc, path, pid, _ = _owner(d, "os._exit" if how == "os._exit" else "wait")
        _end(proc, signal.SIGKILL if how == "SIGKILL" else None)
        assert os.path.exists(path)  # nothing ran in the owner: the file is left behind
        (stale,) = shm.scan(d)
        assert stale.path == path and stale.pid == pid and stale.state == "stale" and stale.reclaimable
        assert stale.nbytes == 1 << 20
        arena = HostArena(4096, shared=True, shm_dir=d)  # this process's first arena in d
        assert not os.path.exists(path)
        assert os.listdir(d) == [os.path.basename(arena.path)]
        del arena
        assert os.listdir(d) == []


def test_a_live_owners_file_is_never_reclaimed_and_doctor_says_whose_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with shm_dir() as d:
        proc, path, pid, _ = _owner(d, "wait")
        try:
            done = shm.reclaim_stale(d)
            assert done.files == 0 and done.live_files == 1 and done.live_bytes == 1 << 20
            assert os.path.exists(path)
            mine = HostArena(4096, shared=True, shm_dir=d)
            assert os.path.exists(path)
            states = {f.path: (f.pid, f.state, f.mine) for f in shm.scan(d)}
            assert states == {path: (pid, "live", False), mine.path: (os.getpid(), "live", True)}
            text = "\n".join(shm_lines(d))
            name = os.path.basename(path)
            assert f"{name}  1.00 MiB, pid {pid}, lock held: in use" in text
            assert f"pid {os.getpid()} (this process), lock held: in use" in text
            assert "nothing to reclaim" in text
            del mine
        finally:
            assert _end(proc, None) == 0  # stdin closed: a normal exit
        assert os.listdir(d) == []


def test_doctor_lists_a_stale_file_as_reclaimable_and_reclaims_it_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with shm_dir() as d:
        proc, path, pid, _ = _owner(d, "wait")
        _end(proc, signal.SIGKILL)
        monkeypatch.setattr(arena_mod, "SHM_DIR", d)
        text = "\n".join(report(1 << 20))
        name = os.path.basename(path)
        assert f"shared memory ({d}):" in text
        assert f"{name}  1.00 MiB, pid {pid}, no lock held: its owner is gone, reclaimable" in text
        assert "1 stale file(s) of 1.00 MiB reclaimable" in text
        assert os.path.exists(path)  # listing removes nothing
        from stager.doctor import main

        assert main(["--reclaim", "--bytes", "1MiB"]) == 0
        assert os.listdir(d) == []


@pytest.mark.parametrize("visited", [False, True], ids=["first-use", "already-used"])
def test_a_full_dev_shm_reclaims_stale_files_and_says_so(
    monkeypatch: pytest.MonkeyPatch, visited: bool
) -> None:
    with shm_dir() as d:
        proc, path, _, _ = _owner(d, "wait")
        _end(proc, signal.SIGKILL)
        if visited:  # this process passed through d before: only the shortage reclaims now
            monkeypatch.setattr(shm, "_reclaimed_dirs", {os.path.realpath(d)})
        assert os.path.exists(path)
        real = os.statvfs(d)

        class Small:
            f_frsize = real.f_frsize
            f_bavail = (64 << 20) // real.f_frsize
            f_blocks = (64 << 20) // real.f_frsize

        monkeypatch.setattr(arena_mod.os, "statvfs", lambda p: Small())
        with pytest.raises(StagingMemoryError) as info:
            HostArena(100 << 20, shared=True, shm_dir=d)
        msg = str(info.value)
        assert (
            "1 stale stager arena file(s) of 1.00 MiB, whose owners are gone, were found and reclaimed" in msg
        )
        assert "STAGER_SHARED_MEMORY=0" in msg
        assert os.listdir(d) == []
        with pytest.raises(StagingMemoryError, match="no stale stager arena files were found"):
            HostArena(100 << 20, shared=True, shm_dir=d)


def test_a_file_being_created_is_not_taken_for_stale() -> None:
    with shm_dir() as d:
        young = os.path.join(d, f"stager-new-{os.getpid()}-x")
        open(young, "wb").close()
        assert [f.state for f in shm.scan(d)] == ["new"]
        assert shm.reclaim_stale(d).files == 0 and os.path.exists(young)
        os.utime(young, (1, 1))  # left by a process killed while creating it, long ago
        assert shm.reclaim_stale(d).files == 1
        assert os.listdir(d) == []


STAGING = r"""
import sys, torch, stager
from stager import arena
arena.SHM_DIR, mode = sys.argv[1], sys.argv[2]
if mode == "wrap":  # arenas made on the staging thread, the writes on another
    model = torch.nn.Linear(8, 8)
    handle = stager.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), shared_memory=True)
    handle.checkpoint(sys.argv[3])
    handle.wait()
else:
    s = stager.GraphStager(shared_memory=True, async_staging=mode == "async")
    out = s.stage({"w": torch.ones(1000)})
    out = out.result() if mode == "async" else out
print("staged", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("mode", ["sync", "async", "wrap"])
def test_sigterm_while_holding_staged_copies_removes_their_files(mode: str, tmp_path: Path) -> None:
    """End to end, with the arenas made on the caller's thread, on the staging thread, by wrap."""
    with shm_dir() as d:
        proc = start(STAGING, d, mode, str(tmp_path / "ckpt"))
        assert read_line(proc) == "staged"
        assert len(os.listdir(d)) >= 1
        assert _end(proc, signal.SIGTERM) == -signal.SIGTERM
        assert os.listdir(d) == []
