"""A pool of real gloo ranks on this machine, started once per world size and shared by the tests.

``cluster(world)`` spawns ``world`` processes (``torch.multiprocessing`` spawn context, loopback
``MASTER_ADDR``, a free port), each with ``torch.distributed`` initialised on gloo. ``run(fn, *args)``
calls ``fn(rank, world, *args)`` on every rank (``fn`` must be a module-level function, pickled by
name) and returns the per-rank results, or fails with every failing rank's traceback. Spawning and
importing torch costs seconds per process on a small machine, so the pools live for the whole
session; a test that may leave a group with unmatched messages uses a group of its own.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch.multiprocessing as mp

__all__ = ["Cluster", "cluster", "pools_fixture", "shutdown_all"]

_START_TIMEOUT_S = 120.0
_CALL_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox: Any, outbox: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    for name in [n for n in os.environ if n.startswith("STAGER_")]:
        del os.environ[name]
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        outbox.put((rank, True, "ready"))
    except BaseException:
        outbox.put((rank, False, traceback.format_exc()))
        return
    while True:
        msg = inbox.get()
        if msg is None:
            break
        fn, args = msg
        try:
            outbox.put((rank, True, fn(rank, world, *args)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))
    # DCP's process-based writer keeps a daemon per rank; ask it to stop before leaving.
    import sys

    executor = sys.modules.get("torch.distributed.checkpoint._async_process_executor")
    if executor is not None and executor._CHECKPOINT_PROCESS is not None:
        executor._CHECKPOINT_PROCESS = None  # its __del__ asks the daemon to terminate and joins it
    outbox.close()
    outbox.join_thread()
    # Skip the interpreter's slow teardown (and gloo groups a test may have left with unmatched
    # messages): nothing is left to flush.
    os._exit(0)


class Cluster:
    """``world`` gloo ranks waiting for functions to run."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), name=f"rank{r}")
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._collect(_START_TIMEOUT_S, "start")

    def _collect(self, timeout: float, what: str) -> list[Any]:
        results: dict[int, tuple[bool, Any]] = {}
        while len(results) < self.world:
            try:
                rank, ok, value = self.outbox.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(self.world)) - set(results))
                self.close(kill=True)
                raise TimeoutError(
                    f"ranks {missing} of {self.world} did not finish {what} within {timeout:g} s"
                ) from None
            results[rank] = (ok, value)
        failed = [(r, v) for r, (ok, v) in sorted(results.items()) if not ok]
        if failed:
            raise AssertionError(
                f"{what} failed on rank(s) {[r for r, _ in failed]}:\n"
                + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failed)
            )
        return [results[r][1] for r in range(self.world)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = _CALL_TIMEOUT_S) -> list[Any]:
        """``fn(rank, world, *args)`` on every rank; the results in rank order."""
        for box in self.inboxes:
            box.put((fn, args))
        return self._collect(timeout, getattr(fn, "__name__", "call"))

    def close(self, kill: bool = False) -> None:
        if not kill:
            for box in self.inboxes:
                box.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_clusters: dict[int, Cluster] = {}


def cluster(world: int) -> Cluster:
    """The session's pool of ``world`` ranks (started on first use)."""
    c = _clusters.get(world)
    if c is None or not all(p.is_alive() for p in c.procs):
        c = _clusters[world] = Cluster(world)
    return c


def shutdown_all() -> None:
    while _clusters:
        _, c = _clusters.popitem()
        c.close()


def pools_fixture() -> Callable[[], Iterator[None]]:
    """A session fixture, autouse in the test module that binds it, closing the pools at the end.

    Usage: ``_pools = pools_fixture()`` at module level. pytest is imported here, not at the top,
    so that the spawned ranks (which import this module) do not import it.
    """
    import pytest

    @pytest.fixture(scope="session", autouse=True)
    def _pools() -> Iterator[None]:
        yield
        shutdown_all()

    return _pools


atexit.register(shutdown_all)
