"""The staging program and its executors (import name ``stager.graphs``).

* :mod:`stager.graphs.ops` -- the ops a program is made of: pack, copy, checksum, record.
* :mod:`stager.graphs.program` -- :class:`Program`, an immutable ordered list of those ops built
  from a plan for one device by :func:`build_program`.
* :mod:`stager.graphs.bindings` -- :func:`bind_program`, which ties a program to memory.
* :mod:`stager.graphs.eager` -- :func:`run_eager`: run a bound program now on a stream (CPU
  tensors included, packed with the Triton interpreter or the plain-torch reference).
* :mod:`stager.graphs.cuda_graph` -- :class:`CudaGraphExecutor`: warm up, capture as CUDA graphs,
  replay every checkpoint; :class:`CaptureTracker` is its decision logic.

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
