"""``wrap(model, optimizer)``: asynchronous checkpoints and in-memory rollback inside a training loop.

How a checkpoint runs, what it waits for, and how failures surface: README.md, "Training loop
(``wrap``)". The live dict it stages is :mod:`stager.live`; the saved layout, loading and the DCP
writes are :mod:`stager.checkpoint`. On a GPU the background thread queues the copy with
``GraphStager.stage_nowait`` behind the events recorded at the call; the optimizer step and
buffer-updating forwards wait on the CPU until it is queued, then on the device (``wait_event``).
``handle.restore()`` rolls back through :mod:`stager.restore`.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import torch

from stager.checkpoint import CheckpointRecord, CheckpointWrites
from stager.config import StagerConfig
from stager.errors import CheckpointWriteError, StagerClosedError
from stager.live import LiveState, Snapshot
from stager.stager import GraphStager
from stager.stats import StageStats
from stager.threads import worker_pool
from stager.tree import tensors_in

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from stager.device import PendingCopy
    from stager.pipeline import Marks

__all__ = ["CheckpointRecord", "CheckpointWriteError", "WrapHandle", "wrap"]

_WRAP_HINT = "Call handle.fence() before writing the parameters outside optimizer.step()."


def _buffer_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with persistent buffers of their own (a forward may update them in place)."""
    return [
        m for m in model.modules()
        if any(b is not None and n not in m._non_persistent_buffers_set for n, b in m._buffers.items())
    ]


def _cuda_devices(state: dict[str, Any]) -> list[torch.device]:
    return sorted({t.device for t in tensors_in(state) if t.device.type == "cuda"}, key=str)


class WrapHandle:
    """Checkpoints and rollback for one model and optimizer; create it with :func:`wrap`.

    Attributes:
        records: one :class:`CheckpointRecord` per ``checkpoint()`` call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        stager: GraphStager | None = None,
        config: StagerConfig | None = None,
        no_dist: bool | None = None,
        **overrides: Any,
    ) -> None:
        if stager is not None and (config is not None or overrides):
            raise ValueError("pass either stager= or config/overrides to wrap(), not both")
        self._own_stager = stager is None
        if stager is None:
            if config is None:
                config = StagerConfig.resolve(**overrides)
            elif overrides:
                config = config.replace(**overrides)
            if config.async_staging:
                # wrap overlaps on the device (side stream) instead: stage() must return the copy.
                config = config.replace(async_staging=False)
            stager = GraphStager(config)
        self.stager = stager
        self.model = model
        self.optimizer = optimizer
        if no_dist is None:
            no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self._writes = CheckpointWrites(no_dist=no_dist, nvtx_enabled=bool(stager.config.nvtx))
        self._live = LiveState(model, optimizer)
        self._closed = False
        self._pending: PendingCopy | None = None
        self._events: tuple[torch.cuda.Event, ...] = ()
        self._staging: _Ticket | None = None  # the newest checkpoint whose stage may not be done
        self._last_staged: dict[str, Any] | None = None
        self._lost_restore_point: str | None = None
        self._stats: StageStats | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._waiter: ThreadPoolExecutor | None = None
        self.records: list[CheckpointRecord] = []
        self._devices = _cuda_devices(self._live.current())
        self._hooks: list[RemovableHandle] = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._device_fence_hook))
        for m in _buffer_owners(model):
            self._hooks.append(m.register_forward_pre_hook(self._device_fence_hook))

    @property
    def stats(self) -> StageStats | None:
        """The :class:`StageStats` of the most recent ``checkpoint()`` or ``restore()``."""
        return self._stats

    @property
    def live_rebuilds(self) -> int:
        """How many times the live state dict was built (first checkpoint and each change)."""
        return self._live.rebuilds

    def checkpoint(self, path: str | os.PathLike[str]) -> Future:
        """Stage the live state and hand the copy to ``dcp.async_save`` for writing to ``path``.

        Returns at once with a ``Future`` of the write (DCP's metadata): the live state is read,
        staged and handed to DCP on the handle's background thread. The next optimizer step (and
        forward of a module with persistent buffers) waits for the copy (README.md, "Training loop").

        Raises:
            CheckpointWriteError: an earlier checkpoint failed in the background (its stage or
                its write).
            StagerClosedError: the handle was closed.
        """
        self._check_open()
        self._writes.raise_failure()
        t0 = time.perf_counter()
        path = os.fspath(path)
        stager = self.stager
        marks = stager.caller_marks() if self._devices and isinstance(stager, GraphStager) else None
        snapshot = self._live.snapshot()  # lr and extra state as of this call
        ticket = _Ticket(path)
        record = CheckpointRecord(path=path)
        self.records.append(record)
        self._writes.track(ticket.result)
        self._staging = ticket
        if self._worker is None:
            self._worker = worker_pool(1, "stager-checkpoint")
        self._worker.submit(self._run_checkpoint, ticket, record, marks, snapshot)
        record.blocked_s = time.perf_counter() - t0
        return ticket.result

    def _run_checkpoint(
        self, ticket: _Ticket, record: CheckpointRecord, marks: Marks | None, snapshot: Snapshot
    ) -> None:
        """The background half of :meth:`checkpoint`: read, stage, hand to DCP."""
        try:
            state = self._live.current(snapshot)
            # The previous staged copy is released here, so the lease policy sees only the
            # writer's hold (with one arena, holding it would keep this stage waiting for good).
            self._last_staged = None
            staged, pending = self._stage(state, marks)
        except BaseException as exc:
            self._lost_restore_point = f"{type(exc).__name__}: {exc}"
            ticket.staged.set()
            self._writes.failed(record, ticket.result, exc, "staging")
            if not isinstance(exc, Exception):
                raise
            return
        self._lost_restore_point = None
        record.stats = self.stager.last_stats
        self._stats = record.stats
        events = tuple(pending.events) if pending is not None else ()
        handoff: dict[str, Any] | Future[dict[str, Any]] = staged
        if events:
            # Later copies queue behind earlier ones on the side stream: the newest covers all.
            self._pending = pending
            self._events = events
            if self._waiter is None:
                self._waiter = worker_pool(1, "stager-wrap")
            handoff = self._waiter.submit(_wait_then_return, pending, staged)
        self._last_staged = staged
        ticket.staged.set()  # the live tensors may change now (after the device fence)
        del pending
        self._writes.write(record, ticket.result, staged, handoff)

    def restore(self) -> StageStats:
        """Copy the last staged copy back into the live parameters, buffers and optimizer state.

        In place and bit-exact (see :mod:`stager.restore`); the optimizer's hyperparameters and
        non-tensor state, and every module's extra state (``set_extra_state``), are set back too.
        Waits for the copy if it is still being staged.

        Raises:
            RuntimeError: nothing has been staged yet.
            RestoreMismatchError: the model or optimizer state no longer has the staged structure.
        """
        self._check_open()
        self._wait_staging()
        if self._last_staged is None:
            if self._lost_restore_point is not None:
                raise RuntimeError(
                    "restore(): the last checkpoint() failed while staging "
                    f"({self._lost_restore_point[:300]}), and the earlier copy was released to make room "
                    "for it; fix the cause and call checkpoint() again"
                )
            raise RuntimeError("restore(): no checkpoint has been staged yet; call checkpoint() first")
        state = self._live.current()
        stats = self.stager.restore(self._last_staged, state)
        self._live.restore_groups(self._last_staged)
        self._live.restore_extra_state(self._last_staged)
        self._stats = stats
        return stats

    def fence(self) -> None:
        """Make the current CUDA stream wait (on the device) for a checkpoint still being staged.

        The optimizer step and forwards that update buffers do this on their own; call it before
        writing the parameters any other way. A no-op on the CPU.
        """
        ticket = self._staging
        if ticket is not None:
            ticket.staged.wait()  # CPU: the copy is done; GPU: it is queued, and its events known
            if self._staging is ticket:
                self._staging = None
        events, self._events = self._events, ()
        for device in self._devices:
            stream = torch.cuda.current_stream(device)
            for e in events:
                stream.wait_event(e)

    def wait(self) -> None:
        """Wait for every staging and write in flight; raise the first background error."""
        self._wait_staging()
        self._writes.wait()
        self._writes.raise_failure()

    def close(self) -> None:
        """Wait for everything in flight, remove the hooks and close the stager (when owned).

        Raises :class:`CheckpointWriteError` if a write failed (after cleaning up).
        """
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._last_staged = None
            if self._worker is not None:
                self._worker.shutdown(wait=True)
            self._writes.close()
            if self._waiter is not None:
                self._waiter.shutdown(wait=True)
            self._worker = self._waiter = None
            if self._own_stager:
                self.stager.close()

    def __enter__(self) -> WrapHandle:
        """``with stager.wrap(model, opt) as handle:`` closes the handle on the way out."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the handle (see :meth:`close`)."""
        self.close()

    def __repr__(self) -> str:
        where = ", ".join(map(str, self._devices)) or "cpu"
        return (
            f"WrapHandle({type(self.model).__name__} on {where}, checkpoints={len(self.records)}, "
            f"closed={self._closed})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StagerClosedError("this WrapHandle was closed; call stager.wrap() again")

    def _stage(
        self, state: dict[str, Any], marks: Marks | None = None
    ) -> tuple[dict[str, Any], PendingCopy | None]:
        """Stage ``state``; return the staged dict and the device copies still in flight (or None)."""
        if isinstance(self.stager, GraphStager):
            return self.stager.stage_nowait(state, marks, check_versions=_WRAP_HINT)
        nowait: Callable[[dict[str, Any]], tuple[dict[str, Any], PendingCopy | None]] | None = getattr(
            self.stager, "stage_nowait", None
        )
        if self._devices and callable(nowait):
            return nowait(state)
        staged = self.stager.stage(state)
        if isinstance(staged, Future):  # a user-supplied stager with async staging
            staged = staged.result()
        return staged, None

    def _wait_staging(self) -> None:
        ticket = self._staging
        if ticket is not None:
            ticket.staged.wait()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()
            self._events = ()

    def _device_fence_hook(self, *args: Any, **kwargs: Any) -> None:
        if self._staging is not None or self._events:
            if self._devices and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "stager.wrap: the optimizer step (or a forward that updates buffers) is being "
                    "captured in a CUDA graph while a checkpoint is being staged; its replays would "
                    "not wait for the copy. Call handle.fence() before capturing, and do not take "
                    "checkpoints between replays of a captured step"
                )
            self.fence()


class _Ticket:
    """One ``checkpoint()`` call as the background thread carries it."""

    __slots__ = ("path", "staged", "result")

    def __init__(self, path: str) -> None:
        self.path = path
        self.staged = threading.Event()
        """Set once the live tensors may change: copied (CPU) or queued behind known events (GPU)."""
        self.result: Future = Future()
        """What ``checkpoint()`` returned: DCP's metadata once written, or the failure."""


def _wait_then_return(pending: PendingCopy, staged: dict[str, Any]) -> dict[str, Any]:
    pending.wait()
    return staged


def wrap(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    stager: GraphStager | None = None,
    config: StagerConfig | None = None,
    no_dist: bool | None = None,
    **overrides: Any,
) -> WrapHandle:
    """Asynchronous checkpoints and in-memory rollback for ``model`` and ``optimizer``.

    Args:
        model: the module whose parameters and buffers are checkpointed (``model.state_dict()``).
        optimizer: its optimizer (``optimizer.state_dict()``); a step pre-hook is registered on it.
        stager: a :class:`GraphStager` to use (not closed by the handle); by default one is made
            from ``config`` and ``overrides`` and closed with the handle.
        config: a :class:`StagerConfig`; by default resolved from the profile and ``STAGER_*``.
        no_dist: passed to ``dcp.async_save``; by default true unless ``torch.distributed`` is
            initialized.
        **overrides: ``StagerConfig`` fields (``lease_policy="wait"``, ``nvtx=True``, ...).

    Returns:
        A :class:`WrapHandle`: ``checkpoint(path)``, ``restore()``, ``wait()``, ``close()``,
        ``stats`` and ``records``.
    """
    return WrapHandle(model, optimizer, stager=stager, config=config, no_dist=no_dist, **overrides)
