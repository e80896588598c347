"""Checkpoint I/O of the training handle: the saved layout, loading, and the DCP writes.

Saved layout (:func:`checkpoint_layout`): ``{"model": model.state_dict(), "optim":
optimizer.state_dict()}``, the same keys and structure, so a checkpoint loads with ``dcp.load``
into a fresh model's and optimizer's state dicts (:func:`load_checkpoint` does that, creating the
optimizer's lazy state first).

Writes (:class:`CheckpointWrites`): each staged copy goes to ``dcp.async_save`` through a
:class:`~stager.integrity.writer.ChecksumWriter`; two checkpoints to one path never write at once
(the later one is written when the earlier write has finished), and a failure is kept, its
frames dropped so that the staged dict they hold is released, until the caller is told.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch

from stager import nvtx
from stager.errors import CheckpointWriteError
from stager.stats import StageStats
from stager.threads import worker_pool

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future as TorchFuture

    from stager.integrity import IntegrityReport
    from stager.integrity.writer import ChecksumWriter

__all__ = ["CheckpointRecord", "CheckpointWrites", "checkpoint_layout", "dcp_writer", "load_checkpoint"]

log = logging.getLogger("stager")

_Dict = dict[str, Any]
_Staged = Union[_Dict, "Future[_Dict]"]
"""A staged dict, or a ``Future`` of it that completes once its device copies have."""


@dataclass
class CheckpointRecord:
    """One ``checkpoint()`` call, in ``WrapHandle.records``."""

    path: str
    blocked_s: float = 0.0
    """How long ``checkpoint()`` kept the training loop waiting."""
    stats: StageStats | None = None
    """The stager's statistics for this stage."""
    write_s: float | None = None
    """From ``checkpoint()`` returning to the write finishing (``None`` while in flight)."""
    error: BaseException | None = field(default=None, repr=False)


def checkpoint_layout(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, keep_vars: bool = False
) -> dict[str, Any]:
    """The state dict a checkpoint is saved from and loads into: ``{"model": ..., "optim": ...}``.

    ``keep_vars`` is ``model.state_dict``'s (the parameters themselves, not detached tensors).
    """
    state: dict[str, Any] = {"model": model.state_dict(keep_vars=keep_vars)}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    return state


def _checkpoint_optim_entries(path: str) -> set[tuple[int, str]]:
    """``(parameter index, state key)`` of every optimizer state entry a checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    entries: set[tuple[int, str]] = set()
    for fqn in FileSystemReader(path).read_metadata().state_dict_metadata:
        parts = fqn.split(".", 3)
        if len(parts) == 4 and parts[0] == "optim" and parts[1] == "state" and parts[2].isdigit():
            entries.add((int(parts[2]), parts[3].split(".", 1)[0]))
    return entries


def _init_optimizer_state(optimizer: torch.optim.Optimizer, indices: set[int]) -> None:
    """Create an optimizer's lazily created state for the parameters (by ``state_dict`` index) in
    ``indices`` that have none yet, with one zero-gradient, zero-lr step.

    A fresh optimizer has no state, so ``dcp.load`` into its ``state_dict()`` would find nothing
    to fill. Only those parameters get a (zero) gradient for the step; every parameter's gradient
    and every group's lr are put back afterwards, and the parameters are left unchanged (zero lr;
    decoupled weight decay scales by ``1 - lr*wd``).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for i, p in enumerate(params) if i in indices and not optimizer.state.get(p)]
    if not missing:
        return
    grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0
        if "closure" in inspect.signature(optimizer.step).parameters:
            optimizer.step(lambda: torch.zeros(()))  # LBFGS needs one; others accept it
        else:
            optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    no_dist: bool = True,
) -> IntegrityReport:
    """Load a checkpoint written by :meth:`WrapHandle.checkpoint` into ``model`` (and ``optimizer``).

    ``dcp.load`` into :func:`checkpoint_layout` of both, then ``load_state_dict`` on both. The
    optimizer's lazy state is first created for exactly the parameters the checkpoint has state
    for (a parameter that never had a gradient has none).

    Every tensor loaded on this rank is verified against the checkpoint's checksums, when it has
    them, before ``load_state_dict`` (README.md, "Integrity").

    Returns:
        The :class:`~stager.integrity.IntegrityReport` (``has_checksums`` false without them).

    Raises:
        IntegrityError: (a ``ValueError``) a loaded tensor differs from its saved checksum; names
            its key path, the data file and rank that wrote it, the expected and found values.
            ``dcp.load`` has written the model's tensors by then (they hold the bytes read).
        ValueError: the checkpoint holds optimizer state this optimizer's ``state_dict()`` has no
            entry for (another optimizer class, or one whose state is created differently); it
            would otherwise be left unloaded without a word.
    """
    import torch.distributed.checkpoint as dcp

    from stager.integrity import verify_state_dict

    path = os.fspath(path)
    if optimizer is not None:
        wanted = _checkpoint_optim_entries(path)
        _init_optimizer_state(optimizer, {i for i, _ in wanted})
        have = {(i, k) for i, entry in optimizer.state_dict()["state"].items() for k in entry}
        unplaced = sorted(wanted - have)
        if unplaced:
            shown = ", ".join(f"optim.state.{i}.{k}" for i, k in unplaced[:5])
            more = f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else ""
            raise ValueError(
                f"checkpoint {path!r} holds optimizer state that {type(optimizer).__name__}.state_dict() "
                f"has no entry for: {shown}{more}; load it with the optimizer (and settings) it was saved "
                "with"
            )
    state = checkpoint_layout(model, optimizer)
    if optimizer is not None:
        # Ask only for the entries the checkpoint has; load_state_dict then leaves the optimizer
        # with exactly those (state it had for other parameters is dropped, as with torch.load).
        state["optim"]["state"] = {
            i: {k: v for k, v in entry.items() if (i, k) in wanted}
            for i, entry in state["optim"]["state"].items()
            if any((i, k) in wanted for k in entry)
        }
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    report = verify_state_dict(path, state)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return report


def dcp_writer(path: str, nvtx_enabled: bool, checksum: bool | None = None) -> ChecksumWriter:
    """DCP's ``FileSystemWriter`` for ``path``, its write marked as the NVTX range ``stager/write``.

    It is a :class:`~stager.integrity.writer.ChecksumWriter`: the tensors' checksums go into a
    sidecar beside the data when the staged copy carries them (``checksum=None``), always
    (``True``: what has none is hashed on the writer thread) or never (``False``).
    """
    from stager.integrity.writer import ChecksumWriter

    class _Writer(ChecksumWriter):
        def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
            with nvtx.range("stager/write", nvtx_enabled):
                return super().write_data(plan, planner)

    return _Writer(path, checksum=checksum)


class _Handoff:
    """An ``AsyncStager`` for ``dcp.async_save`` that hands over an already staged dict.

    ``value`` is the staged dict, or a ``Future`` of it that completes once its device copies
    have (the writer thread waits on it before writing).
    """

    should_synchronize_after_execute = False

    def __init__(self, value: _Staged) -> None:
        self._value: _Staged | None = value

    def stage(self, state_dict: object) -> _Staged | None:
        value, self._value = self._value, None
        return value

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class CheckpointWrites:
    """The writes of one training handle: ``dcp.async_save`` of each staged copy, one at a time
    per path and in order, with every failure kept until :meth:`raise_failure` reports it."""

    def __init__(self, *, no_dist: bool, nvtx_enabled: bool) -> None:
        self._no_dist = no_dist
        self._nvtx = nvtx_enabled
        self._lock = threading.Lock()
        self._inflight: list[Future] = []  # every checkpoint's result not yet seen done
        self._errors: list[tuple[str, BaseException, str]] = []
        self._uploads: dict[str, Future] = {}  # the newest write in flight to each path
        self._deferred: ThreadPoolExecutor | None = None

    def track(self, result: Future) -> None:
        """Count ``result`` (a checkpoint's ``Future``) among those :meth:`wait` waits for."""
        with self._lock:
            self._inflight.append(result)

    def write(self, record: CheckpointRecord, result: Future, staged: _Dict, handoff: _Staged) -> None:
        """Write ``staged`` (its bytes final once ``handoff`` resolves) to ``record.path``, after
        the write to that path in flight, if any; settle ``result`` when it is done."""
        # The newest checkpoint to a path is registered before its write starts, so the next one
        # to the same path waits for this one, in order.
        with self._lock:
            previous = self._uploads.get(record.path)
            self._uploads[record.path] = result
        if previous is not None and not previous.done():
            if self._deferred is None:
                self._deferred = worker_pool(1, "stager-deferred-write")
            self._deferred.submit(self._save_after, previous, record, result, staged, handoff)
        else:
            self._save(record, result, staged, handoff)

    def _save_after(
        self, previous: Future, record: CheckpointRecord, result: Future, staged: _Dict, handoff: _Staged
    ) -> None:
        wait_futures([previous])  # never two writers on one file
        self._save(record, result, staged, handoff)

    def _save(self, record: CheckpointRecord, result: Future, staged: _Dict, handoff: _Staged) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            response = dcp.async_save(
                staged,
                storage_writer=dcp_writer(record.path, self._nvtx),
                async_stager=_Handoff(handoff),
                no_dist=self._no_dist,
            )
        except BaseException as exc:
            self.failed(record, result, exc, "writing")
            if not isinstance(exc, Exception):
                raise
            return
        upload: Future = getattr(response, "upload_completion", response)
        del handoff, response, staged
        submitted = time.perf_counter()
        upload.add_done_callback(lambda f: self._write_done(f, record, result, submitted))

    def _write_done(self, fut: Future, record: CheckpointRecord, result: Future, submitted: float) -> None:
        record.write_s = time.perf_counter() - submitted
        exc = CancelledError("the write was cancelled") if fut.cancelled() else fut.exception()
        if exc is not None:
            self.failed(record, result, exc, "writing")
        else:
            with self._lock:
                if self._uploads.get(record.path) is result:
                    del self._uploads[record.path]
            _settle(result, None, fut.result())

    def failed(self, record: CheckpointRecord, result: Future, exc: BaseException, phase: str) -> None:
        """Keep ``exc`` (of ``phase``: ``"staging"`` or ``"writing"``) for :meth:`raise_failure`,
        log it and fail ``result``; its frames, which hold the staged dict, are dropped."""
        _drop_frames(exc)
        record.error = exc
        with self._lock:
            self._errors.append((record.path, exc, phase))
            if self._uploads.get(record.path) is result:
                del self._uploads[record.path]
        log.error("stager: %s checkpoint %s failed: %s: %s", phase, record.path, type(exc).__name__, exc)
        _settle(result, exc)

    def wait(self) -> None:
        """Wait for every tracked checkpoint (failures are kept, not raised)."""
        while True:
            with self._lock:
                inflight = list(self._inflight)
            if not inflight:
                break
            wait_futures(inflight)
            with self._lock:
                self._inflight = [f for f in self._inflight if not f.done()]

    def raise_failure(self) -> None:
        """Raise :class:`CheckpointWriteError` for the first kept failure (and forget them all)."""
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        path, exc, phase = errors[0]
        more = f" (and {len(errors) - 1} more failed checkpoint(s))" if len(errors) > 1 else ""
        hint = (
            "check that the path is writable and has space, then checkpoint again"
            if phase == "writing"
            else "fix the cause named above, then checkpoint again"
        )
        raise CheckpointWriteError(
            f"{phase} checkpoint {path!r} failed in the background: {type(exc).__name__}: {exc}{more}; {hint}"
        ) from exc

    def close(self) -> None:
        """Stop the thread that runs the writes held back behind others (waits for it)."""
        if self._deferred is not None:
            self._deferred.shutdown(wait=True)
            self._deferred = None


def _settle(fut: Future, exc: BaseException | None, value: object = None) -> None:
    """Resolve ``fut`` once (a later call is ignored)."""
    if fut.done():
        return
    with contextlib.suppress(InvalidStateError):
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


def _drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc``, its causes and (DCP's ``CheckpointException``) its
    per-rank failures. A write's traceback holds DCP's frames, which hold the staged dict."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                todo += list(value) if isinstance(value, tuple) else [value]
