"""``wrap(model, optimizer)``: asynchronous checkpoints and in-memory rollback inside a training loop.

::

    handle = stager.wrap(model, optimizer)
    for step, batch in enumerate(loader):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()            # waits (on the device) for a checkpoint still being staged
        optimizer.zero_grad()
        if step % 500 == 0:
            handle.checkpoint(f"ckpt/{step}")   # stages, hands the copy to dcp.async_save, returns
    handle.close()                  # waits for the writes; raises if one failed

Saved layout: ``{"model": model.state_dict(), "optim": optimizer.state_dict()}``, the same keys
and structure, so a checkpoint loads with ``dcp.load`` into a fresh model's and optimizer's state
dicts (:func:`load_checkpoint` does that, creating the optimizer's lazy state first).

How a checkpoint runs:

* The state dict handed to the stager is built once from the live objects (the model's parameters
  and buffers with ``keep_vars=True``, the optimizer's own per-parameter state dicts) and handed
  over again on every checkpoint: no ``state_dict()`` round trip, so the stager's plan (and, on a
  GPU, its captured graph) is replayed. It is rebuilt when a module, parameter, persistent buffer,
  per-parameter optimizer state dict or param group was added, removed or replaced (see
  :class:`_LiveState`); hyperparameters (``lr``...) and ``get_extra_state()`` are read again on
  every checkpoint.
* ``checkpoint()`` only records the caller's CUDA streams (an event on each) and hands the rest
  to the handle's background thread: the identity pass over the live state, the stage and the
  ``dcp.async_save`` call. It returns at once with a ``Future`` of the write.
* CPU: the background thread copies the live tensors while the next forward and backward run.
  An optimizer step pre-hook, and forward pre-hooks on modules with persistent buffers (which a
  forward may update in place), wait until that copy is complete before anything live changes.
* GPU: the background thread queues the copy on the stager's side stream
  (``GraphStager.stage_nowait``), behind the events recorded at the call. The same hooks wait on
  the CPU only until the copy is queued, then make the compute stream wait for it on the device
  (``wait_event``). The writer thread waits for the copy before writing. Code that writes the
  parameters outside ``optimizer.step()`` should call :meth:`WrapHandle.fence` first.
* Two checkpoints to one path never write at once: the later one is staged at once and written
  when the earlier write has finished.
* A checkpoint while an earlier one is still being written follows the stager's lease policy
  (``STAGER_LEASE_POLICY``): take another host arena, or wait for the held one.
* A stage or write that fails in the background raises :class:`CheckpointWriteError` from the
  next ``checkpoint()`` or from ``wait()``/``close()`` (and fails the returned ``Future``);
  never silently.

``handle.restore()`` copies the last staged copy back into the live tensors (see
:mod:`stager.restore`), so a run can roll back without reading storage.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import os
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from stager import nvtx
from stager.config import StagerConfig
from stager.errors import CheckpointWriteError, StagerClosedError
from stager.stager import GraphStager
from stager.stats import StageStats
from stager.tree import holds_tensor, tensors_in

if TYPE_CHECKING:
    from stager.integrity import IntegrityReport

__all__ = ["CheckpointWriteError", "CheckpointRecord", "WrapHandle", "wrap", "checkpoint_layout", "load_checkpoint"]

log = logging.getLogger("stager")

_WRAP_HINT = "Call handle.fence() before writing the parameters outside optimizer.step()."
_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


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


def checkpoint_layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The state dict a checkpoint is saved from and loads into: ``{"model": ..., "optim": ...}``."""
    state: dict[str, Any] = {"model": model.state_dict()}
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
    import inspect

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

    ``dcp.load`` into ``{"model": model.state_dict(), "optim": optimizer.state_dict()}``, then
    ``load_state_dict`` on both. The optimizer's lazy state is first created for exactly the
    parameters the checkpoint has state for (a parameter that never had a gradient has none).

    When the checkpoint carries checksums (see :mod:`stager.integrity`), every tensor loaded on
    this rank is verified against them before ``load_state_dict``; saved chunks this rank does
    not hold whole (a resharded load) or loaded into another dtype are reported as unverifiable.
    A checkpoint without checksums loads as before.

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
                f"checkpoint {path!r} holds optimizer state that {type(optimizer).__name__}.state_dict() has no "
                f"entry for: {shown}{more}; load it with the optimizer (and settings) it was saved with"
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


# ------------------------------------------------------------------------------------ live state


class _LiveState:
    """The nested dict of live tensors handed to the stager: built once, rebuilt when stale.

    Stale means any of: a module added, removed or replaced anywhere in the model; a parameter or
    persistent buffer object replaced; the optimizer's state created, cleared or given new
    per-parameter dicts (``load_state_dict``, ``state.clear()``, lazy creation); a param group
    added. Checking costs one pass over the modules, their parameters and buffers, and the
    optimizer's per-parameter dicts (identity comparisons, no tensor calls).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.state: dict[str, Any] | None = None
        self.rebuilds = 0
        """How many times the dict was (re)built."""
        self._objects: list[Any] = []
        self._groups: list[dict[str, Any]] = []
        self._extra: list[tuple[str, torch.nn.Module]] = []

    def _live_objects(self) -> list[Any]:
        """Everything whose identity the built dict depends on, in a fixed order."""
        objects: list[Any] = []
        for m in self.model.modules():
            objects.append(m)
            objects.extend(m._parameters.values())
            skip = m._non_persistent_buffers_set
            objects.extend(b for n, b in m._buffers.items() if n not in skip)
        opt = self.optimizer
        if opt is not None:
            objects.append(opt.state)
            objects.extend(opt.state)  # parameters with state, in order
            objects.extend(opt.state.values())  # their per-parameter dicts
            objects.extend(opt.param_groups)
        return objects

    def stale(self) -> bool:
        if self.state is None:
            return True
        objects = self._live_objects()
        return len(objects) != len(self._objects) or not all(map(operator.is_, objects, self._objects))

    def build(self) -> None:
        model, opt = self.model, self.optimizer
        state: dict[str, Any] = {"model": model.state_dict(keep_vars=True)}
        if opt is not None:
            # The "state" values are the optimizer's own per-parameter dicts: live tensors.
            osd = opt.state_dict()
            state["optim"] = osd
            self._groups = osd["param_groups"]
        base = torch.nn.Module.get_extra_state
        keyed = (
            (f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE, m)
            for name, m in model.named_modules(remove_duplicate=False)  # as state_dict() names them
        )
        self._extra = [(k, m) for k, m in keyed if type(m).get_extra_state is not base and k in state["model"]]
        self._objects = self._live_objects()
        self.state = state
        self.rebuilds += 1

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[int, Any]]:
        """The small values that may change right after ``checkpoint()`` returns, read on the
        caller's thread: each param group's hyperparameters (``lr``: a scheduler steps next) and
        each known module's ``get_extra_state()`` (by module identity)."""
        groups = (
            [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            if self.optimizer is not None
            else []
        )
        return groups, {id(m): m.get_extra_state() for _, m in self._extra}

    def current(self, snapshot: tuple[list[dict[str, Any]], dict[int, Any]] | None = None) -> dict[str, Any]:
        """The dict to stage now, with the optimizer's hyperparameters and the modules' extra
        state (``get_extra_state()``) refreshed: from ``snapshot`` (see :meth:`snapshot`) where it
        has them, else read now."""
        if self.stale():
            self.build()
        groups, extra = snapshot if snapshot is not None else ([], {})
        if self.optimizer is not None:
            for i, (packed, group) in enumerate(zip(self._groups, self.optimizer.param_groups)):
                source = groups[i] if i < len(groups) else group
                for k, v in source.items():
                    if k != "params":
                        packed[k] = v
        model_state = self.state["model"]  # type: ignore[index]  # built above
        for key, m in self._extra:
            model_state[key] = extra[id(m)] if id(m) in extra else m.get_extra_state()
        state: dict[str, Any] = self.state  # type: ignore[assignment]  # built above
        return state

    def restore_groups(self, staged: dict[str, Any]) -> None:
        """Set the optimizer's non-tensor hyperparameters and non-tensor per-parameter state
        (an ``int`` step, LBFGS's counters) to the staged values."""
        if self.optimizer is None or "optim" not in staged:
            return
        opt = self.optimizer
        for packed, group in zip(staged["optim"].get("param_groups", ()), opt.param_groups):
            for k, v in packed.items():
                if k != "params" and not isinstance(group.get(k), torch.Tensor):
                    group[k] = copy.deepcopy(v)
        params = [p for g in opt.param_groups for p in g["params"]]
        for index, entry in staged["optim"].get("state", {}).items():
            live = opt.state.get(params[index]) if isinstance(index, int) and index < len(params) else None
            if live is None:
                continue
            for k, v in entry.items():
                if not holds_tensor(v) and not holds_tensor(live.get(k)):  # tensors: restored in place
                    live[k] = copy.deepcopy(v)

    def restore_extra_state(self, staged: dict[str, Any]) -> None:
        """Give every module with extra state the staged value (``set_extra_state``)."""
        model_state = staged.get("model", {})
        for key, m in self._extra:
            if key in model_state:
                m.set_extra_state(copy.deepcopy(model_state[key]))


# ------------------------------------------------------------------------------------ plumbing


def _events_of(pending: Any) -> tuple[Any, ...]:
    """The CUDA events that mark the end of a stage's device copies (``PendingCopy.events``)."""
    return () if pending is None else tuple(pending.events)


def _wait_host(pending: Any) -> None:
    """Block the calling thread until ``pending``'s device copies completed."""
    if pending is not None:
        pending.wait()


class _Handoff:
    """An ``AsyncStager`` for ``dcp.async_save`` that hands over an already staged dict.

    ``value`` is the staged dict, or a ``Future`` of it that completes once its device copies
    have (the writer thread waits on it before writing).
    """

    should_synchronize_after_execute = False

    def __init__(self, value: Any) -> None:
        self._value = value

    def stage(self, state_dict: Any) -> Any:
        value, self._value = self._value, None
        return value

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _writer(path: str, nvtx_enabled: bool, checksum: bool | None = None) -> Any:
    """DCP's ``FileSystemWriter`` for ``path``, its write marked as the NVTX range ``stager/write``.

    It is a :class:`~stager.integrity.ChecksumWriter`: the tensors' checksums go into a sidecar
    beside the data when the staged copy carries them (``checksum=None``), always (``True``: what
    has none is hashed on the writer thread) or never (``False``).
    """
    from stager.integrity_writer import ChecksumWriter

    class _Writer(ChecksumWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            with nvtx.range("stager/write", nvtx_enabled):
                return super().write_data(plan, planner)

    return _Writer(path, checksum=checksum)


def _buffer_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with persistent buffers of their own (a forward may update them in place)."""
    owners = []
    for m in model.modules():
        persistent = [n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
        if persistent:
            owners.append(m)
    return owners


def _cuda_devices(state: Any) -> list[torch.device]:
    return sorted({t.device for t in tensors_in(state) if t.device.type == "cuda"}, key=str)


# ------------------------------------------------------------------------------------ the handle


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
        self._nvtx = bool(stager.config.nvtx)
        if no_dist is None:
            no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self._no_dist = no_dist
        self._live = _LiveState(model, optimizer)
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: list[Future] = []
        self._errors: list[tuple[str, BaseException, str]] = []
        self._pending: Any = None
        self._events: tuple[Any, ...] = ()
        self._staging: _Ticket | None = None  # the newest checkpoint whose stage may not be done
        self._uploads: dict[str, Future] = {}  # the newest write in flight to each path
        self._last_staged: Any = None
        self._lost_restore_point: str | None = None
        self._stats: StageStats | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._waiter: ThreadPoolExecutor | None = None
        self._deferred: ThreadPoolExecutor | None = None
        self.records: list[CheckpointRecord] = []
        self._devices = _cuda_devices(self._live.current())
        self._hooks: list[Any] = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._device_fence_hook))
        for m in _buffer_owners(model):
            self._hooks.append(m.register_forward_pre_hook(self._device_fence_hook))

    # ---------------------------------------------------------------- public

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
        forward of a module with persistent buffers) waits for the copy; see the module's
        docstring.

        Raises:
            CheckpointWriteError: an earlier checkpoint failed in the background (its stage or
                its write).
            StagerClosedError: the handle was closed.
        """
        self._check_open()
        self._raise_background()
        t0 = time.perf_counter()
        path = os.fspath(path)
        stager = self.stager
        marks = stager.caller_marks() if self._devices and isinstance(stager, GraphStager) else None
        snapshot = self._live.snapshot()  # lr and extra state as of this call
        ticket = _Ticket(path)
        record = CheckpointRecord(path=path)
        self.records.append(record)
        with self._lock:
            self._inflight.append(ticket.result)
        self._staging = ticket
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager-checkpoint")
        self._worker.submit(self._run_checkpoint, ticket, record, marks, snapshot)
        record.blocked_s = time.perf_counter() - t0
        return ticket.result

    def _run_checkpoint(self, ticket: "_Ticket", record: CheckpointRecord, marks: Any, snapshot: Any) -> None:
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
            self._failed(ticket, record, exc, "staging")
            if not isinstance(exc, Exception):
                raise
            return
        self._lost_restore_point = None
        record.stats = self.stager.last_stats
        self._stats = record.stats
        events = _events_of(pending)
        if events:
            # Later copies queue behind earlier ones on the side stream: the newest covers all.
            self._pending = pending
            self._events = events
            handoff: Any = self._waiter_pool().submit(_wait_then_return, pending, staged)
        else:
            handoff = staged
        self._last_staged = staged
        ticket.staged.set()  # the live tensors may change now (after the device fence)
        del pending
        # One write at a time to a path: the newest checkpoint to it is registered now, before
        # its write starts, so the next one to the same path waits for this one, in order.
        with self._lock:
            previous = self._uploads.get(ticket.path)
            self._uploads[ticket.path] = ticket.result
        if previous is not None and not previous.done():
            if self._deferred is None:
                self._deferred = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager-deferred-write")
            self._deferred.submit(self._save_after, previous, ticket, record, staged, handoff)
        else:
            self._save(ticket, record, staged, handoff)

    def _save_after(
        self, previous: Future, ticket: "_Ticket", record: CheckpointRecord, staged: Any, handoff: Any
    ) -> None:
        wait_futures([previous])  # never two writers on one file
        self._save(ticket, record, staged, handoff)

    def _save(self, ticket: "_Ticket", record: CheckpointRecord, staged: Any, handoff: Any) -> None:
        """``dcp.async_save`` of ``staged`` (its bytes are final once ``handoff`` resolves)."""
        import torch.distributed.checkpoint as dcp

        try:
            response = dcp.async_save(
                staged,
                storage_writer=_writer(ticket.path, self._nvtx),
                async_stager=_Handoff(handoff),
                no_dist=self._no_dist,
            )
        except BaseException as exc:
            self._failed(ticket, record, exc, "writing")
            if not isinstance(exc, Exception):
                raise
            return
        upload: Future = getattr(response, "upload_completion", response)
        del handoff, response, staged
        submitted = time.perf_counter()
        upload.add_done_callback(lambda f: self._write_done(f, record, submitted, ticket))

    def _failed(self, ticket: "_Ticket", record: CheckpointRecord, exc: BaseException, phase: str) -> None:
        _drop_frames(exc)
        record.error = exc
        with self._lock:
            self._errors.append((ticket.path, exc, phase))
            if self._uploads.get(ticket.path) is ticket.result:
                del self._uploads[ticket.path]
        log.error("stager: %s checkpoint %s failed: %s: %s", phase, ticket.path, type(exc).__name__, exc)
        _settle(ticket.result, exc)

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
                    f"({self._lost_restore_point[:300]}), and the earlier copy was released to make room for it; "
                    "fix the cause and call checkpoint() again"
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
        while True:
            with self._lock:
                inflight = list(self._inflight)
            if not inflight:
                break
            wait_futures(inflight)
            with self._lock:
                self._inflight = [f for f in self._inflight if not f.done()]
        self._raise_background()

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
            for pool in (self._worker, self._deferred, self._waiter):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._worker = self._deferred = self._waiter = None
            if self._own_stager:
                self.stager.close()

    def __enter__(self) -> "WrapHandle":
        """``with stager.wrap(model, opt) as handle:`` closes the handle on the way out."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the handle (see :meth:`close`)."""
        self.close()

    def __repr__(self) -> str:
        where = ", ".join(map(str, self._devices)) or "cpu"
        return f"WrapHandle({type(self.model).__name__} on {where}, checkpoints={len(self.records)}, closed={self._closed})"

    # ---------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise StagerClosedError("this WrapHandle was closed; call stager.wrap() again")

    def _stage(self, state: dict[str, Any], marks: Any = None) -> tuple[Any, Any]:
        """Stage ``state``; return the staged dict and the device copies still in flight (or None)."""
        if isinstance(self.stager, GraphStager):
            return self.stager.stage_nowait(state, marks, check_versions=_WRAP_HINT)
        nowait: Callable[[Any], tuple[Any, Any]] | None = getattr(self.stager, "stage_nowait", None)
        if self._devices and callable(nowait):
            return nowait(state)
        staged = self.stager.stage(state)
        if isinstance(staged, Future):  # a user-supplied stager with async staging
            staged = staged.result()
        return staged, None

    def _waiter_pool(self) -> ThreadPoolExecutor:
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager-wrap")
        return self._waiter

    def _wait_staging(self) -> None:
        ticket = self._staging
        if ticket is not None:
            ticket.staged.wait()
        pending, self._pending = self._pending, None
        if pending is not None:
            _wait_host(pending)
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

    def _write_done(self, fut: Future, record: CheckpointRecord, submitted: float, ticket: "_Ticket") -> None:
        record.write_s = time.perf_counter() - submitted
        exc = CancelledError("the write was cancelled") if fut.cancelled() else fut.exception()
        if exc is not None:
            _drop_frames(exc)  # they hold the staged dict: its host arena would never be released
        with self._lock:
            if self._uploads.get(ticket.path) is ticket.result:
                del self._uploads[ticket.path]
            if exc is not None:
                record.error = exc
                self._errors.append((record.path, exc, "writing"))
        if exc is not None:
            log.error("stager: writing checkpoint %s failed: %s: %s", record.path, type(exc).__name__, exc)
            _settle(ticket.result, exc)
        else:
            _settle(ticket.result, None, fut.result())

    def _raise_background(self) -> None:
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


class _Ticket:
    """One ``checkpoint()`` call as the background thread carries it."""

    __slots__ = ("path", "staged", "result")

    def __init__(self, path: str) -> None:
        self.path = path
        self.staged = threading.Event()
        """Set once the live tensors may change: copied (CPU) or queued behind known events (GPU)."""
        self.result: Future = Future()
        """What ``checkpoint()`` returned: DCP's metadata once written, or the failure."""


def _settle(fut: Future, exc: BaseException | None, value: Any = None) -> None:
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
    todo: list[Any] = [exc]
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


def _wait_then_return(pending: Any, staged: Any) -> Any:
    _wait_host(pending)
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
