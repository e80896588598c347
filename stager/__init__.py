"""stager: checkpoint staging for PyTorch at the hardware limit.

Importing this package initialises no CUDA context, loads no NVML and imports no Triton; those
happen lazily on first use.
"""

from __future__ import annotations

from stager.config import StagerConfig
from stager.errors import (
    LeaseTimeoutError,
    RegionTableError,
    StagerClosedError,
    StagerConfigError,
    StagerError,
    StagingInputError,
    StagingMemoryError,
)
from stager.stager import GraphStager
from stager.restore import RestoreMismatchError
from stager.stats import StageStats
from stager.wrap import CheckpointWriteError, WrapHandle, load_checkpoint, wrap

__all__ = [
    "GraphStager",
    "StagerConfig",
    "StageStats",
    "StagerError",
    "StagingInputError",
    "StagerConfigError",
    "StagingMemoryError",
    "LeaseTimeoutError",
    "StagerClosedError",
    "RegionTableError",
    "wrap",
    "WrapHandle",
    "load_checkpoint",
    "CheckpointWriteError",
    "RestoreMismatchError",
]
