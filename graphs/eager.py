"""Run a bound staging program now, op by op, on one stream.

This is the executor for the CPU (programs over CPU tensors, packed with the Triton interpreter or
the plain-torch reference), for the fresh path (an arena used once is not worth a capture), for
the warm-up before a capture (the first launch compiles the pack kernel), and for the fallback
when capture is off or failed. The same function issues the ops under capture, so what is
replayed is exactly what ran eagerly.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from stager import nvtx
from stager.graphs.program import COPY, PACK, PACK_SUM, SUM, Bindings

__all__ = ["run_eager", "issue_ops"]


def _stream_context(stream: Any) -> ContextManager[Any]:
    if stream is None:
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)


def _device_context(device: torch.device) -> ContextManager[Any]:
    if device.type == "cuda":
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def issue_ops(
    bindings: Bindings,
    ops: range | None = None,
    *,
    nvtx_enabled: bool = False,
) -> None:
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
            with nvtx.range("stager/copy", nvtx_enabled):
                a.copy_(b, non_blocking=non_blocking)
        elif code == PACK:
            with nvtx.range("stager/pack", nvtx_enabled):
                pack_gather(a, b, validate=False, use_triton=use_triton)
        elif code == PACK_SUM:
            table, sums = a
            with nvtx.range("stager/pack", nvtx_enabled):
                pack_gather(table, b, validate=False, use_triton=use_triton, checksums=sums)
        elif code == SUM:  # one launch per program: it shows in a trace as its kernel
            region_checksums(a, b, use_triton=use_triton)


def run_eager(
    bindings: Bindings,
    *,
    stream: Any = None,
    ops: range | None = None,
    nvtx_enabled: bool = False,
    done: Any = None,
) -> None:
    """Run the bound program (or the op indices ``ops``) now on ``stream``.

    ``stream`` is a ``torch.cuda.Stream`` of the program's device, or None for the current stream
    (and for CPU programs, which run synchronously). On a device the copies are queued, not
    finished, when this returns: ``done`` (a ``torch.cuda.Event``), when given, is recorded on
    the stream after them.
    """
    device = bindings.program.device
    with _device_context(device), _stream_context(stream):
        issue_ops(bindings, ops, nvtx_enabled=nvtx_enabled)
        if done is not None:
            done.record()
