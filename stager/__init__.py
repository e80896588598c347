"""stager: checkpoint staging for PyTorch at the hardware limit.

Importing this package initialises no CUDA context, loads no NVML and imports no Triton; those
happen lazily on first use.
"""

from __future__ import annotations

from stager import errors as _errors
from stager.checkpoint import load_checkpoint
from stager.config import StagerConfig
from stager.errors import *  # noqa: F403 (every class of stager.errors is public here too)
from stager.stager import GraphStager, HostBytes
from stager.stats import StageStats
from stager.wrap import WrapHandle, wrap

__all__ = ["GraphStager", "StagerConfig", "StageStats", "HostBytes", "wrap", "WrapHandle", "load_checkpoint"]
__all__ += _errors.__all__


def __getattr__(name: str) -> object:
    # ``stager.last_stats``: the StageStats of the most recent stage() in this process.
    if name == "last_stats":
        from stager.stats import latest

        return latest()
    raise AttributeError(f"module 'stager' has no attribute {name!r}")
