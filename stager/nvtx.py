"""NVTX ranges around each staging phase, for ``nsys profile -t cuda,nvtx``.

Ranges: ``stager/plan``, ``stager/capture``, ``stager/replay``, ``stager/pack``, ``stager/copy``,
``stager/restore``, ``stager/write``. They are emitted only when enabled (``STAGER_NVTX=1`` or
``StagerConfig(nvtx=True)``) and CUDA is available; otherwise :func:`range` returns a shared no-op
context manager, so a disabled range costs one function call.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["range", "PHASES"]

PHASES = (
    "stager/plan", "stager/capture", "stager/replay", "stager/pack", "stager/copy", "stager/restore", "stager/write",
)
_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def _nvtx_range(name: str):  # type: ignore[no-untyped-def]
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def range(name: str, enabled: bool) -> ContextManager[None]:  # noqa: A001 - mirrors torch.cuda.nvtx.range
    """A context manager that marks ``name`` as an NVTX range when ``enabled`` and CUDA is present."""
    if not enabled or not torch.cuda.is_available():
        return _NULL
    return _nvtx_range(name)
