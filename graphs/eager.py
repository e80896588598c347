"""Run a bound staging program now, op by op, on one stream.

The executor for CPU programs (packed with the Triton interpreter or the plain-torch reference),
for the fresh path (an arena used once is not worth a capture), for the warm-up before a capture
(the first launch compiles the pack kernel) and for the fallback when capture is off or failed.
The same function issues the ops under capture, so what is replayed is exactly what ran eagerly.
Profiler ranges come from the caller (``ranges``: a context manager per phase name); none by default.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from stager.graphs.bindings import Bindings
from stager.graphs.ops import COPY, PACK, PACK_SUM, SUM

__all__ = ["Ranges", "issue_ops", "no_ranges", "run_eager"]

Ranges = Callable[[str], ContextManager[object]]
"""Makes the profiler range of one phase, by name (``stager/copy``...)."""

_NULL = contextlib.nullcontext()


def no_ranges(name: str) -> ContextManager[object]:
    """The :data:`Ranges` that marks nothing."""
    return _NULL


def issue_ops(bindings: Bindings, ops: range | None = None, *, ranges: Ranges = no_ranges) -> None:
    """Issue the copy, pack and checksum ops at indices ``ops`` (default: the whole program) on
    the current stream. :class:`~stager.graphs.program.RecordEventOp` marks where the program
    ends: the executor records the caller's done event there, never inside a captured graph.
    """
    from stager.kernels import pack_gather, region_checksums

    steps = bindings.steps if ops is None else bindings.steps[ops.start : ops.stop]
    use_triton = bindings.use_triton
    non_blocking = bindings.non_blocking
    for code, a, b in steps:
        if code == COPY:
            with ranges("stager/copy"):
                a.copy_(b, non_blocking=non_blocking)
        elif code == PACK:
            with ranges("stager/pack"):
                pack_gather(a, b, validate=False, use_triton=use_triton)
        elif code == PACK_SUM:
            table, sums = a
            with ranges("stager/pack"):
                pack_gather(table, b, validate=False, use_triton=use_triton, checksums=sums)
        elif code == SUM:  # one launch per program: it shows in a trace as its kernel
            region_checksums(a, b, use_triton=use_triton)


def run_eager(
    bindings: Bindings,
    *,
    stream: torch.cuda.Stream | None = None,
    ops: range | None = None,
    ranges: Ranges = no_ranges,
    done: torch.cuda.Event | None = None,
) -> None:
    """Run the bound program (or the op indices ``ops``) now on ``stream``, marking each op with
    ``ranges``.

    ``stream`` is a ``torch.cuda.Stream`` of the program's device, or None for the current stream
    (and for CPU programs, which run synchronously). On a device the copies are queued, not
    finished, when this returns: ``done`` (a ``torch.cuda.Event``), when given, is recorded on
    the stream after them.
    """
    device = bindings.program.device
    on_device = torch.cuda.device(device.index) if device.type == "cuda" else _NULL
    with on_device, (_NULL if stream is None else torch.cuda.stream(stream)):
        issue_ops(bindings, ops, ranges=ranges)
        if done is not None:
            done.record()
