"""A forked child never removes its parent's shared arenas: not when it drops them, not when it
exits normally (running the inherited finalizers), not on SIGTERM. Each case runs in a child
interpreter (which forks) with a time limit, over a private directory in /dev/shm."""

from __future__ import annotations

import json
import mmap
import os

import pytest
import torch
from _proc import run, shm_dir

from stager import arena as arena_mod

FORK_SCRIPT = r"""
import errno, fcntl, gc, glob, json, os, pickle, signal, sys, time
from multiprocessing.reduction import ForkingPickler
import torch
from stager import GraphStager, arena

arena.SHM_DIR = sys.argv[1]
mode = sys.argv[2]
stager = GraphStager(shared_memory=True)
state = {"w": torch.arange(4096.0), "b": torch.ones(7, dtype=torch.int64)}
out = stager.stage(state)
files = sorted(glob.glob(os.path.join(arena.SHM_DIR, "stager-arena-*")))
pid = os.fork()
if pid == 0:
    if mode == "drop":
        del out
        stager.close()
        del stager
        gc.collect()
    if mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    sys.exit(0)  # a normal exit: atexit and the inherited weakref finalizers run
_, status = os.waitpid(pid, 0)
still = sorted(glob.glob(os.path.join(arena.SHM_DIR, "stager-arena-*")))
locked = []
for path in still:  # the parent's lock must survive the child (no LOCK_UN on the shared description)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked.append(False)
    except OSError as exc:
        locked.append(exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN))
    finally:
        os.close(fd)
try:
    loaded = pickle.loads(ForkingPickler.dumps(out))  # what a process-based writer does
    read_back = torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    error = ""
except Exception as exc:
    read_back, error = False, f"{type(exc).__name__}: {exc}"
del out
stager.close()
del stager
gc.collect()
left = sorted(glob.glob(os.path.join(arena.SHM_DIR, "*")))
print(json.dumps({"files": files, "still": still, "locked": locked, "read_back": read_back,
                  "error": error, "child_status": status, "left": left}))
"""


@pytest.mark.parametrize("mode", ["exit", "drop", "sigterm"])
def test_a_forked_child_leaves_its_parents_arena_files_alone(mode: str) -> None:
    with shm_dir() as d:
        done = run(FORK_SCRIPT, d, mode)
        assert done.returncode == 0, done.stderr[-3000:]
        r = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(r["files"]) == 1
        if mode == "sigterm":
            assert os.WIFSIGNALED(r["child_status"]) and os.WTERMSIG(r["child_status"]) == 15
        else:
            assert os.WIFEXITED(r["child_status"]) and os.WEXITSTATUS(r["child_status"]) == 0
        assert r["still"] == r["files"]  # the child removed nothing
        assert r["locked"] == [True]  # and the parent still holds its lock
        assert r["read_back"], r["error"]  # a writer process can still map the staged dict
        assert r["left"] == []  # the parent removes its own file when it is done
        assert os.listdir(d) == []


def test_a_child_dropping_a_pinned_arena_neither_unregisters_nor_unmaps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU stand-in for a pinned arena in a forked child: CUDA is not touched, the mapping
    (which the driver may have kept out of the child) is not unmapped, the file is not removed."""

    def no_cuda() -> None:
        raise AssertionError("cudart called in a forked child")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    with shm_dir() as d:
        path = os.path.join(d, "stager-arena-1-fake")
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        mm = mmap.mmap(-1, 4096)
        arena_mod._release(mm, 0, 4096, True, path, 0, owner_pid=os.getpid() + 1)
        assert not mm.closed and os.path.exists(path)
        mm.close()
        os.unlink(path)
