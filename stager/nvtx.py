"""Profiler ranges around each staging phase, and a window of checkpoints for ``nsys``.

The ranges, how to record them (``torch.profiler``, ``nsys``) and the window
(``STAGER_PROFILE_CHECKPOINTS``): README.md, "Profiling". A disabled range is a shared no-op
context manager; an enabled one is a ``torch.profiler.record_function`` range plus, on CUDA, an
NVTX range (except under ``emit_nvtx``, whose own NVTX range would double it).
:func:`profiler_window` brackets the chosen checkpoints with ``cudaProfilerStart``/``Stop``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import threading
from concurrent.futures import Future
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch

__all__ = [
    "range", "ranges", "PHASES", "CheckpointSet", "parse_checkpoints", "profiler_window", "ProfilerWindow",
    "WindowToken"
]

log = logging.getLogger("stager")

PHASES = (
    "stager/plan", "stager/capture", "stager/replay", "stager/pack", "stager/copy", "stager/restore",
    "stager/write",
)
_NULL = contextlib.nullcontext()
_cuda: bool | None = None  # torch.cuda.is_available(), read once (it initialises no context)


def _cuda_available() -> bool:
    global _cuda
    if _cuda is None:
        _cuda = torch.cuda.is_available()
    return _cuda


def _under_emit_nvtx() -> bool:
    """Whether ``torch.autograd.profiler.emit_nvtx`` is active (it turns record_function into NVTX)."""
    kind = getattr(torch._C._autograd, "_profiler_type", None)
    return kind is not None and str(kind()).endswith("NVTX")


class _Range:
    """One enabled range: a ``record_function`` while a profiler records, and an NVTX range on CUDA."""

    __slots__ = ("name", "_rf", "_pushed")

    def __init__(self, name: str) -> None:
        self.name = name
        self._rf: Any = None
        self._pushed = False

    def __enter__(self) -> None:
        # Entered whether or not a profiler is recording now (a few microseconds when none is):
        # torch.profiler with profile_all_threads=True reports no profiler as enabled on any
        # thread, yet records every range.
        rf = torch.profiler.record_function(self.name)
        rf.__enter__()
        self._rf = rf
        if _cuda_available() and not _under_emit_nvtx():
            torch.cuda.nvtx.range_push(self.name)
            self._pushed = True

    def __exit__(self, *exc: object) -> None:
        if self._pushed:
            torch.cuda.nvtx.range_pop()
        if self._rf is not None:
            self._rf.__exit__(None, None, None)


def range(name: str, enabled: bool) -> ContextManager[None]:  # noqa: A001 - mirrors torch.cuda.nvtx.range
    """A context manager that marks ``name`` as a profiler range when ``enabled``.

    See the module docstring for where the range shows (``torch.profiler`` and NVTX).
    """
    if not enabled:
        return _NULL
    return _Range(name)


def _no_range(name: str) -> ContextManager[None]:
    return _NULL


def ranges(enabled: bool) -> Callable[[str], ContextManager[None]]:
    """:func:`range` with ``enabled`` fixed: makes the range of a phase from its name alone (what
    the staging executors of :mod:`stager.graphs` take)."""
    return _Range if enabled else _no_range


_TERM = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")


class CheckpointSet(tuple):
    """A sorted tuple of distinct 1-based checkpoint indices, shown as ``"2-3,5"`` (``"none"`` if empty)."""

    __slots__ = ()

    def __new__(cls, indices: Iterable[int] = ()) -> "CheckpointSet":
        return super().__new__(cls, sorted(set(int(i) for i in indices)))

    def runs(self) -> list[tuple[int, int]]:
        """Contiguous runs ``(first, last)``: ``(2, 3, 5)`` gives ``[(2, 3), (5, 5)]``."""
        out: list[tuple[int, int]] = []
        for i in self:
            if out and out[-1][1] == i - 1:
                out[-1] = (out[-1][0], i)
            else:
                out.append((i, i))
        return out

    def __str__(self) -> str:
        if not self:
            return "none"
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.runs())

    def __repr__(self) -> str:
        return f"CheckpointSet({str(self)!r})"


def parse_checkpoints(text: str) -> CheckpointSet:
    """Parse ``"2"``, ``"2-3"``, ``"1,4-6"`` (1-based, inclusive) or ``"none"``/``""``.

    Raises ``ValueError`` on anything else (a zero index, a reversed range, a stray word).
    """
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return CheckpointSet()
    indices: list[int] = []
    for term in text.split(","):
        m = _TERM.match(term)
        if not m:
            raise ValueError(text)
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if first < 1 or last < first or last - first > 1_000_000:
            raise ValueError(text)
        indices.extend(builtins.range(first, last + 1))
    return CheckpointSet(indices)


class WindowToken:
    """Handed out by :meth:`ProfilerWindow.stage`: lets an asynchronous stage end the range later."""

    __slots__ = ("_window", "_stop", "_deferred")

    def __init__(self, window: "ProfilerWindow", stop: bool) -> None:
        self._window = window
        self._stop = stop
        self._deferred = False

    def until(self, result: Any) -> Any:
        """End the capture range when ``result`` is complete, not when the ``with`` block exits.

        ``result`` is what ``stage()`` returns: a ``Future`` (asynchronous staging; the range
        ends in its done callback, so the copies it waits for are inside it; anything with
        ``add_done_callback`` will do) or anything else (the range ends at the block's exit).
        Returns ``result``.
        """
        waitable = isinstance(result, Future) or callable(getattr(result, "add_done_callback", None))
        if self._stop and waitable:
            self._deferred = True
            result.add_done_callback(lambda _: self._window._stop())
        return result


class ProfilerWindow:
    """Brackets the chosen checkpoints with ``cudaProfilerStart()``/``cudaProfilerStop()``.

    Each contiguous run of chosen checkpoints is one capture range: it starts when the first
    checkpoint of the run begins staging and stops when the last one's staging is complete.
    Without CUDA, or with no checkpoint chosen, every call returns a no-op context manager.
    """

    def __init__(self, checkpoints: CheckpointSet) -> None:
        self.checkpoints = checkpoints
        runs = checkpoints.runs()
        self._starts = frozenset(a for a, _ in runs)
        self._stops = frozenset(b for _, b in runs)
        self._lock = threading.Lock()
        self._open = False
        self.starts = 0
        """How many capture ranges were started (``cudaProfilerStart`` calls)."""
        self.stops = 0
        """How many were stopped (``cudaProfilerStop`` calls)."""
        self.enabled = bool(checkpoints) and _cuda_available()
        if checkpoints and not self.enabled:
            log.warning(
                "stager: STAGER_PROFILE_CHECKPOINTS=%s but CUDA is not available; no capture range is marked",
                checkpoints,
            )

    @contextlib.contextmanager
    def _bracket(self, start: bool, stop: bool) -> Iterator[WindowToken]:
        if start:
            self._start()
        token = WindowToken(self, stop)
        try:
            yield token
        except BaseException:
            if stop and not token._deferred:
                self._stop()
            raise
        if stop and not token._deferred:
            self._stop()

    def stage(self, index: int) -> ContextManager[WindowToken | None]:
        """The context manager to wrap the stage call numbered ``index`` (1 for the first call).

        Use ``with window.stage(n) as w:`` and, for an asynchronous stage, ``w.until(future)``
        (``w`` is ``None`` when ``index`` starts or ends no range).
        """
        if not self.enabled:
            return _NULL
        start, stop = index in self._starts, index in self._stops
        if not start and not stop:
            return _NULL
        return self._bracket(start, stop)

    def _start(self) -> None:
        with self._lock:
            if self._open:
                return
            self._open = True
            self.starts += 1
        torch.cuda.cudart().cudaProfilerStart()

    def _stop(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            self.stops += 1
        torch.cuda.cudart().cudaProfilerStop()


def profiler_window(config: Any) -> ProfilerWindow:
    """The :class:`ProfilerWindow` of ``config.profile_checkpoints`` (``STAGER_PROFILE_CHECKPOINTS``).

    ``config`` is a :class:`~stager.config.StagerConfig` (anything with a ``profile_checkpoints``
    attribute: a :class:`CheckpointSet` or text that :func:`parse_checkpoints` accepts).
    """
    value = getattr(config, "profile_checkpoints", CheckpointSet())
    if not isinstance(value, CheckpointSet):
        value = parse_checkpoints(value)
    return ProfilerWindow(value)
