"""A stager whose thread pools ran in the parent works in a forked child instead of hanging."""

from __future__ import annotations

import pytest
from _proc import run

SCRIPT = r"""
import os, signal, sys
import torch
from stager import GraphStager

async_staging = sys.argv[1] == "async"
# Enough CPU regions to split the copy over the copy pool's threads.
state = {f"t{i}": torch.full((4,), float(i)) for i in range(4096)}
stager = GraphStager(async_staging=async_staging)
out = stager.stage(state)
out = out.result(timeout=30) if async_staging else out
assert torch.equal(out["t7"], state["t7"])
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hung child ends itself: the test's time limit only reaches the parent
    try:
        for v in state.values():
            v.add_(1)
        got = stager.stage(state)
        got = got.result(timeout=30) if async_staging else got
        ok = all(torch.equal(got[k], v) for k, v in state.items())
        stager.close()
        os._exit(0 if ok else 3)
    except BaseException as exc:
        print(repr(exc), file=sys.stderr, flush=True)
        os._exit(4)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
stager.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_can_stage_with_a_stager_used_in_the_parent(mode: str) -> None:
    # Before: the child waited for ever on the parent's executor and copy-pool threads.
    proc = run(SCRIPT, mode, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "child 0" in proc.stdout, proc.stderr[-2000:]
