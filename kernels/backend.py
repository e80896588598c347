"""Which backend a kernel launch runs on: compiled Triton, the Triton interpreter, or plain torch.

The Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set
before ``triton`` is imported). Anywhere else, or where Triton is absent, the launchers fall back
to their plain-torch references (:mod:`stager.kernels.reference`,
:func:`stager.kernels.checksum.region_checksums_reference`); :func:`triton_available` and
:func:`kernel_backend` say which is used, and ``use_triton`` (None, True, False) on every
launcher chooses, insists or refuses.

Importing this module imports Triton (when installed); ``stager.kernels`` loads it on first use.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

try:  # Triton is optional: without it every launch takes the reference path.
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: Exception | None = exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["kernel_backend", "triton_available"]


def jit_kernel(fn: Any) -> Any:
    """``triton.jit`` for a kernel with an ``n_blocks`` argument (the identity without Triton)."""
    # n_blocks is not specialised (on == 1 or % 16), so one compiled kernel serves every table.
    return triton.jit(fn, do_not_specialize=["n_blocks"]) if triton is not None else fn


def jit_helper(fn: Any) -> Any:
    """``triton.jit`` for a device function the kernels call (the identity without Triton)."""
    return triton.jit(fn) if triton is not None else fn


@jit_helper
def _probe(x):
    return x


_INTERPRETED = None if triton is None else getattr(
    getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None
)
_INTERPRET = _INTERPRETED is not None and isinstance(_probe, _INTERPRETED)


def triton_available() -> bool:
    """Whether Triton imported; without it every launch uses the plain-torch reference."""
    return triton is not None


def _kernel_support(device: torch.device) -> str | None:
    """None if the Triton kernel can run on ``device``, else why not."""
    if triton is None:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR!r})"
    if _INTERPRET and device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only; got {device}"
    if not _INTERPRET and device.type != "cuda":
        return (
            f"compiled Triton kernels need a CUDA device, got {device}; set TRITON_INTERPRET=1 "
            f"before triton is imported to run them on the CPU"
        )
    return None


def kernel_backend(device: torch.device | str) -> str:
    """What an automatic launch on ``device`` runs: ``"triton"``, ``"triton-interpreter"`` or
    ``"reference"``."""
    if _kernel_support(torch.device(device)) is not None:
        return "reference"
    return "triton-interpreter" if _INTERPRET else "triton"


def use_kernel(use_triton: bool | None, device: torch.device) -> bool:
    """Whether a launch on ``device`` runs the kernel: ``use_triton`` None chooses, True insists
    (``RuntimeError`` where the kernel cannot run), False refuses."""
    why = _kernel_support(device)
    if use_triton is None:
        return why is None
    if use_triton and why is not None:
        raise RuntimeError(f"use_triton=True but the Triton kernel cannot run: {why}")
    return bool(use_triton)


def device_context(device: torch.device) -> ContextManager[object]:
    """``torch.cuda.device`` of a CUDA ``device`` (launches go to its current stream), else none."""
    if device.type == "cuda":
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()
