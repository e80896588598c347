"""The stager's threads run torch's CPU kernels on one thread each; the caller's keep theirs.

Where torch runs its CPU kernels on OpenMP, a thread that ran a parallel kernel keeps a team of
OpenMP workers for its whole life, and more OpenMP threads than CPUs make every kernel of the
training thread pay a wake-up. The checks run in a child process (a fresh thread picture).
"""

from __future__ import annotations

import json

import pytest
import torch
from _proc import run

from stager.threads import _omp_set_num_threads, one_torch_thread, worker_pool

needs_openmp = pytest.mark.skipif(
    _omp_set_num_threads() is None or torch.get_num_threads() < 2,
    reason="torch here runs its CPU kernels without an OpenMP runtime, or on one thread",
)

_CHILD = """
import json, os, tempfile, threading, torch, stager
from torch import nn

def tasks():
    return len(os.listdir("/proc/self/task"))

big = torch.randn(8_000_000)  # large enough for a parallel copy
model, opt = nn.Linear(64, 64), None
main_threads = torch.get_num_threads()
big.clone()  # the main thread's OpenMP team exists before counting
before = tasks()
s = stager.GraphStager(async_staging=True)
s.stage({"big": big, "w": model.weight}).result()
staging = s._executor.submit(torch.get_num_threads).result()
after_stage = tasks()
ours = sum(t.name.startswith("stager") for t in threading.enumerate())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
h = stager.wrap(model, opt)
h.checkpoint(os.path.join(tempfile.mkdtemp(), "c")).result()
handle = h._worker.submit(torch.get_num_threads).result()
print(json.dumps({"main": [main_threads, torch.get_num_threads()], "staging": staging, "handle": handle,
                  "new_threads": after_stage - before, "ours": ours}))
h.close(); s.close()
"""


@needs_openmp
def test_staging_and_handle_threads_run_torch_on_one_thread_and_start_no_team() -> None:
    out = run(_CHILD)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["main"][0] == got["main"][1] > 1  # the caller's thread count is untouched
    assert got["staging"] == 1 and got["handle"] == 1
    # the stager's own threads (staging, copy pool) and no OpenMP workers of theirs
    assert got["new_threads"] == got["ours"] >= 1


@needs_openmp
def test_worker_pool_threads_are_single_threaded_for_torch() -> None:
    with worker_pool(2, "test-pool") as pool:
        counts = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
    assert counts == {1} and torch.get_num_threads() > 1


def test_one_torch_thread_is_harmless_without_openmp(monkeypatch: pytest.MonkeyPatch) -> None:
    import stager.threads as threads

    monkeypatch.setattr(threads, "_omp_set_num_threads", lambda: None)
    with worker_pool(1, "test-no-omp") as pool:
        assert pool.submit(lambda: (one_torch_thread(), torch.ones(3).sum().item())[1]).result() == 3.0
