"""stager: checkpoint staging for PyTorch at the hardware limit.

Importing this package initialises no CUDA context, loads no NVML and imports no Triton; those
happen lazily on first use.
"""

from __future__ import annotations
