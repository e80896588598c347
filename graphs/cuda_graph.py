"""Capture a bound staging program as CUDA graphs once, replay it every checkpoint.

The first run on a destination warms the program up eagerly on the side stream (compiling the pack
kernel; this is the checkpoint's copy), then captures it in ``replay_pieces`` consecutive slices,
one ``torch.cuda.CUDAGraph`` each; later runs replay them. A capture is keyed by
(:class:`CaptureKey`) the program, the destination arena, the chunk buffers and any checksum
buffers; one executor serves one binding, so a run with another key raises (the source addresses
are the plan check's to guard). :class:`CaptureTracker` is the capture/replay decision as a pure
state machine that counts captures and replays.

Capture rules (``torch/cuda/graphs.py``): every buffer is allocated before capture (the checksum's
few temporaries come from the graph's private pool); destinations are pinned;
``capture_error_mode="thread_local"``; ``capture_begin`` is called directly, since
``torch.cuda.graph`` synchronises the device and empties the allocator's cache. The done event is
recorded after the last piece, never captured. A failed capture is logged once; the executor
stays ``FAILED`` and runs eagerly from then on.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from dataclasses import dataclass, field

import torch

from stager.graphs.bindings import Bindings
from stager.graphs.eager import Ranges, issue_ops, no_ranges
from stager.graphs.ops import RECORD
from stager.plan import gc_paused

__all__ = ["GraphState", "Action", "CaptureKey", "CaptureTracker", "CudaGraphExecutor", "capture_key"]

log = logging.getLogger("stager")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("%s", message)


class GraphState(str, enum.Enum):
    """Where an executor stands."""

    EMPTY = "empty"
    """Nothing captured yet: the next run warms up and captures."""
    CAPTURED = "captured"
    """Graphs for :attr:`CaptureTracker.key` are ready to replay."""
    FAILED = "failed"
    """A capture failed: every run is eager from now on."""


class Action(str, enum.Enum):
    """What a run does, decided by :meth:`CaptureTracker.decide`."""

    CAPTURE = "capture"
    """First capture: warm up eagerly, then capture."""
    REPLAY = "replay"
    """Same key as the capture: replay the graphs."""
    EAGER = "eager"
    """Capture failed earlier: run the ops eagerly."""


@dataclass(frozen=True)
class CaptureKey:
    """Everything a captured graph has baked in. Equal keys: the graph may be replayed."""

    program: tuple
    """:attr:`Program.key` (structure: ops, offsets, sizes, slots, chunk bytes)."""
    arena: int
    """Address of the destination arena."""
    chunks: tuple[int, ...]
    """Addresses of the chunk buffers."""
    checksums: tuple[int, ...] = ()
    """Addresses of the device and host checksum buffers (checksum programs only)."""


def capture_key(bindings: Bindings) -> CaptureKey:
    """The key of ``bindings``: its program's structure, arena, chunk and checksum addresses."""
    program = bindings.program
    sums = (bindings.checksums, bindings.host_checksums)
    return CaptureKey(
        program=program.key,
        arena=bindings.arena.data_ptr(),
        chunks=tuple(c.data_ptr() for c in bindings.chunks[: program.slots]),
        checksums=tuple(t.data_ptr() for t in sums if t is not None),
    )


@dataclass
class CaptureTracker:
    """The capture/replay decision and its counters, with no CUDA in sight."""

    state: GraphState = GraphState.EMPTY
    key: CaptureKey | None = None
    """Key of the graphs held (``None`` before the first capture)."""
    captures: int = 0
    replays: int = 0
    eager_runs: int = 0
    failure: str | None = None
    """Why the capture failed (state ``FAILED``)."""
    history: list[Action] = field(default_factory=list, repr=False)
    """Every action taken, in order (bounded to the last 64)."""

    def decide(self, key: CaptureKey) -> Action:
        """What to do for a run whose current key is ``key`` (changes nothing).

        Raises ``RuntimeError`` when graphs are held for another key: an executor serves one
        binding, and new memory means a new executor.
        """
        if self.state is GraphState.FAILED:
            return Action.EAGER
        if self.state is GraphState.EMPTY:
            return Action.CAPTURE
        if key != self.key:
            raise RuntimeError(
                f"CUDA graphs were captured for {self.key} and cannot be replayed for {key}: "
                "bind a new executor to new memory"
            )
        return Action.REPLAY

    def _note(self, action: Action) -> None:
        self.history.append(action)
        del self.history[:-64]

    def captured(self, key: CaptureKey) -> None:
        """A capture for ``key`` succeeded."""
        self.state = GraphState.CAPTURED
        self.key = key
        self.captures += 1
        self._note(Action.CAPTURE)

    def replayed(self) -> None:
        self.replays += 1
        self._note(Action.REPLAY)

    def failed(self, reason: str) -> None:
        """A capture failed: eager from now on."""
        self.state = GraphState.FAILED
        self.key = None
        self.failure = reason
        self._note(Action.EAGER)

    def ran_eager(self) -> None:
        self.eager_runs += 1
        self._note(Action.EAGER)


class CudaGraphExecutor:
    """Runs one program into one destination: capture once, replay while the key holds.

    Args:
        stream: the side stream (``torch.cuda.Stream`` on the program's device) that every
            warm-up, capture and replay uses.
        pieces: how many graphs the program is cut into (``STAGER_REPLAY_PIECES``).
        ranges: makes the profiler ranges ``stager/capture`` / ``stager/replay`` and those of
            the eager ops (none by default).
    """

    def __init__(self, stream: torch.cuda.Stream, *, pieces: int = 1, ranges: Ranges = no_ranges) -> None:
        self.stream = stream
        self.pieces = max(1, int(pieces))
        self.ranges = ranges
        self.tracker = CaptureTracker()
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._bindings: Bindings | None = None

    @property
    def state(self) -> GraphState:
        return self.tracker.state

    def keepalive(self) -> tuple[list[torch.cuda.CUDAGraph], Bindings | None]:
        """What must outlive the copies just queued: the graphs and the memory they address.

        Re-capturing replaces (never mutates) these, so a holder keeps the old ones valid.
        """
        return (self._graphs, self._bindings)

    def run(
        self, bindings: Bindings, key: CaptureKey | None = None, done: torch.cuda.Event | None = None
    ) -> Action:
        """Stage once through ``bindings`` on the side stream; returns what was done.

        The caller has made the side stream wait for the producer of the sources. ``done`` (a
        ``torch.cuda.Event``, optional) is recorded on the side stream after the last copy. On
        return the copies (and ``done``) are queued on the side stream, not finished.
        """
        if key is None:
            key = capture_key(bindings)
        action = self.tracker.decide(key)
        device = bindings.program.device
        with torch.cuda.device(device.index), torch.cuda.stream(self.stream):
            if action is Action.REPLAY:
                with self.ranges("stager/replay"):
                    for g in self._graphs:
                        g.replay()
                self.tracker.replayed()
            elif action is Action.EAGER:
                issue_ops(bindings, ranges=self.ranges)
                self.tracker.ran_eager()
            else:
                action = self._warm_up_and_capture(bindings, key)
            if done is not None:
                done.record(self.stream)
        return action

    def _warm_up_and_capture(self, bindings: Bindings, key: CaptureKey) -> Action:
        self._graphs = []
        self._bindings = None
        with self.ranges("stager/capture"):
            issue_ops(bindings, ranges=self.ranges)  # warm-up: also this checkpoint's copy
            try:
                graphs = self._capture(bindings)
            except Exception as exc:  # noqa: BLE001 - any capture failure means eager
                reason = f"{type(exc).__name__}: {exc}"
                self.tracker.failed(reason)
                _warn_once(
                    f"stager: CUDA-graph capture of the staging program on {bindings.program.device} "
                    f"failed ({reason}); staging runs eagerly (set STAGER_GRAPHS=off to skip the attempt)"
                )
                return Action.EAGER
        self._graphs = graphs
        self._bindings = bindings
        self.tracker.captured(key)
        return Action.CAPTURE

    def _capture(self, bindings: Bindings) -> list[torch.cuda.CUDAGraph]:
        graphs: list[torch.cuda.CUDAGraph] = []
        steps = bindings.steps
        # No cyclic garbage collection while capturing: a collection runs finalizers on this
        # thread (a released host arena's cudaHostUnregister, a user object's CUDA call), and in
        # "thread_local" mode any unsafe CUDA call on the capturing thread invalidates the capture.
        with gc_paused():  # shared with the other threads' pauses (see stager.plan.gc_paused)
            for r in bindings.program.pieces(self.pieces):
                if all(steps[i][0] == RECORD for i in r):
                    continue  # nothing to capture (the done marker only)
                g = torch.cuda.CUDAGraph()
                g.capture_begin(capture_error_mode="thread_local")
                try:
                    issue_ops(bindings, r)
                except BaseException:
                    with contextlib.suppress(Exception):
                        g.capture_end()
                    raise
                g.capture_end()
                graphs.append(g)
        return graphs
