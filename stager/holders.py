"""Who still holds a staged copy: the tracebacks of failed writes.

A write that fails in DCP's background thread leaves its exception in the ``Future`` that
``dcp.async_save`` returned; the exception's traceback keeps DCP's frames, and their locals keep
the staged dict (and so its host arena) alive for as long as anyone holds that ``Future``. A lease
policy that waits for the arena then waits for nothing. :func:`traceback_holders` finds such
exceptions, so the stager can go on (or fail at once) and say what holds the copy.

It scans every object the garbage collector tracks, so it is run only when a stage has already
waited for an arena, never on the hot path.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

import torch

__all__ = ["traceback_holders"]

_MAX_DEPTH = 6  # how deep into a local's containers to look for a staged tensor


def _holds(value: Any, ranges: Sequence[tuple[int, int]], depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return False
        try:
            ptr = value.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return False
        return any(lo <= ptr < hi for lo, hi in ranges)
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return any(_holds(v, ranges, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds(v, ranges, depth + 1) for v in value)
    return False


def traceback_holders(ranges: Sequence[tuple[int, int]], limit: int = 3) -> list[str]:
    """Describe (up to ``limit``) exceptions whose traceback frames hold a tensor whose storage
    lies in one of ``ranges`` (``(start, end)`` host addresses of leased arenas)."""
    found: list[str] = []
    if not ranges:
        return found
    for obj in gc.get_objects():
        if not issubclass(type(obj), BaseException) or obj.__traceback__ is None:
            continue
        tb = obj.__traceback__
        while tb is not None and len(found) < limit:
            frame = tb.tb_frame
            try:
                local_items = list(frame.f_locals.items())
            except Exception:  # pragma: no cover - a frame that cannot show its locals
                local_items = []
            hit = next((name for name, value in local_items if _holds(value, ranges)), None)
            if hit is not None:
                code = frame.f_code
                found.append(
                    f"{type(obj).__name__}: {str(obj)[:200]} (its traceback holds the staged dict in "
                    f"{code.co_name}() at {code.co_filename}:{tb.tb_lineno}, local {hit!r})"
                )
                break
            tb = tb.tb_next
        if len(found) >= limit:
            break
    return found
