"""The staging program and its executors (import name ``stager.graphs``); each module says its part.

Importing this package initialises no CUDA context and imports no Triton.
"""

from __future__ import annotations

from stager.graphs.bindings import Bindings, bind_program
from stager.graphs.cuda_graph import (
    Action,
    CaptureKey,
    CaptureTracker,
    CudaGraphExecutor,
    GraphState,
    capture_key,
)
from stager.graphs.eager import issue_ops, run_eager
from stager.graphs.ops import ChecksumCopyOp, ChecksumOp, ChunkCopyOp, DirectCopyOp, Op, PackOp, RecordEventOp
from stager.graphs.program import MIN_RUN, Program, build_program

__all__ = [
    "MIN_RUN", "Action", "Bindings", "CaptureKey", "CaptureTracker", "ChecksumCopyOp", "ChecksumOp",
    "ChunkCopyOp", "CudaGraphExecutor", "DirectCopyOp", "GraphState", "Op", "PackOp", "Program",
    "RecordEventOp", "bind_program", "build_program", "capture_key", "issue_ops", "run_eager"
]
