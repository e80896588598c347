"""``import stager`` initialises no CUDA context, loads no NVML and imports no Triton."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import json, sys, torch, stager\n"
        "print(json.dumps({'triton': 'triton' in sys.modules, 'pynvml': 'pynvml' in sys.modules,"
        " 'cuda_initialized': torch.cuda.is_initialized(),"
        " 'kernels': 'stager.kernels.pack' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"triton": False, "pynvml": False, "cuda_initialized": False, "kernels": False}
